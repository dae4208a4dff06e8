"""Where the GPU smoke bench's skipped minibatch comes from: +experiment=compare_h100's shapes (random weights,
256 new tokens here), one rollout, then each first-epoch minibatch updated alone, with π_old deferred to the update
(the default) and with the whole π_old pass first (rollout.is_correction=token_truncate, as before the deferral);
then the first minibatch's rows one at a time and in growing prefixes. Needs a CUDA device.

    python bench/gpu_nonfinite.py task=jsonl task.path=tests/data/gsm_small.jsonl task.prompt_key=problem \
        task.answer_key=solution model.tokenizer=DIR
"""
import sys

import torch
from hydra import compose, initialize_config_dir

from gspo_cli import cli, config, loop, rollout

with initialize_config_dir(config_dir=cli.CONF_DIR, version_base="1.3"):
    job = compose(config_name="config", overrides=["+experiment=compare_h100", "model.source=random", "task.eval_size=0",
                                                   "trainer.eval_every=0", "logger.wandb.mode=disabled",
                                                   "rollout.max_new_tokens=256", *sys.argv[1:]])
cfg = config.to_config(job)
p = loop.build(cfg, loop.Ranks())
batch = loop.sample_and_score(p, p.task.next_batch(0, cfg.trainer.prompts_per_step)[0], cfg.algo.group_size)
B, mb = len(batch.rewards), cfg.trainer.minibatches
adv = torch.randn(B, device=p.device)
order = loop.minibatch_order(B, p)
for corr in ("none", "token_truncate", "none"):
    cfg.rollout.is_correction = corr
    old = loop.old_logps(p, batch, order[:mb])
    print(corr, "rows left to the update", int(torch.isnan(old).any(-1).sum()), flush=True)
    for k, idx in enumerate(order[:mb]):
        s = loop.update(p, batch, [idx], adv, old)
        print(f"  minibatch {k}: non-finite {s['grad/nonfinite']}, grad norm {s['grad/norm']:.3g}, "
              f"ratio [{s['ratio/min']:.6f}, {s['ratio/max']:.6f}]", flush=True)
cfg.rollout.is_correction = "token_truncate"
old = loop.old_logps(p, batch, order[:mb])
idx0 = order[0]
print("minibatch 0 prompt lengths", batch.roll.prompt_mask[idx0].sum(-1).long().tolist(), flush=True)
bad = [r for r in idx0.tolist() if loop.update(p, batch, [torch.tensor([r], device=p.device)], adv, old)["grad/nonfinite"]]
print("rows non-finite alone:", bad, flush=True)
for k in (2, 4, 8, 16, len(idx0)):
    print(f"first {k} rows of minibatch 0: non-finite {loop.update(p, batch, [idx0[:k]], adv, old)['grad/nonfinite']}")
with torch.no_grad(), p.autocast():
    lp = rollout.token_logps(p.policy, *rollout.trim(batch.roll.prompt_ids[idx0], batch.roll.prompt_mask[idx0],
                                                      batch.roll.ids[idx0], batch.roll.mask[idx0]))
print("minibatch 0 forward finite:", bool(torch.isfinite(lp).all()), "; attention:", p.policy.config._attn_implementation)
