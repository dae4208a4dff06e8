"""This machine's matmul rate and the FLOP-bound floor of a training step, next to what a run measured.

    python bench/limits.py                        # matmul rates only
    python bench/limits.py outputs/.../RUN_DIR    # + per-step floor vs measured time/step of that run

Floor per step ≈ (2·N · generated tokens + 6·N · trained tokens) / peak rate, with N the parameter count including
the LM head (SmolLM2-135M: 134.5 M, embeddings tied) and trained tokens = response tokens × epochs (the
estimate: prompt tokens also pass the trunk, so the true floor is somewhat higher).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf


def per_call(f, seconds: float = 2.0, device: str = "cpu") -> float:
    """Seconds per call of f: one warm-up call, then as many calls as fit in `seconds`."""
    f()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f()
        reps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def rate(m: int, k: int, n: int, dtype=torch.float32, device="cpu", seconds: float = 2.0) -> float:
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    return 2 * m * k * n / per_call(lambda: a @ b, seconds, device)


def print_step_overheads(n_params: int = 134_515_008):
    """Seconds per optimizer step that do not depend on the batch, for SmolLM2-135M's fp32 weights: AdamW's
    step (the default per-tensor loop and the fused kernel), and the check that the weights stayed finite."""
    from gspo_cli.loop import finite

    torch.manual_seed(0)
    sizes = [49152 * 576] + [576 * 1536 * 3 + 576 * 576 * 2 + 576 * 192 * 2] * 30  # embedding + 30 layers' matrices
    sizes[-1] += n_params - sum(sizes)
    params = [torch.randn(s, requires_grad=True) for s in sizes]
    for q in params:
        q.grad = torch.randn_like(q)
    for fused in (False, True):
        opt = torch.optim.AdamW(params, lr=1e-6, fused=fused)
        print(f"AdamW step, {n_params / 1e6:.1f} M fp32 params, fused={fused!s:5s} {per_call(opt.step):8.3f} s")
    print(f"finite weights: a check per tensor {per_call(lambda: all(bool(torch.isfinite(q).all()) for q in params)):8.3f}"
          f" s, gspo_cli.loop.finite {per_call(lambda: finite(params)):.3f} s")


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    shapes = {"square 2048^3": (2048, 2048, 2048), "decode 16x576 @ 576x1536 (SmolLM2 MLP, 16 rows)": (16, 576, 1536),
              "LM head 16x576 @ 576x49152": (16, 576, 49152), "train 1760x576 @ 576x1536 (16 x 110 tokens)":
              (1760, 576, 1536)}
    rates = {name: rate(*s) for name, s in shapes.items()}
    for name, r in rates.items():
        print(f"fp32 {name:55s} {r / 1e9:8.1f} GFLOP/s")
    print_step_overheads()
    w, x = torch.randn(49152 * 5, 576), torch.randn(16, 576)          # 566 MB, ~SmolLM2's fp32 weights
    for name, f in {"16-row matmul": lambda: x @ w.T, "sum": w.sum}.items():
        print(f"weights streamed, fp32 {name:16s} over {w.numel() * 4 / 1e6:.0f} MB "
              f"{w.numel() * 4 / per_call(f) / 1e9:8.1f} GB/s")
    if torch.cuda.is_available():
        print(f"bf16 cuda square 8192^3 {rate(8192, 8192, 8192, torch.bfloat16, 'cuda') / 1e12:.1f} TFLOP/s")
    if len(sys.argv) < 2:
        return
    run = Path(sys.argv[1])
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r][1:]
    n_params, peak = 134.5e6, rates["square 2048^3"]
    batch = cfg.trainer.prompts_per_step * cfg.algo.group_size
    fracs = []
    for r in rows:
        gen = r["len/mean"] * batch
        floor = (2 * n_params * gen + 6 * n_params * gen * cfg.trainer.epochs) / peak
        fracs.append(floor / r["time/step"])
    print(f"run {run}: median time/step {statistics.median(r['time/step'] for r in rows):.2f} s; FLOP floor at the "
          f"square-matmul rate is {statistics.median(fracs):.1%} of it (median over {len(rows)} steps)")


if __name__ == "__main__":
    main()
