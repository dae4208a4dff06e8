"""Starting accuracy of the embedded SmolLM2-135M-Instruct on reasoning-gym chain_sum settings (task calibration).

Prints greedy and sampled (T=1) accuracy on held-out prompts for a few settings, with and without the tag prompt.
    python bench/calibrate_task.py            # ~3 min on 2 CPU cores
"""
import time

import torch

from gspo_cli import models, rollout, tasks
from gspo_cli.config import ModelConfig, TaskConfig

SETTINGS = [dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1),
            dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2),
            dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1)]
PROMPTS = [TaskConfig.system_prompt, ""]


def main(n: int = 48, max_new: int = 48):
    tok = models.load_tokenizer(ModelConfig())
    model = models.load_policy(ModelConfig(), tok, torch.device("cpu"))
    print(f"{'params':60s} {'prompt':6s} {'greedy':>7s} {'sampled':>8s} {'s':>5s}")
    for params in SETTINGS:
        for sp in PROMPTS:
            task = tasks.build_task(TaskConfig(dataset="chain_sum", params=params, system_prompt=sp, eval_size=n), 0)
            p_ids, p_mask = tasks.encode(tok, task, task.eval_entries, "cpu")
            t0, acc = time.perf_counter(), {}
            for greedy in (True, False):
                r = rollout.generate(model, p_ids, p_mask, max_new_tokens=max_new, greedy=greedy,
                                     eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                     generator=torch.Generator().manual_seed(0))
                scores = [task.score(e, c) for e, c in zip(task.eval_entries, tasks.decode(tok, r.ids, r.mask))]
                acc[greedy] = sum(s["correct"] for s in scores) / len(scores)
            print(f"{str(params):60s} {'tags' if sp else 'none':6s} {acc[True]:7.1%} {acc[False]:8.1%} "
                  f"{time.perf_counter() - t0:5.1f}", flush=True)


if __name__ == "__main__":
    main()
