"""The one RL loop. GSPO, GRPO, DAPO and PPO share every line here except the loss and the advantage, both chosen in
one place (`algorithms.ALGORITHMS[name]`). PPO here is PPO-clip with a critic (a value head on the policy trunk, or a
separate copy) and GAE on KL-shaped per-token rewards, as in RLHF (Ouyang et al. 2022), not a critic-free variant.

    build -> restore -> for step: sample and score -> π_old -> reference log-probs -> advantages
                                  -> epochs x minibatches of clipped updates -> log (+ eval) -> checkpoint

Deviations worth knowing: π_old is the sampler's log-prob when the trainer computes in the sampler's numerics
(fp32, this engine), else it is recomputed without gradients in the update's own minibatch shapes
(`rollout.old_logp`); `kl/ref` is k3(π_old, π_ref) on the rollout, logged for every algorithm whether or not the
loss uses it; the learning rate warms up linearly over `optim.warmup_steps` rollout steps, then stays constant.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import algorithms, checkpoint, distributed, evaluation, models, rollout, stopping, tasks
from .config import Config
from .distributed import Ranks
from .logging import NullLogger, RunLogger, step_row
from .stopping import Stop  # noqa: F401  loop.Stop is what callers catch

Tensor = torch.Tensor


@dataclass
class Parts:
    """What `build` makes and every phase reads."""
    cfg: Config
    policy: torch.nn.Module
    opt: torch.optim.Optimizer | None = None
    sched: object = None
    tok: object = None
    task: tasks.Task | None = None
    ref_model: torch.nn.Module | None = None       # the frozen reference; None with LoRA (adapters off) or no KL
    use_ref: bool = False
    forward: torch.nn.Module | None = None         # rollout.PolicyForward(policy), DDP-wrapped with several ranks
    ranks: Ranks = field(default_factory=Ranks)
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"                        # trainer.precision with auto resolved
    sample_gen: torch.Generator | None = None
    engine: object = None                          # engine.VllmEngine with rollout.engine=vllm; None: our decode loop
    shuffle_gen: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(1))

    def __post_init__(self):
        self.forward = self.forward if self.forward is not None else rollout.PolicyForward(self.policy)

    def autocast(self):
        return models.autocast(self.device, self.precision)


@dataclass
class Batch:
    entries: list              # the prompts' task entries, one per prompt
    roll: rollout.Rollout      # B = prompts x G responses
    completions: list          # B decoded responses
    scores: list               # B verifier results: {'reward', 'correct', 'format', 'error'}
    rewards: Tensor            # (B,)
    generate_s: float = 0.0    # seconds in the sampler itself (the engine's or our decode loop), for time/generate


def build(cfg: Config, ranks: Ranks) -> Parts:
    """Seeds, task, tokenizer, policy (+ reference, + value head), optimizer and warm-up schedule, generators."""
    trainer = cfg.trainer
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    device = models.pick_device(trainer.device, ranks.local)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    task = tasks.build_task(cfg.task, cfg.seed)
    tok = models.load_tokenizer(cfg.model)
    policy = models.load_policy(cfg.model, tok, device, seed=cfg.seed)
    gae = algorithms.get(cfg.algo.name).advantage == "gae"
    use_ref = cfg.algo.beta > 0 or trainer.log_ref_kl or gae
    ref_model = models.frozen_copy(policy) if use_ref and not models.is_lora(policy) else None
    if gae:
        models.add_value_head(policy, separate=cfg.algo.critic == "separate")
    forward = rollout.PolicyForward(policy)
    if ranks.world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[ranks.local] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=gae and cfg.algo.critic == "separate")  # the critic copy's LM head is unused
    opt = models.build_optimizer(policy, cfg.optim)
    warmup = cfg.optim.warmup_steps * trainer.epochs * trainer.minibatches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: min(1.0, (u + 1) / warmup) if warmup else 1.0)
    precision = "bf16" if trainer.precision == "bf16" or (trainer.precision, device.type) == ("auto", "cuda") \
        else "fp32"
    vllm = None
    if cfg.rollout.engine == "vllm":
        from .engine import VllmEngine
        vllm = VllmEngine(cfg, policy, device, seed=cfg.seed + 1_000_003 * ranks.rank)
    return Parts(cfg, policy, opt, sched, tok, task, ref_model, use_ref, forward, ranks, device, precision,
                 sample_gen=torch.Generator(device).manual_seed(cfg.seed + 1_000_003 * ranks.rank),  # rank 0: 1-rank
                 engine=vllm, shuffle_gen=torch.Generator().manual_seed(cfg.seed + 1))


def sync_engine(p: Parts) -> float:
    """The policy's current weights into the rollout engine (after each update, after a resume) -> seconds."""
    return p.engine.sync(p.policy) if p.engine is not None else 0.0


