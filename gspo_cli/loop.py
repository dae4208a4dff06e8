"""The one RL loop. GSPO, GRPO and PPO share every line here except the loss (`algorithms.LOSSES[name]`) and, for
PPO, whether a value is computed: PPO here is PPO-clip with a critic (a value head on the policy trunk, or a separate
copy) and GAE on KL-shaped per-token rewards, as in RLHF (Ouyang et al. 2022), not a critic-free variant.

    for step: rollout (KV-cached sampling, log-probs kept as old_logp) -> verifier rewards -> group advantages
              -> reference log-probs (when a KL is used or logged) -> epochs x minibatches of clipped updates
              -> metrics.jsonl + W&B -> eval every N -> atomic checkpoint every N

Deviations worth knowing: `old_logp` is the sampler's log-prob (fp32, same temperature), so the first minibatch's
ratio is 1 up to kernel rounding (~1e-6), not bit-exactly; `kl/ref` is k3(π_old, π_ref) on the rollout, logged for
every algorithm whether or not the loss uses it; the learning rate warms up linearly over `optim.warmup_steps`
rollout steps, then stays constant.
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from . import algorithms, checkpoint, distributed, models, rollout, tasks
from .distributed import Ranks
from .config import Config, ConfigError
from .logging import RunLogger, console


class Stop(Exception):
    """The run stopped early on purpose (a signal, or too many non-finite steps), after saving a checkpoint."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _catch_signals() -> dict:
    """SIGTERM (SLURM pre-emption) and SIGINT: finish the current step, checkpoint, then stop."""
    caught = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: caught.setdefault("signal", signum))
    return caught


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device='cuda' but no CUDA device is visible: expected 'cpu' or 'auto'")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast(device: torch.device, precision: str):
    """trainer.precision=bf16: forwards under bf16 autocast (weights stay in their dtype, fp32 by default); the
    log-probs, the loss and the optimizer run in fp32 because `token_logps` casts logits to fp32 first."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class Scorer(torch.nn.Module):
    """`rollout.token_logps` as a module's forward, so that DDP's gradient hooks see the update's forward pass."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, *args, **kwargs):
        return rollout.token_logps(self.policy, *args, **kwargs)


