"""Precision at the article's scale, measured on CPU.

1. One AdamW step at lr 1e-6 on the full-width stand-in (conf/model/qwen1.5b.yaml, 2 layers, random init): the share
   of weights with a non-zero gradient that actually changed, for pure bf16 weights (what `model.dtype=bfloat16`
   used to mean, now refused), fp32, and fp32 master weights under bf16 autocast.
2. The sampler/trainer log-prob gap on the real SmolLM2 under bf16 autocast: mean and max |sampler − trainer| per
   response token, i.e. what `rollout/logp_diff` logs and why `rollout.old_logp=auto` recomputes π_old.

    python bench/precision.py        # ~4 min on 2 cores, ~10 GB of memory
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import tiny_rollout  # noqa: E402
from test_scale import stand_in_config  # noqa: E402

from gspo_cli import algorithms, loop, models  # noqa: E402
from gspo_cli.config import Config  # noqa: E402


def moved_share(weights: str, precision: str, tok) -> float:
    cfg = stand_in_config()
    policy = models.load_policy(cfg.model, tok, torch.device("cpu"), seed=0)
    if weights == "bfloat16":
        policy.to(torch.bfloat16)                     # pure bf16: weights and AdamW state in bf16
    before = {n: q.detach().clone() for n, q in policy.named_parameters()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    p = loop.Parts(cfg, policy, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0), precision=precision)
    roll = tiny_rollout(policy, tok, max_new_tokens=6)
    adv = algorithms.group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), 4)
    loop.update(p, loop.Batch([], roll, [], [], torch.zeros(8)), loop.minibatch_order(8, p), adv, roll.logp)
    got = moved = 0
    for n, q in policy.named_parameters():
        has = q.grad.ne(0)
        got, moved = got + int(has.sum()), moved + int((q.detach().ne(before[n]) & has).sum())
    del policy, opt, p, before
    gc.collect()
    return moved / got


def main():
    tok = models.load_tokenizer(Config().model)
    print("one AdamW step at lr 1e-6, 2-layer full-width stand-in: share of weights with a gradient that changed")
    for weights, precision in (("bfloat16", "fp32"), ("float32", "fp32"), ("float32", "bf16")):
        label = {"bfloat16": "pure bf16 weights", "float32": "fp32 weights"}[weights] + \
            (" + bf16 autocast" if precision == "bf16" else "")
        print(f"  {label:32s} {moved_share(weights, precision, tok):7.2%}", flush=True)

    cfg = Config()
    cfg.trainer.precision, cfg.rollout.max_new_tokens, cfg.task.eval_size, cfg.trainer.log_ref_kl = "bf16", 32, 0, False
    p = loop.build(cfg, loop.Ranks())
    batch = loop.sample_and_score(p, p.task.next_batch(0, 4)[0], 4)
    order = loop.minibatch_order(16, p)
    cfg.rollout.old_logp = "recompute"
    trainer = loop.old_logps(p, batch, order[:4])                                      # (B, T)
    gap = (batch.roll.logp - trainer).abs()[batch.roll.mask.bool()]
    ratio = algorithms.sequence_log_ratio(trainer, batch.roll.logp, batch.roll.mask).exp()          # (B, 1)
    outside = ((ratio < 1 - 3e-4) | (ratio > 1 + 4e-4)).float().mean().item()
    print(f"SmolLM2 under bf16 autocast, 16 x <= 32 tokens: |sampler - trainer| log-prob per token mean "
          f"{gap.mean():.2e}, max {gap.max():.2e}; sequences outside GSPO's band at ratio 1: {outside:.0%}")


if __name__ == "__main__":
    main()
