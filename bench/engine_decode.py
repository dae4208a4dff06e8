"""The vLLM engine alone on CPU: start time and decode speed, eager vs compiled (`rollout.vllm.enforce_eager`),
fp32 vs bf16, KV-cache block size (`rollout.vllm.block_size`), on SmolLM2-135M-Instruct. Each configuration runs
in its own process (vLLM's compiled state is per process): engine start (with the first sync), then `--rollouts`
rollouts of 4 prompts x 4 samples x <= 64 tokens, the first one reported apart (a compiled model's first calls
still warm up), a weight sync in between. `prefill s` is the same call for one token per sample, right after a
sync (which empties the prefix cache): the 4 prompts' prefill, shared by their samples or not.
A compiled engine's first start in a fresh cache compiles the model; later starts find it in inductor's cache.

    python bench/engine_decode.py                     # 4 configurations, ~5 min on 2 cores
    python bench/engine_decode.py --modes compiled --blocks 32,128
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def one(dtype: str, eager: bool, block: int, rollouts: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from gspo_cli import models, tasks
    from gspo_cli.cli import composed
    from gspo_cli.engine import VllmEngine

    cfg = composed()                                                     # the default task's prompts
    cfg.rollout.vllm.dtype, cfg.rollout.vllm.enforce_eager, cfg.rollout.vllm.block_size = dtype, eager, block
    tok = models.load_tokenizer(cfg.model)
    policy = models.load_policy(cfg.model, tok, torch.device("cpu"))
    task = tasks.build_task(cfg.task, 0)
    t = time.perf_counter()
    engine = VllmEngine(cfg, policy, torch.device("cpu"), seed=0)
    start = time.perf_counter() - t
    speeds, syncs, prefills, cursor = [], [], [], 0
    for i in range(rollouts):
        entries, cursor = task.next_batch(cursor, 4)
        ids, mask = tasks.encode(tok, task, entries, torch.device("cpu"))
        kw = dict(temperature=1.0, top_p=1.0, greedy=False, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=i)
        t = time.perf_counter()
        engine.generate(ids, mask, 4, max_new_tokens=1, **kw)
        prefills.append(time.perf_counter() - t)
        engine.sync(policy)                                              # empties the prefix cache again
        t = time.perf_counter()
        roll = engine.generate(ids, mask, 4, max_new_tokens=64, **kw)
        speeds.append(roll.mask.sum().item() / (time.perf_counter() - t))
        syncs.append(engine.sync(policy))
    return {"start_s": start, "first_tok_s": speeds[0], "tok_s": statistics.median(speeds[1:]),
            "sync_s": statistics.median(syncs), "prefill_s": statistics.median(prefills[1:])}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rollouts", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--blocks", default="32", help="KV-cache block sizes (multiples of 32 on CPU)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:  # a child: one configuration
        dtype, eager, block = a.one.split(":")
        print(json.dumps(one(dtype, eager == "eager", int(block), a.rollouts, a.threads)))
        return
    print(f"SmolLM2-135M-Instruct, 4 prompts x 4 samples x <= 64 tokens, T=1.0, {a.threads} threads, "
          f"median over rollouts 2..{a.rollouts}")
    print(f"{'dtype':9s} {'mode':9s} {'block':>5s} {'start s':>8s} {'first tok/s':>11s} {'tok/s':>7s} {'sync s':>7s} "
          f"{'prefill s':>9s}")
    for dtype in a.dtypes.split(","):
        for mode in a.modes.split(","):
            for block in a.blocks.split(","):
                out = subprocess.run([sys.executable, __file__, "--one", f"{dtype}:{mode}:{block}",
                                      f"--rollouts={a.rollouts}", f"--threads={a.threads}"],
                                     check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"{dtype:9s} {mode:9s} {block:>5s} {r['start_s']:8.1f} {r['first_tok_s']:11.1f} {r['tok_s']:7.1f} "
                      f"{r['sync_s']:7.2f} {r['prefill_s']:9.2f}", flush=True)


if __name__ == "__main__":
    main()