@torch.no_grad()
def sample_and_score(p: Parts, entries: list, G: int, greedy: bool = False) -> Batch:
    """G responses per prompt (greedy: the argmax path), decoded and scored by the task's verifier."""
    p_ids, p_mask = tasks.encode(p.tok, p.task, entries, p.device)                       # (n, P)
    p.policy.eval()
    r = p.cfg.rollout
    t0 = time.perf_counter()
    if p.engine is not None:  # the engine's seed is drawn from the run's generator, so a resume replays it
        seed = int(torch.randint(2**31 - 1, (1,), generator=p.sample_gen, device=p.sample_gen.device))
        roll = p.engine.generate(p_ids, p_mask, G, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                 top_p=r.top_p, greedy=greedy, eos_id=p.tok.eos_token_id,
                                 pad_id=p.tok.pad_token_id, seed=seed)
    else:
        with p.autocast():
            roll = rollout.generate(p.policy, p_ids.repeat_interleave(G, 0), p_mask.repeat_interleave(G, 0),
                                    max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                    greedy=greedy, eos_id=p.tok.eos_token_id, pad_id=p.tok.pad_token_id,
                                    generator=p.sample_gen)
    generate_s = time.perf_counter() - t0
    completions = tasks.decode(p.tok, roll.ids, roll.mask)
    scores = [p.task.score(e, c) for e, c in zip([e for e in entries for _ in range(G)], completions)]
    rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32, device=p.device)   # (B,)
    return Batch(entries, roll, completions, scores, rewards, generate_s)


