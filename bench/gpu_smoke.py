"""GPU smoke bench: a few GSPO steps of the H100 preset's shapes on one CUDA device, with `gspo plan` beside them.

DeepSeek-R1-Distill-Qwen-1.5B's architecture from conf/model/qwen1.5b.yaml with random weights (no download), or
the real weights with model.path=DIR. Prints s/step, the rollout/update split, generated tokens/s, peak GPU memory
next to the plan's estimate, and MFU (model FLOPs: 2·N per token forward, 6·N per trained token, over the GPU's
dense bf16 peak, 989 TFLOP/s for an H100 SXM).

    python bench/gpu_smoke.py                                  # 3 steps at +experiment=compare_h100's shapes
    python bench/gpu_smoke.py trainer.steps=5 model.path=DIR   # any train override
    make gpu-smoke
"""
from __future__ import annotations

import sys
import time

PEAK_FLOPS = 989e12


def main(overrides: list[str]) -> None:
    import torch
    from hydra import compose, initialize_config_dir

    from gspo_cli import cli, config, loop, plan

    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_smoke.py needs a CUDA device: none is visible here")
    with initialize_config_dir(config_dir=cli.CONF_DIR, version_base="1.3"):
        job = compose(config_name="config", overrides=["+experiment=compare_h100", "model.source=random",
                                                       "trainer.steps=3", "task.eval_size=0", "trainer.eval_every=0",
                                                       "logger.wandb.mode=disabled", *overrides])
    cfg = config.to_config(job)
    p = loop.build(cfg, loop.Ranks())
    n_params = sum(q.numel() for q in p.policy.parameters())
    cursor, rows = 0, []
    torch.cuda.reset_peak_memory_stats()
    for step in range(cfg.trainer.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        entries, cursor = p.task.next_batch(cursor, cfg.trainer.prompts_per_step)
        batch = loop.sample_and_score(p, entries, cfg.algo.group_size)
        torch.cuda.synchronize()
        t_gen = time.perf_counter()
        order = loop.minibatch_order(len(batch.rewards), p)
        old_logp = loop.old_logps(p, batch, order[:cfg.trainer.minibatches])
        ref_logp = loop.reference_logps(p, batch, order[:cfg.trainer.minibatches])
        adv, _, _ = loop.advantages(p, batch, old_logp, ref_logp, order[:cfg.trainer.minibatches])
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        deferred = bool(torch.isnan(old_logp).any())              # the first minibatch's π_old comes from the update
        stats = loop.update(p, batch, order, adv, old_logp)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        gen = int(batch.roll.mask.sum())
        prompt = int(batch.roll.prompt_mask.sum())
        mb = cfg.trainer.minibatches
        pi_old = 0.0 if old_logp is batch.roll.logp else (mb - 1) / mb if deferred else 1.0  # share of a full pass
        passes = 1 + pi_old + (ref_logp is not None)                  # sampling + no-grad teacher-forced passes
        flops = 2 * n_params * (prompt + gen) * (1 + passes) + 6 * n_params * (prompt + gen) * cfg.trainer.epochs
        rows.append((step + 1, t2 - t0, t_gen - t0, t1 - t_gen, t2 - t1, gen / (t_gen - t0), flops / (t2 - t0)))
        print(f"step {step + 1}: {t2 - t0:.1f} s (generate {t_gen - t0:.1f}, π_old+ref {t1 - t_gen:.1f}, update "
              f"{t2 - t1:.1f}); {gen / (t_gen - t0):.0f} generated tok/s; MFU {flops / (t2 - t0) / PEAK_FLOPS:.1%}",
              flush=True)
        print(f"  reward {batch.rewards.mean():.3f}; grad/norm {stats['grad/norm']:.3g}; skipped (non-finite) "
              f"{stats['grad/nonfinite']}; rollout/logp_diff {stats['rollout/logp_diff']:.2e}; "
              f"clip {stats.get('clip/frac', float('nan')):.3f}; π_old pass {pi_old:.2f} of a full one", flush=True)
    est = plan.estimate(cfg, plan.shapes(cfg), int(batch.roll.prompt_mask.sum(-1).max()), "cuda")
    print(f"device: {torch.cuda.get_device_name()}; params {n_params / 1e9:.2f} B; precision {p.precision}")
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, "
          f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved; gspo plan: {est['peak'] / 2**30:.1f} GiB")


if __name__ == "__main__":
    main(sys.argv[1:])
