"""Where a step's time goes: py-spy samples a short `gspo train` on the benchmark's workload and this prints the
share of each part (rollout: linear layers, attention, KV cache, sampling; update: forward, LM head, backward,
optimizer), per step, with the step count and the run's own timings.

    python bench/breakdown.py                      # gspo, 1 minibatch, 4 steps (~2 min on 2 cores)
    python bench/breakdown.py --algo grpo --minibatches 4
"""
from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

RATE = 50  # samples per second

ROLLOUT = [("MLP (gate/up/down)", "LlamaMLP.forward"), ("KV cache concat", "Cache.update"),   # first match wins
           ("attention (sdpa)", "sdpa_attention_forward"), ("rotary", "apply_rotary"),
           ("q/k/v/o projections", "LlamaAttention.forward"), ("RMSNorm", "LlamaRMSNorm"),
           ("LM head", "Linear.forward")]


def part(stack: str) -> str:
    """The part of the loop a py-spy stack belongs to (frames are 'func (file:line)' joined by ';')."""
    if any(k in stack for k in ("load_policy", "load_tokenizer", "build_task", "frozen_copy")):
        return "setup: load model, tokenizer, task"
    if "generate (gspo_cli/rollout.py" in stack:
        if "sample (gspo_cli" in stack or "_top_p_filter" in stack:
            return "rollout: sampling"
        if "LlamaForCausalLM.forward" not in stack:
            return "rollout: log-softmax, entropy, bookkeeping"
        inner = stack.split("LlamaForCausalLM.forward", 1)[1]
        for name, key in ROLLOUT:
            if key in inner:
                return f"rollout: {name}"
        return "rollout: other model code"
    if "backward (torch/_tensor.py" in stack:
        return "update: backward"
    if "token_logps (gspo_cli/rollout.py" in stack:
        return "update: trunk forward" if "_response_hidden" in stack else "update: LM head + logsumexp"
    if "clip_grad_norm" in stack:
        return "update: grad clipping"
    if "step (torch/optim" in stack or "adamw (torch/optim" in stack:
        return "update: optimizer step"
    if "update (gspo_cli/loop.py" in stack:
        return "update: loss and bookkeeping"
    if "decode (gspo_cli/loop.py" in stack or "score (gspo_cli" in stack:
        return "rewards: detokenise + verifier"
    if "save (gspo_cli" in stack:
        return "checkpoint"
    return "other (imports, Hydra, threads idle)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algo", default="gspo")
    ap.add_argument("--minibatches", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("error: py-spy is not installed: expected `pip install py-spy`")
    with tempfile.TemporaryDirectory() as d:
        raw, run = Path(d) / "stacks.txt", Path(d) / "run"
        cmd = ["py-spy", "record", "--rate", str(RATE), "--format", "raw", "-o", str(raw), "--", "gspo", "train",
               f"algo={a.algo}", f"trainer.steps={a.steps}", "trainer.prompts_per_step=4", "algo.group_size=4",
               "rollout.max_new_tokens=64", f"trainer.minibatches={a.minibatches}", "trainer.eval_every=0",
               "trainer.log_ref_kl=false", "algo.beta=0", "logger.wandb.mode=disabled", "optim.warmup_steps=0",
               f"trainer.save_every={a.steps + 1}", f"trainer.threads={a.threads}", f"hydra.run.dir={run}"]
        subprocess.run(cmd, check=True, capture_output=True)
        seconds = collections.Counter()
        for line in raw.read_text().splitlines():
            stack, n = line.rsplit(" ", 1)
            seconds[part(stack)] += int(n) / RATE
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    print(f"py-spy at {RATE} Hz over `gspo train algo={a.algo} trainer.minibatches={a.minibatches}` "
          f"({a.steps} steps, 4x4 x <=64 tokens, SmolLM2 fp32, {a.threads} threads)")
    print(f"run's own timings per step: rollout {sum(r['time/rollout'] for r in rows) / len(rows):.2f} s, "
          f"update {sum(r['time/update'] for r in rows) / len(rows):.2f} s, "
          f"mean response {sum(r['len/mean'] for r in rows) / len(rows):.1f} tokens")
    groups = {"rollout": 0.0, "update": 0.0}
    for k, v in seconds.items():
        for g in groups:
            if k.startswith(g):
                groups[g] += v
    print(f"{'part':45s} {'s/step':>7s} {'share':>7s}")
    for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]):
        g = k.split(":")[0]
        share = f"{100 * v / groups[g]:6.1f}%" if g in groups and groups[g] else ""
        print(f"{k:45s} {v / a.steps:7.2f} {share:>7s}")
    print("(share = of the rollout's or the update's sampled time; setup and other are per run, shown / steps)")


if __name__ == "__main__":
    main()
