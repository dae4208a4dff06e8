"""Optimisations must not change the math: short fixed-seed runs reproduce the metrics recorded before them.

tests/golden/metrics.json holds every non-timing metric of
  * `model=tiny` runs of GSPO, GRPO and PPO (the whole CLI path: sampling, log-probs, update, logging), and
  * a `model=smollm2-135m` GSPO run with 4 minibatches, because the random tiny model never earns a reward, so
    its advantages, clip fractions and gradients are all zero; the real model's are not.
Recorded on the 2-core dev machine (torch 2.13.0+cpu, trainer.threads=2) before the performance work, and again
when a metric key was added (rollout/logp_diff): tiny PPO's rows changed then, because with no reward its
advantages are whitened rounding noise, which moved when the reference pass began to run per minibatch. Recorded
again when AdamW became torch's fused kernel (`optim.fused`, the same update up to rounding): every metric stayed
within the rtol 1e-4 below except two that are rounding noise themselves, tiny PPO's (above) and rollout/logp_diff, the mean
|sampler − trainer| log-prob gap of 1e-5 (9.58e-6 -> 9.12e-6). And again when the log-prob passes began to run each
prompt once for its group (`trainer.share_prompt`, the same numbers up to rounding): SmolLM2's ratios, clip
fractions, grad norms and KL within rtol 1.2e-5, loss/policy (a sum of near-cancelling terms) 1.1e-4, logp_diff
(rounding noise) 5 %; tiny PPO's noise rows moved again. And when the responses began to run packed and the LM head on response tokens only (the same numbers up to rounding): SmolLM2's ratios within 6.1e-6, grad norm 3e-7, KL 1.4e-5, loss/policy 2.6e-4, logp_diff 3.7 %; the tiny runs did not move. Re-recorded once more when the responses of different prompts began to share packed rows: logp_diff moved 7 % (6.4e-7), so it is compared to 2e-6 absolute now (a wrong π_old or a bf16 sampler shows 1e-3 and more). Tolerance: rewards, lengths and counts exact; other floats rtol 1e-4 (different kernels sum
in a different order; a sampled token flipping would change rewards and fail the test, as it should).
After a deliberate change of the math: `python tests/test_golden.py --write`, and say why in the commit.

    pytest tests/test_golden.py -q
"""
import json
import math
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import gspo, read_metrics  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "metrics.json"
EXACT = {"step", "reward/mean", "reward/std", "reward/accuracy", "reward/format", "reward/zero_std_frac",
         "len/mean", "len/clipped_frac", "grad/nonfinite", "eval/accuracy", "eval/reward"}
COMMON = ["trainer.threads=2", "logger.wandb.mode=disabled", "trainer.save_every=100", "seed=3"]
RUNS = {
    **{f"tiny-{a}": ["model=tiny", f"algo={a}", "trainer.steps=3", "trainer.prompts_per_step=2", "algo.group_size=4",
                     "trainer.minibatches=2", "rollout.max_new_tokens=12", "task.eval_size=4", "trainer.eval_every=3"]
       for a in ("gspo", "grpo", "ppo")},
    "smollm2-gspo": ["algo=gspo", "trainer.steps=2", "trainer.prompts_per_step=4", "algo.group_size=4",
                     "trainer.minibatches=4", "rollout.max_new_tokens=24", "task.eval_size=0", "trainer.eval_every=0"],
}


def run_metrics(name: str, tmp: Path) -> list[dict]:
    out = gspo("train", *RUNS[name], *COMMON, f"hydra.run.dir={tmp / name}", cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    return read_metrics(tmp / name)


def same(key, got, want) -> bool:
    if isinstance(want, float) and math.isnan(want):
        return isinstance(got, float) and math.isnan(got)
    if key in EXACT:
        return got == want
    if key == "rollout/logp_diff":  # the mean |sampler - trainer| gap, ~1e-5: rounding noise; a real fault is >= 1e-3
        return math.isclose(got, want, abs_tol=2e-6)
    return math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_metrics_equal_the_recorded_ones(tmp_path, name):
    want = json.loads(GOLDEN.read_text())[name]
    got = run_metrics(name, tmp_path)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert set(g) == set(w), set(g) ^ set(w)
        bad = {k: (g[k], w[k]) for k in w if not same(k, g[k], w[k])}
        assert not bad, f"step {w['step']}: (got, recorded) {bad}"
    if name.startswith("smollm2"):  # the real model's run must exercise the math the tiny one cannot
        assert any(r["clip/frac"] > 0 for r in want[1:]) and any(r["reward/std"] > 0 for r in want[1:])


if __name__ == "__main__" and "--write" in sys.argv:
    with tempfile.TemporaryDirectory() as d:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({n: run_metrics(n, Path(d)) for n in RUNS}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
