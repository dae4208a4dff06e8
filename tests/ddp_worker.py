"""One update of the tiny model on a fixed 8-response batch, as 1 process or as one rank of `torchrun`.

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py ALGO LOSS_AGG OUT.pt

Every rank generates the same global batch (same seed), keeps its own whole groups (rank r: rows 4r..4r+3),
and runs the real `loop.update` through a DDP-wrapped scorer; rank 0 saves the gradients, the updated weights
and the stats to OUT.pt. tests/test_distributed.py calls `run()` in-process (1 rank, the whole batch) and compares.
"""
import sys
from dataclasses import replace

import torch

from gspo_cli import distributed, loop, models, rollout
from gspo_cli.config import Config, ModelConfig

REWARDS = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]   # two groups of 4: both with non-zero advantages
LENGTHS = [8, 3, 5, 8, 2, 8, 6, 1]                    # ragged responses: the ranks hold 24 and 17 tokens


def run(algo: str, loss_agg: str, ranks: distributed.Ranks) -> dict:
    cfg = Config()
    cfg.algo.name, cfg.algo.group_size, cfg.algo.loss_agg = algo, 4, loss_agg
    cfg.algo.eps_low, cfg.algo.eps_high = (3e-4, 4e-4) if algo == "gspo" else (0.2, 0.2)
    cfg.trainer.minibatches, cfg.optim.lr = 1, 1e-3
    mcfg = ModelConfig(name="tiny", source="tiny")
    tok = models.load_tokenizer(mcfg)
    policy = models.load_policy(mcfg, tok, torch.device("cpu"), seed=0)
    if algo == "ppo":
        models.add_value_head(policy, separate=False)
    enc = tok(["2 + 2 =", "what is 3 - 1?"], return_tensors="pt", padding=True)
    roll = rollout.generate(policy, enc.input_ids.repeat_interleave(4, 0), enc.attention_mask.repeat_interleave(4, 0),
                            max_new_tokens=8, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                            generator=torch.Generator().manual_seed(0))
    ragged = (torch.arange(roll.ids.shape[1])[None] < torch.tensor(LENGTHS)[:, None]).float()   # (8, T)
    roll = replace(roll, mask=roll.mask * ragged, logp=roll.logp * ragged, entropy=roll.entropy * ragged)
    rows = slice(4 * ranks.rank, 4 * ranks.rank + 8 // ranks.world)
    roll = replace(roll, **{f: getattr(roll, f)[rows] for f in ("prompt_ids", "prompt_mask", "ids", "mask", "logp",
                                                                 "entropy", "finished")})
    rewards = torch.tensor(REWARDS, dtype=torch.float32)[rows]                                                   # (b,)
    forward = rollout.PolicyForward(policy)
    if ranks.world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(forward, broadcast_buffers=False)
    opt = torch.optim.SGD(policy.parameters(), lr=cfg.optim.lr)  # (Adam's first step is ~lr·sign(g): ill-conditioned)
    p = loop.Parts(cfg, policy, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0), forward=forward,
                   ranks=ranks, shuffle_gen=torch.Generator().manual_seed(1))
    batch = loop.Batch([], roll, [], [], rewards)
    order = [torch.arange(len(rewards))]
    adv, value_targets, _ = loop.advantages(p, batch, roll.logp, roll.logp - 0.01 * roll.mask, order)
    stats = loop.update(p, batch, loop.minibatch_order(len(rewards), p), adv, roll.logp, None, value_targets)
    return {"grads": {n: p.grad.clone() for n, p in policy.named_parameters()},
            "params": {n: p.detach().clone() for n, p in policy.named_parameters()}, "stats": stats}


if __name__ == "__main__":
    algo, agg, out = sys.argv[1:4]
    torch.set_num_threads(1)
    ranks = distributed.setup()
    result = run(algo, agg, ranks)
    if ranks.main:
        torch.save(result, out)
    distributed.teardown(ranks)
