"""Break each objective in one small way and list the tests that catch it; exit 1 if a break survives (no test
fails).  python tests/mutation_check.py   (make mutants; CI runs it)
Each break must be caught by tests/test_algorithms.py alone (~7 s a run); the TRL cross-check, 24 s a run, runs
once in the suite instead of once per break. Each break runs in its own copy of the package and tests, two at a
time (most of a run is one-threaded start-up), so the checkout itself is never modified."""
import concurrent.futures, os, shutil, subprocess, sys, tempfile
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F = "gspo_cli/algorithms.py"
orig = open(os.path.join(ROOT, F)).read()
BREAKS = [
 ("GSPO: no length normalisation (sum, not mean, of token log-ratios)",
  "return ((logp - old_logp) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)",
  "return ((logp - old_logp) * mask).sum(-1, keepdim=True)"),
 ("GSPO: sign of the advantage flipped",
  "loss, ratio, binding = clipped_surrogate(log_s, adv[:, None], eps_low, eps_high)",
  "loss, ratio, binding = clipped_surrogate(log_s, -adv[:, None], eps_low, eps_high)"),
 ("GRPO: token-sum instead of per-sequence token-mean",
  "return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()",
  "return (x * mask).sum(-1).mean()"),
 ("GRPO: KL sign (k3 with the ratio inverted)",
  "d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)",
  "d = (logp - ref_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)"),
 ("clip: max instead of min (pessimistic bound lost)",
  "return -torch.minimum(unclipped, clipped), ratio, clipped < unclipped",
  "return -torch.maximum(unclipped, clipped), ratio, clipped < unclipped"),
 ("PPO: value loss without the clipped branch",
  "value = 0.5 * token_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)",
  "value = 0.5 * token_mean((values - returns) ** 2, mask)"),
 ("PPO: GAE without lambda",
  "carry = delta + gamma * lam * carry * nxt", "carry = delta + gamma * carry * nxt"),
 ("rollout correction: token weights not truncated",
  "w = raw.clamp(max=threshold) * mask", "w = raw * mask"),
 ("rollout correction: GSPO's sequence ratio as a product, not the geometric mean",
  "log_s = sequence_log_ratio(log_w, torch.zeros_like(log_w), mask) if geometric else",
  "log_s = log_w.sum(-1, keepdim=True) if geometric else"),
 ("rollout correction: the weights ignored by the losses",
  "        loss_tok = loss_tok * is_weight                                 # (B, T)\n    if beta > 0:",
  "        pass\n    if beta > 0:"),
 ("group advantage: population std (N) instead of sample std (N-1)",
  "centred = centred / (r.std(-1, keepdim=True) + eps)", "centred = centred / (r.std(-1, keepdim=True, unbiased=False) + eps)"),
]


def caught_by(brk) -> list[str]:
    """The tests of tests/test_algorithms.py that fail with this break applied to a copy of the package."""
    name, a, b = brk
    assert orig.count(a) == 1, name
    with tempfile.TemporaryDirectory() as d:
        for part in ("gspo_cli", "tests", "conf"):
            shutil.copytree(os.path.join(ROOT, part), os.path.join(d, part),
                            ignore=shutil.ignore_patterns("__pycache__", "golden", "data"))
        shutil.copy(os.path.join(ROOT, "pyproject.toml"), d)
        open(os.path.join(d, F), "w").write(orig.replace(a, b))
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_algorithms.py"],
                             cwd=d, env={**os.environ, "PYTHONPATH": d}, capture_output=True, text=True).stdout
    return sorted({l.split("::")[1].split("[")[0].split(" ")[0] for l in out.splitlines() if l.startswith("FAILED")})


survived = []
with concurrent.futures.ThreadPoolExecutor(2) as pool:
    for (name, _, _), failed in zip(BREAKS, pool.map(caught_by, BREAKS)):
        print(f"- {name}: {len(failed)} tests fail: {', '.join(failed)}", flush=True)
        if not failed:
            survived.append(name)
if survived:
    print(f"{len(survived)} of {len(BREAKS)} breaks survived: {survived}")
    sys.exit(1)
print(f"all {len(BREAKS)} breaks were caught")