def build_optimizer(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optim=adamw8bit needs bitsandbytes: expected `pip install bitsandbytes`") from None
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def encode(tok, task, entries, device):
    texts = [tok.apply_chat_template(task.messages(e), tokenize=False, add_generation_prompt=True) for e in entries]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def decode(tok, ids, mask) -> list[str]:
    lengths = mask.sum(-1).long().tolist()
    return [tok.decode(row[:n].tolist(), skip_special_tokens=True) for row, n in zip(ids, lengths)]


@torch.no_grad()
def evaluate(policy, tok, task, cfg: Config, device, batch_size: int = 32, ranks: Ranks = Ranks()) -> dict:
    """Greedy decoding on the held-out set (split across ranks): eval/accuracy (verifier says correct), eval/reward."""
    mine, scores = task.eval_entries[ranks.rank::ranks.world], []
    for i in range(0, len(mine), batch_size):
        entries = mine[i:i + batch_size]
        p_ids, p_mask = encode(tok, task, entries, device)
        with autocast(device, cfg.trainer.precision):
            r = rollout.generate(policy, p_ids, p_mask, max_new_tokens=cfg.rollout.max_new_tokens, greedy=True,
                                 eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        scores += [task.score(e, c) for e, c in zip(entries, decode(tok, r.ids, r.mask))]
    scores = [s for part in distributed.gather_objects(scores, ranks) for s in part]
    return {"eval/accuracy": float(np.mean([s["correct"] for s in scores])),
            "eval/reward": float(np.mean([s["reward"] for s in scores]))}


def update(policy, opt, sched, roll, adv, ref_logp, cfg: Config, shuffle_gen, loss_kw, critic=None, scorer=None,
           ranks: Ranks = Ranks()) -> dict:
    """trainer.epochs x trainer.minibatches optimizer steps on one rollout batch; stats token-weighted.

    adv is (B,) (one per response: GSPO, GRPO) or (B, T) (per token: PPO, which also passes
    critic = (old_values, returns), each (B, T)). `scorer` is the policy's log-prob forward (DDP-wrapped with
    several ranks). With K ranks a minibatch is the union of every rank's local minibatch; DDP averages the
    ranks' gradients, which is the global mean for the per-sequence aggregations (equal sequences per rank)
    and, after the rescale below, for token_mean.
    """
    loss_fn = algorithms.get_loss(cfg.algo.name)
    scorer = scorer if scorer is not None else Scorer(policy)
    device = adv.device
    B, n_mb = adv.shape[0], cfg.trainer.minibatches
    size = B // n_mb
    sums, rmin, rmax, losses, v_losses, norms, nonfinite = {}, math.inf, -math.inf, [], [], [], 0
    policy.train()
    for _ in range(cfg.trainer.epochs):
        perm = torch.randperm(B, generator=shuffle_gen).to(device)
        for k in range(n_mb):
            idx = perm[k * size:(k + 1) * size]
            p_ids, p_mask, ids, mask = rollout.trim(roll.prompt_ids[idx], roll.prompt_mask[idx], roll.ids[idx],
                                                    roll.mask[idx])
            T = ids.shape[1]
            ref = ref_logp[idx][:, :T] if ref_logp is not None else None
            with autocast(device, cfg.trainer.precision):
                out = scorer(p_ids, p_mask, ids, mask, cfg.rollout.temperature, with_values=critic is not None)
            if critic is None:
                logp = out                                                                          # (b, T)
                loss, st = loss_fn(logp, roll.logp[idx][:, :T], adv[idx], mask, ref_logp=ref, **loss_kw)
            else:
                logp, values = out                                                                  # (b, T) x2
                loss, st = loss_fn(logp, roll.logp[idx][:, :T], adv[idx][:, :T], mask, ref_logp=ref, values=values,
                                   old_values=critic[0][idx][:, :T], returns=critic[1][idx][:, :T], **loss_kw)
            scale = 1.0
            if ranks.world > 1 and loss_kw["loss_agg"] == "token_mean":  # local token mean -> share of global mean
                n = mask.sum().item()
                scale = n * ranks.world / max(distributed.all_sum(n, ranks, device), 1.0)
            opt.zero_grad(set_to_none=True)
            (loss * scale).backward()
            norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.trainer.max_grad_norm)
            bad = not (torch.isfinite(loss) and torch.isfinite(norm))
            if distributed.any_rank(bad, ranks, device):  # every rank skips together, or weights would diverge
                nonfinite += 1
            else:
                opt.step()
            sched.step()
            losses.append(st.get("loss/policy", loss.item()))
            v_losses.append(st.get("loss/value", 0.0))
            norms.append(norm.item())
            for key, w in (("clip/frac", "tokens"), ("clip/frac_low", "tokens"), ("clip/frac_high", "tokens"),
                           ("ratio/mean", "ratios"), ("kl/loss", "tokens")):
                if key in st:
                    sums[key] = sums.get(key, 0.0) + st[key] * st[w]
                    sums[key + "#w"] = sums.get(key + "#w", 0.0) + st[w]
            rmin, rmax = min(rmin, st["ratio/min"]), max(rmax, st["ratio/max"])
    out = {k: sums[k] / max(sums[k + "#w"], 1.0) for k in sums if not k.endswith("#w")}
    return {**out, "ratio/min": rmin, "ratio/max": rmax, "loss/policy": float(np.mean(losses)),
            "loss/value": float(np.mean(v_losses)),
            "grad/norm": float(np.mean(norms)), "grad/nonfinite": nonfinite}


def loss_kwargs(cfg: Config) -> dict:
    a = cfg.algo
    kw = dict(eps_low=a.eps_low, eps_high=a.eps_high, beta=a.beta,
              loss_agg=algorithms.DEFAULT_AGG[a.name] if a.loss_agg == "default" else a.loss_agg)
    if a.name == "gspo":
        kw["variant"] = a.variant
    if a.name == "ppo":
        kw.update(vf_coef=a.vf_coef, value_clip=a.value_clip)
    return kw


@torch.no_grad()
def ppo_targets(policy, roll, rewards, ref_logp, cfg: Config, ranks: Ranks = Ranks()):
    """PPO only: the rollout policy's values (one extra no-grad forward), KL-shaped token rewards, GAE advantages
    (whitened over the global batch's response tokens) and returns. -> adv (B, T), (old_values, returns), metrics."""
    a = cfg.algo
    old_values = rollout.values(policy, roll.prompt_ids, roll.prompt_mask, roll.ids, roll.mask)       # (B, T)
    token_r = algorithms.ppo_token_rewards(rewards, roll.logp, ref_logp, roll.mask, a.kl_coef)      # (B, T)
    adv, returns = algorithms.gae(token_r, old_values, roll.mask, a.gamma, a.lam)                   # (B, T) x2
    m = roll.mask.bool()
    var_r = returns[m].var()
    metrics = {"value/mean": old_values[m].mean().item(), "returns/mean": returns[m].mean().item(),
               "value/explained_variance": (1 - (returns[m] - old_values[m]).var() / var_r).item()
               if var_r > 0 else float("nan")}
    adv = algorithms.whiten(adv, roll.mask, total=lambda v: distributed.total(v, ranks))             # (B, T)
    return adv, (old_values, returns), metrics


def reference_logps(ref_model, policy, roll, cfg: Config, device) -> torch.Tensor:
    """log π_ref of the rollout's tokens (B, T): the frozen copy, or with LoRA the policy with its adapters off."""
    adapters_off = policy.disable_adapter() if ref_model is None else contextlib.nullcontext()
    with torch.no_grad(), autocast(device, cfg.trainer.precision), adapters_off:
        return rollout.token_logps(ref_model if ref_model is not None else policy, roll.prompt_ids, roll.prompt_mask,
                                   roll.ids, roll.mask, cfg.rollout.temperature)


def row_metrics(rewards, scores, roll, G: int, ranks: Ranks) -> dict:
    """Per-response metrics over the global batch: every rank's rows gathered (whole groups per rank)."""
    per_row = [[s["correct"], s["format"], s["error"]] for s in scores]
    rows = torch.cat([rewards[:, None], torch.tensor(per_row, dtype=torch.float32, device=rewards.device),
                      roll.mask.sum(-1, keepdim=True), (~roll.finished).float()[:, None]], dim=1)            # (B, 6)
    r, correct, fmt, err, lengths, clipped = distributed.gather(rows, ranks).T.contiguous()             # (B_all,) x6
    return {"reward/mean": r.mean().item(), "reward/std": r.std().item(), "reward/accuracy": correct.mean().item(),
            "reward/format": fmt.mean().item(), "reward/verifier_errors": err.sum().item(),
            "reward/zero_std_frac": (r.view(-1, G).std(-1) == 0).float().mean().item(),
            "len/mean": lengths.mean().item(), "len/clipped_frac": clipped.mean().item()}


def train(cfg: Config, run_dir: Path, config_dict: dict, resume_state: dict | None = None) -> list[dict]:
    """Run (or continue) one training run in `run_dir`; returns the logged metric rows (rank 0; [] elsewhere)."""
    ranks = distributed.setup()
    try:
        return _train(cfg, run_dir, config_dict, resume_state, ranks)
    finally:
        distributed.teardown(ranks)


def _train(cfg: Config, run_dir: Path, config_dict: dict, resume_state: dict | None, ranks: Ranks) -> list[dict]:
    t, G = cfg.trainer, cfg.algo.group_size
    if t.threads:
        torch.set_num_threads(t.threads)
    device = pick_device(t.device, ranks.local)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    task = tasks.build_task(cfg.task, cfg.seed)
    tok = models.load_tokenizer(cfg.model)
    policy = models.load_policy(cfg.model, tok, device, seed=cfg.seed)
    ppo = cfg.algo.name == "ppo"
    use_ref = cfg.algo.beta > 0 or t.log_ref_kl or ppo
    lora = models.is_lora(policy)
    ref_model = models.frozen_copy(policy) if use_ref and not lora else None
    if ppo:
        models.add_value_head(policy, separate=cfg.algo.critic == "separate")
    scorer = Scorer(policy)
    if ranks.world > 1:
        scorer = torch.nn.parallel.DistributedDataParallel(
            scorer, device_ids=[ranks.local] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=cfg.algo.critic == "separate" and ppo)  # the critic copy's LM head is unused
    opt = build_optimizer(policy, cfg.optim)
    warmup = cfg.optim.warmup_steps * t.epochs * t.minibatches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: min(1.0, (u + 1) / warmup) if warmup else 1.0)
    sample_gen = torch.Generator(device).manual_seed(cfg.seed + 1_000_003 * ranks.rank)  # rank 0: the 1-rank stream
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
    start, cursor, wandb_id = 0, 0, None
    if resume_state is not None:
        models.load_trainable_state(policy, resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        saved_rngs = resume_state.get("rng_ranks", [resume_state["rng"]])
        if len(saved_rngs) != ranks.world:
            raise ConfigError(f"resume={str(run_dir)!r} was written by {len(saved_rngs)} rank(s), this run has "
                              f"{ranks.world}: expected trainer.devices={len(saved_rngs)} to continue it exactly")
        checkpoint.set_rng_state(saved_rngs[ranks.rank], sample_gen, shuffle_gen)
        start, cursor, wandb_id = resume_state["step"], resume_state["cursor"], resume_state["wandb_id"]
        if ranks.main:
            console.print(f"resumed from step {start}", highlight=False)
    log = RunLogger(run_dir, config_dict, steps=t.steps, start_step=start, wandb_cfg=cfg.logger.wandb,
                    wandb_id=wandb_id) if ranks.main else None
    kw = loss_kwargs(cfg)
    share = t.prompts_per_step // ranks.world

    def save(step):
        rngs = distributed.gather_objects(checkpoint.rng_state(sample_gen, shuffle_gen), ranks)
        if ranks.main:
            state = {"step": step, "cursor": cursor, "wandb_id": log.wandb_id, "config": config_dict,
                     "model": models.trainable_state(policy), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "rng": rngs[0], "rng_ranks": rngs}
            checkpoint.save(run_dir, step, state, t.keep_last)

    caught, bad_steps = _catch_signals(), 0
    if start == 0 and t.eval_every:
        ev = evaluate(policy, tok, task, cfg, device, ranks=ranks)
        if ranks.main:
            log.log(ev, step=0)
    for step in range(start + 1, t.steps + 1):
        t0 = time.perf_counter()
        batch, cursor = task.next_batch(cursor, t.prompts_per_step)    # the global batch; this rank's share:
        entries = batch[ranks.rank * share:(ranks.rank + 1) * share]
        p_ids, p_mask = encode(tok, task, entries, device)
        policy.eval()
        with autocast(device, t.precision):
            roll = rollout.generate(policy, p_ids.repeat_interleave(G, 0), p_mask.repeat_interleave(G, 0),
                                    max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                    top_p=cfg.rollout.top_p, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                    generator=sample_gen)
        completions = decode(tok, roll.ids, roll.mask)
        scores = [task.score(e, c) for e, c in zip([e for e in entries for _ in range(G)], completions)]
        rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32, device=device)   # (B,)
        ref_logp = reference_logps(ref_model, policy, roll, cfg, device) if use_ref else None    # (B, T)
        critic, value_metrics = None, {}
        if ppo:
            with autocast(device, t.precision):
                adv, critic, value_metrics = ppo_targets(policy, roll, rewards, ref_logp, cfg, ranks)  # (B, T)
        else:
            adv = algorithms.group_advantages(rewards, G, cfg.algo.scale_rewards)                   # (B,)
        t1 = time.perf_counter()
        stats = update(policy, opt, sched, roll, adv, ref_logp if cfg.algo.beta > 0 else None, cfg, shuffle_gen, kw,
                       critic, scorer=scorer, ranks=ranks)
        t2 = time.perf_counter()
        mask = roll.mask
        tokens = mask.sum().item()
        metrics = distributed.reduce_metrics({
            **stats,
            "kl/ref": algorithms.token_mean(algorithms.k3_kl(roll.logp, ref_logp), mask).item()
            if ref_logp is not None else float("nan"),
            "entropy": algorithms.token_mean(roll.entropy, mask).item(),
            **value_metrics,
            "lr": sched.get_last_lr()[0],
            "time/rollout": t1 - t0, "time/update": t2 - t1, "time/step": t2 - t0,
            "tokens_per_s": tokens * (1 + t.epochs) / (t2 - t0),
        }, ranks, device)
        metrics = {**row_metrics(rewards, scores, roll, G, ranks), **metrics}
        if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
            metrics.update(evaluate(policy, tok, task, cfg, device, ranks=ranks))
        if ranks.main:
            log.log(metrics, step)
            log.samples([{"step": step, "prompt": entries[i // G]["question"], "completion": completions[i],
                          "answer": entries[i // G]["answer"], "reward": scores[i]["reward"]}
                         for i in range(min(t.samples_per_step, len(completions)))])
        bad_steps = bad_steps + 1 if stats["grad/nonfinite"] else 0
        signalled = distributed.any_rank("signal" in caught, ranks, device)
        stop = signalled or bad_steps > t.max_nonfinite
        if step % t.save_every == 0 or step == t.steps or stop:
            save(step)  # skipped updates leave the weights as they were: this is the last good state
        if stop:
            if log is not None:
                log.close()
            if signalled:  # another rank may have caught it: this one reports SIGTERM, what SLURM and torchrun send
                sig = signal.Signals(caught.get("signal", signal.SIGTERM))
                raise Stop(f"stopped by {sig.name} after step {step}; checkpoint saved; continue with resume={run_dir}",
                           128 + sig)
            raise Stop(f"trainer.max_nonfinite={t.max_nonfinite} exceeded: {bad_steps} steps in a row had a non-finite "
                       f"loss or gradient (last at step {step}); the last good weights are checkpointed in {run_dir}; "
                       "lower optim.lr or check the rewards", 3)
    if log is None:
        return []
    log.close()
    return log.history