def minibatch_order(B: int, p: Parts) -> list[Tensor]:
    """Row indices of every update: trainer.epochs x trainer.minibatches shuffles of the B rows."""
    n, order = p.cfg.trainer.minibatches, []
    for _ in range(p.cfg.trainer.epochs):
        perm = torch.randperm(B, generator=p.shuffle_gen).to(p.device)                 # (B,)
        order += list(perm.view(n, B // n))
    return order


@torch.no_grad()
def old_logps(p: Parts, batch: Batch, first_epoch: list[Tensor]) -> Tensor:
    """π_old (B, T): the sampler's log-probs when the trainer computes as the sampler did (our decode loop, fp32
    weights, no autocast); otherwise (a rollout engine, bf16) a teacher-forced pass in the update's minibatch
    shapes and numerics, so that the first minibatch's ratio is 1 (bf16 kernels give different numbers for
    different shapes). That pass skips the first minibatch when nothing reads π_old before the update (group
    advantages, no rollout correction): its rows are NaN here and `update` fills them from its own first forward,
    taken before any step, so they are the same numbers without a second pass (on-policy: no pass at all)."""
    mode, roll, cfg = p.cfg.rollout.old_logp, batch.roll, p.cfg
    same_numerics = p.engine is None and p.precision == "fp32" and cfg.model.dtype == "float32"
    if mode == "sampler" or (mode == "auto" and same_numerics):
        return roll.logp
    defer = algorithms.get(cfg.algo.name).advantage == "group" and cfg.rollout.is_correction == "none"
    with p.autocast():
        out = rollout.per_minibatch(lambda *a: p.forward(*a, cfg.rollout.temperature, **pass_knobs(cfg)),
                                    roll, first_epoch[1:] if defer else first_epoch)              # (B, T)
    if defer:
        out[first_epoch[0]] = float("nan")                                                        # update fills these
    return out


@torch.no_grad()
def reference_logps(p: Parts, batch: Batch, order: list[Tensor]) -> Tensor | None:
    """log π_ref (B, T), minibatch by minibatch: the frozen copy, or with LoRA the policy with its adapters off."""
    if not p.use_ref:
        return None
    model = p.ref_model if p.ref_model is not None else p.policy
    adapters_off = p.policy.disable_adapter() if p.ref_model is None else contextlib.nullcontext()
    with p.autocast(), adapters_off:
        return rollout.per_minibatch(lambda *a: rollout.token_logps(model, *a, p.cfg.rollout.temperature,
                                                                    **pass_knobs(p.cfg)),
                                     batch.roll, order)


def advantages(p: Parts, batch: Batch, old_logp: Tensor, ref_logp: Tensor | None, order: list[Tensor]):
    """-> (adv, value_targets, metrics). Group advantages (B,); or, for a critic, GAE (B, T) on KL-shaped token
    rewards with value_targets = (old_values, returns), each (B, T), whitened over the global batch's tokens."""
    a, roll = p.cfg.algo, batch.roll
    if algorithms.get(a.name).advantage == "group":
        return algorithms.group_advantages(batch.rewards, a.group_size, a.scale_rewards), None, {}       # (B,)
    with torch.no_grad(), p.autocast():
        old_values = rollout.per_minibatch(lambda *x: rollout.values(p.policy, *x, p.cfg.trainer.share_prompt),
                                           roll, order)                                             # (B, T)
    token_r = algorithms.ppo_token_rewards(batch.rewards, old_logp, ref_logp, roll.mask, a.kl_coef)     # (B, T)
    adv, returns = algorithms.gae(token_r, old_values, roll.mask, a.gamma, a.lam)                       # (B, T) x2
    m = roll.mask.bool()
    var_r = returns[m].var()
    metrics = {"value/mean": old_values[m].mean().item(), "returns/mean": returns[m].mean().item(),
               "value/explained_variance": (1 - (returns[m] - old_values[m]).var() / var_r).item()
               if var_r > 0 else float("nan")}
    adv = algorithms.whiten(adv, roll.mask, total=lambda v: distributed.total(v, p.ranks))              # (B, T)
    return adv, (old_values, returns), metrics


def correction(p: Parts, batch: Batch, old_logp: Tensor) -> tuple[Tensor | None, dict]:
    """rollout.is_correction's weights for the gap between the sampler's log-probs and the trainer's π_old."""
    r, a = p.cfg.rollout, p.cfg.algo
    geometric = a.name == "gspo" and a.variant == "sequence"
    return algorithms.rollout_correction(old_logp, batch.roll.logp, batch.roll.mask, r.is_correction,
                                         r.is_threshold, geometric)


def pass_knobs(cfg: Config) -> dict:
    """The trainer's knobs of every log-prob pass (`rollout.token_logps`): LM-head chunk, shared prompt."""
    return dict(chunk=cfg.trainer.lm_head_chunk, share_prompt=cfg.trainer.share_prompt)


def loss_knobs(cfg: Config) -> dict:
    """cfg.algo's value of each knob the chosen loss declares; loss_agg=default keeps the loss's own default."""
    knobs = algorithms.get(cfg.algo.name).knobs()
    kw = {k: getattr(cfg.algo, k) for k in knobs}
    kw["loss_agg"] = knobs["loss_agg"] if kw["loss_agg"] == "default" else kw["loss_agg"]
    return kw


def update(p: Parts, batch: Batch, order: list[Tensor], adv: Tensor, old_logp: Tensor, ref_logp=None,
           value_targets=None, is_weight=None) -> dict:
    """One clipped optimizer step per minibatch in `order`; every stat the loss returns is folded over them.

    adv is (B,) (one per response) or (B, T) (per token, with value_targets = (old_values, returns)). With K ranks
    a minibatch is the union of every rank's local minibatch; DDP averages the ranks' gradients, which is the
    global mean for the per-sequence aggregations (equal sequences per rank) and, after the rescale below, for
    token_mean. rollout/logp_diff: mean |sampler − trainer| log-prob of the first minibatch before its step.
    is_weight (B, T): the rollout correction's per-token weights (`algorithms.rollout_correction`), or None.
    π_old rows of the first minibatch that `old_logps` left NaN are filled, in place, from its forward before its step.
    """
    cfg, roll, loss_fn, knobs = p.cfg, batch.roll, algorithms.get(p.cfg.algo.name).loss, loss_knobs(p.cfg)
    acc, norms, nonfinite, logp_diff = {}, [], 0, None
    p.policy.train()
    for idx in order:
        p_ids, p_mask, ids, mask = rollout.trim(roll.prompt_ids[idx], roll.prompt_mask[idx], roll.ids[idx],
                                                roll.mask[idx])
        cut = lambda x: None if x is None else x[idx][:, :ids.shape[1]]                 # noqa: E731  (b, t)
        with p.autocast():
            out = p.forward(p_ids, p_mask, ids, mask, cfg.rollout.temperature, with_values=value_targets is not None,
                            **pass_knobs(cfg))
        logp, critic_kw = out, {}                                                     # (b, t)
        if value_targets is not None:
            logp, values = out                                                        # (b, t) x2
            critic_kw = dict(values=values, old_values=cut(value_targets[0]), returns=cut(value_targets[1]))
        if logp_diff is None:
            logp_diff = algorithms.token_mean((logp.detach() - cut(roll.logp)).abs(), mask).item()
            if torch.isnan(old_logp[idx]).any():  # π_old deferred to this forward (`old_logps`)
                old_logp[idx] = 0.0
                old_logp[idx, :logp.shape[1]] = logp.detach()                        # (b, t) of (b, T)
        loss, stats = loss_fn(logp, cut(old_logp), adv[idx] if adv.dim() == 1 else cut(adv), mask,
                              ref_logp=cut(ref_logp), is_weight=cut(is_weight), **critic_kw, **knobs)
        scale = 1.0
        if p.ranks.world > 1 and knobs["loss_agg"] == "token_mean":  # local token mean -> share of global mean
            n = mask.sum().item()
            scale = n * p.ranks.world / max(distributed.all_sum(n, p.ranks, p.device), 1.0)
        norm, bad = optimizer_step(p, loss * scale)
        norms.append(norm)
        nonfinite += bad
        algorithms.fold(acc, stats)
    return {**algorithms.folded(acc), "grad/norm": float(np.mean(norms)), "grad/nonfinite": nonfinite, "rollout/logp_diff": logp_diff}


def optimizer_step(p: Parts, loss: Tensor) -> tuple[float, bool]:
    """Backward, clip, step -> (pre-clip grad norm, skipped). A non-finite loss or norm on any rank skips the step
    on every rank, or their weights would diverge."""
    p.opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(p.policy.parameters(), p.cfg.trainer.max_grad_norm)
    bad = distributed.any_rank(not (torch.isfinite(loss) and torch.isfinite(norm)), p.ranks, p.device)
    if not bad:
        p.opt.step()
        if not finite([q for q in p.policy.parameters() if q.requires_grad]):
            raise stopping.Stop(f"the weights became non-finite in an optimizer step (optim.lr={p.cfg.optim.lr:g}); they are "
                       "not checkpointed: the last checkpoint holds the last good weights", 3)
    p.sched.step()
    return norm.item(), bad


def finite(tensors: list[Tensor]) -> bool:
    """All entries finite. One fused norm over every tensor (~6x faster than a check per tensor: `python
    bench/limits.py`); a finite norm proves it, and only a non-finite one (or a sum of squares past fp32's range)
    needs the exact check."""
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors))) or \
        all(bool(torch.isfinite(q).all()) for q in tensors)


