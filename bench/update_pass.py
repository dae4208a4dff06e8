"""Seconds of the update's log-prob pass (forward + backward) with and without `trainer.share_prompt` (each prompt
run once for its responses, the responses packed) on the embedded SmolLM2, at the rollout shape of
bench/vs_trl.py: 4 prompts x 4 responses of mixed lengths (10-64 tokens, mean 24), one minibatch (on-policy) and
4 minibatches of 4 shuffled rows. Random token ids: the pass's cost does not depend on them.

    python bench/update_pass.py [--reps 3] [--threads 2]

Prints, per shape and mode, the median seconds of a whole update's passes (no optimizer step) and the tokens the
trunk ran.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from gspo_cli import cli, models, rollout

LENGTHS = [12, 18, 25, 64, 15, 20, 22, 30, 10, 14, 64, 19, 17, 21, 26, 16]   # response tokens, 4 groups of 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = cli.composed([])
    model = models.load_policy(cfg.model, models.load_tokenizer(cfg.model), torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    P, T, B = 45, max(LENGTHS), len(LENGTHS)
    prompts = torch.randint(100, 40000, (4, P), generator=g).repeat_interleave(4, 0)             # (B, P)
    ids = torch.randint(100, 40000, (B, T), generator=g)                                         # (B, T)
    lengths = torch.tensor(LENGTHS)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    print(f"SmolLM2-135M fp32, {a.threads} threads, {B} responses ({min(LENGTHS)}-{T} tokens, mean "
          f"{sum(LENGTHS) / B:.0f}) after 4 prompts of {P} tokens; median of {a.reps}")
    print(f"{'minibatches':>11} {'share_prompt':>12} {'s':>6} {'trunk tokens':>12}")
    for n in (1, 4):
        order = list(torch.randperm(B, generator=torch.Generator().manual_seed(2)).view(n, B // n))
        for share in (False, True):
            times = []
            for _ in range(a.reps + 1):   # the first is a warm-up
                seen.clear()
                t0 = time.perf_counter()
                for idx in order:
                    t = int(lengths[idx].max())
                    mask = (torch.arange(t)[None] < lengths[idx, None]).float()                   # (b, t)
                    logp = rollout.token_logps(model, prompts[idx], torch.ones(len(idx), P), ids[idx, :t], mask,
                                               chunk=cfg.trainer.lm_head_chunk, share_prompt=share)  # (b, t)
                    (logp.sum() / mask.sum()).backward()
                    model.zero_grad()
                times.append(time.perf_counter() - t0)
            print(f"{n:>11} {str(share):>12} {statistics.median(times[1:]):>6.2f} {sum(seen):>12}", flush=True)


if __name__ == "__main__":
    main()
