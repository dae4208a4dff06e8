"""Memory at the article's width and vocabulary, measured on CPU with a random-init stand-in (conf/model/qwen1.5b.yaml
with 2 layers instead of 28: width 1536, vocab 151,936, untied head). Each measurement runs in its own process and
reads its peak resident memory (ru_maxrss) above a baseline taken just before the measured work; glibc is told to
return every large free to the OS at once (MALLOC_MMAP_THRESHOLD_), so the peak is the peak of live tensors.

    python bench/memory.py lm-head   # the update's log-prob pass, 4 rows x 1024 tokens: unchunked vs chunked (~4 min)
    python bench/memory.py plan      # `gspo plan`'s estimate vs the measured peak of two real steps, 3 shapes (~8 min)
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024 ** 3
PLAN_SHAPES = [  # (prompts, group, new tokens, minibatches, lm_head_chunk)
    (2, 4, 64, 2, 32),
    (2, 4, 128, 1, 128),
    (1, 4, 256, 1, 0),
]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stand_in(**trainer):
    from omegaconf import OmegaConf

    from gspo_cli.config import Config

    cfg = Config()
    arch = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "qwen1.5b.yaml").arch)
    cfg.model.name, cfg.model.source, cfg.model.arch = "qwen1.5b-2layer", "random", {**arch, "num_hidden_layers": 2}
    cfg.trainer.device, cfg.trainer.log_ref_kl, cfg.task.eval_size, cfg.logger.wandb.mode = "cpu", False, 0, "disabled"
    for k, v in trainer.items():
        setattr(cfg.trainer, k, v)
    return cfg


def child_lm_head(chunk: int) -> dict:
    """fwd + bwd of the update's log-prob pass at 4 x 1024 response tokens, above weights, grads and AdamW state."""
    import torch

    from gspo_cli import models, rollout

    cfg = stand_in()
    tok = models.load_tokenizer(cfg.model)
    model = models.load_policy(cfg.model, tok, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, 49152, (4, 1040), generator=torch.Generator().manual_seed(0))
    p_ids, ids = ids[:, :16], ids[:, 16:]                                   # (4, 16) prompt, (4, 1024) response
    ones = lambda x: torch.ones_like(x, dtype=torch.float32)                # noqa: E731
    rollout.token_logps(model, p_ids[:1], ones(p_ids[:1]), ids[:1, :2], ones(ids[:1, :2])).sum().backward()
    opt.step()                                                               # grads and AdamW moments now exist
    base = rss()                                                             # weights + grads + AdamW state
    opt.zero_grad(set_to_none=True)                                          # as the update does before backward
    logp = rollout.token_logps(model, p_ids, ones(p_ids), ids, ones(ids), chunk=chunk)        # (4, 1024)
    logp.sum().backward()
    return {"chunk": chunk, "above_state_gib": (peak() - base) / GIB, "state_gib": base / GIB}


def child_plan(prompts: int, group: int, new: int, minibatches: int, chunk: int) -> dict:
    """Two real steps of the loop's phases, against `gspo plan`'s estimate for the same config (fp32 on CPU)."""
    from gspo_cli import loop, plan, tasks
    from gspo_cli.distributed import Ranks

    cfg = stand_in(prompts_per_step=prompts, minibatches=minibatches, lm_head_chunk=chunk)
    cfg.algo.group_size, cfg.rollout.max_new_tokens = group, new
    task = tasks.build_task(cfg.task, cfg.seed)
    base = rss()                                                             # python, torch, tokenizer, task
    p = loop.build(cfg, Ranks())
    cursor, longest = 0, 0
    for _ in range(2):
        entries, cursor = task.next_batch(cursor, prompts)
        batch = loop.sample_and_score(p, entries, group)
        order = loop.minibatch_order(len(batch.rewards), p)
        old_logp = loop.old_logps(p, batch, order[:minibatches])
        adv, _, _ = loop.advantages(p, batch, old_logp, None, order[:minibatches])
        loop.update(p, batch, order, adv, old_logp)
        longest = max(longest, int(batch.roll.prompt_mask.sum(-1).max()))
    measured = peak() - base
    est = plan.estimate(cfg, plan.shapes(cfg), longest, "cpu")
    return {"shape": [prompts, group, new, minibatches, chunk], "measured_gib": measured / GIB,
            "plan_gib": est["peak"] / GIB, "plan_over_measured": est["peak"] / measured,
            "tokens": longest + new}


def run_child(*args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(what: str) -> None:
    if what == "lm-head":
        before, after = run_child("lm_head", 0), run_child("lm_head", 128)
        print(f"stand-in state (weights + grads + AdamW, fp32): {before['state_gib']:.2f} GiB")
        print("update log-prob pass, 4 rows x 1024 tokens, V=151936: peak above that state")
        for r in (before, after):
            print(f"  trainer.lm_head_chunk={r['chunk']:<4d} {r['above_state_gib']:6.2f} GiB")
        print(f"  after / before = {after['above_state_gib'] / before['above_state_gib']:.3f}  (target <= 0.35)")
    elif what == "plan":
        print(f"{'prompts x G, new tokens, minibatches, chunk':46s} {'tokens':>6s} {'measured':>9s} {'plan':>7s} "
              f"{'plan/measured':>13s}")
        for shape in PLAN_SHAPES:
            r = run_child("plan", *shape)
            print(f"{str(r['shape']):46s} {r['tokens']:6d} {r['measured_gib']:8.2f}G {r['plan_gib']:6.2f}G "
                  f"{r['plan_over_measured']:13.2f}", flush=True)
    else:
        raise SystemExit(f"usage: python bench/memory.py lm-head|plan (got {what!r})")


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        kind, *nums = sys.argv[2:]
        fn = child_lm_head if kind == "lm_head" else child_plan
        print(json.dumps(fn(*map(int, nums))))
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "")