@torch.no_grad()
def evaluate(p: Parts, details: dict | None = None) -> dict:
    """The held-out set (split across ranks, in batches as large as a rollout's): greedy eval/accuracy and
    eval/reward; with eval.samples = n > 1 also n samples per prompt for pass@k and maj@n (`evaluation.summarize`)."""
    size, n = p.cfg.trainer.prompts_per_step // p.ranks.world * p.cfg.algo.group_size, p.cfg.eval.samples
    mine, greedy, sampled = p.task.eval_entries[p.ranks.rank::p.ranks.world], [], []
    for i in range(0, len(mine), size):
        greedy += sample_and_score(p, mine[i:i + size], 1, greedy=True).scores
    per_batch = max(1, size // n)                                      # prompts per batch of n samples each
    for i in range(0, len(mine) if n > 1 else 0, per_batch):
        scores = sample_and_score(p, mine[i:i + per_batch], n).scores
        sampled += [scores[j:j + n] for j in range(0, len(scores), n)]
    gathered = [[x for part in distributed.gather_objects(lst, p.ranks) for x in part] for lst in (greedy, sampled)]
    return evaluation.summarize(*gathered, list(p.cfg.eval.k) or sorted({1, n}), details)


def train(cfg: Config, run_dir: Path, config_dict: dict, resume_state: dict | None = None) -> list[dict]:
    """Run (or continue) one training run in `run_dir`; returns the logged metric rows (rank 0; [] elsewhere)."""
    ranks, log, p = distributed.setup(), NullLogger(), None
    trainer, G = cfg.trainer, cfg.algo.group_size
    try:
        with stopping.caught_signals() as caught:
            p = build(cfg, ranks)
            start, cursor, wandb_id = checkpoint.restore(p, resume_state, run_dir)
            if resume_state is not None:
                sync_engine(p)
            if ranks.main:
                log = RunLogger(run_dir, config_dict, steps=trainer.steps, start_step=start,
                                wandb_cfg=cfg.logger.wandb, wandb_id=wandb_id)
            if start == 0 and trainer.eval_every:
                log.log(evaluate(p), step=0)
            share, bad_steps = trainer.prompts_per_step // ranks.world, 0
            for step in range(start + 1, trainer.steps + 1):
                t0 = time.perf_counter()
                entries, cursor = p.task.next_batch(cursor, trainer.prompts_per_step)   # the global batch
                batch = sample_and_score(p, entries[ranks.rank * share:(ranks.rank + 1) * share], G)  # this rank's
                order = minibatch_order(len(batch.rewards), p)
                old_logp = old_logps(p, batch, order[:trainer.minibatches])                       # (B, T)
                ref_logp = reference_logps(p, batch, order[:trainer.minibatches])                 # (B, T) | None
                adv, value_targets, adv_metrics = advantages(p, batch, old_logp, ref_logp, order[:trainer.minibatches])
                is_weight, is_metrics = correction(p, batch, old_logp)                                # (B, T) | None
                t1 = time.perf_counter()
                stats = update(p, batch, order, adv, old_logp, ref_logp if cfg.algo.beta > 0 else None, value_targets,
                               is_weight)
                stats.update(is_metrics)
                stats["time/generate"] = batch.generate_s
                if p.engine is not None:
                    stats["time/weight_sync"] = sync_engine(p)
                metrics = step_row(p, batch, old_logp, ref_logp, {**stats, **adv_metrics}, t0, t1,
                                       time.perf_counter())
                if trainer.eval_every and (step % trainer.eval_every == 0 or step == trainer.steps):
                    metrics.update(evaluate(p))
                log.log(metrics, step)
                log.samples([{"step": step, "prompt": batch.entries[i // G]["question"],
                              "completion": batch.completions[i], "answer": batch.entries[i // G]["answer"],
                              "reward": batch.scores[i]["reward"]}
                             for i in range(min(trainer.samples_per_step, len(batch.completions)))])
                bad_steps = bad_steps + 1 if stats["grad/nonfinite"] else 0
                signalled = distributed.any_rank("signal" in caught, ranks, p.device)
                stop = signalled or bad_steps > trainer.max_nonfinite
                if step % trainer.save_every == 0 or step == trainer.steps or stop:
                    checkpoint.save_run(p, run_dir, step, cursor, log.wandb_id, config_dict)  # skipped updates: last good state
                if stop:
                    raise stopping.reason(caught if signalled else None, step, bad_steps, trainer.max_nonfinite, run_dir)
        return log.history
    finally:
        log.close()
        if p is not None and p.engine is not None:
            p.engine.close()
        distributed.teardown(ranks)
