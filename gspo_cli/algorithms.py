"""The math of GSPO, GRPO, DAPO and PPO as pure functions of tensors (torch only: no models, no config objects).

Notation: B responses, T response positions; `logp`, `old_logp`, `ref_logp` are (B, T) log-probs of
the sampled tokens under the current, the sampling and the reference policy; `mask` (B, T) is 1 on response
tokens; `adv` (B,) one advantage per response. Every loss returns `(loss, stats)`: `loss` is the scalar to
minimise (the negated objective), `stats` plain floats with the metric names of README "Metrics" plus the weights
(`tokens`, `ratios`) the loop averages them with over minibatches (`FOLD` says which stat takes which).

One algorithm = one loss function + one entry in `ALGORITHMS`. A loss's keyword arguments with a float or string
default are its knobs: the loop passes `cfg.algo.<knob>` for each, and config validation refuses any other
`algo.*` key that the chosen algorithm never reads.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch

Tensor = torch.Tensor
LOG_RATIO_CLAMP = 20.0  # exp overflow guard only (as verl core_algos: clamp log-ratio at ±20 before exp)


def token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Σ_{i,t} x·mask / Σ_{i,t} mask — DAPO's token-level aggregation (arXiv 2503.14476, eq. 12)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def seq_mean_token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(1/B) Σ_i (1/|y_i|) Σ_t x_{i,t} — GRPO eq. 3 and GSPO eq. 5; an empty row counts as 0 (as TRL)."""
    return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


AGGREGATIONS = {"seq_mean_token_mean": seq_mean_token_mean, "token_mean": token_mean}


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """A_i = (r_i − mean_G r) / (std_G r + eps), GRPO §4.1.2 outcome supervision; std is the sample std (N−1).

    rewards (B,) ordered group by group -> (B,). A group whose rewards are all equal gets exactly 0.
    `scale=False` keeps only the centring (Dr. GRPO, arXiv 2503.20783).
    """
    r = rewards.view(-1, group_size)                                   # (B/G, G)
    centred = r - r.mean(-1, keepdim=True)                             # (B/G, G)
    if scale:
        centred = centred / (r.std(-1, keepdim=True) + eps)            # (B/G, G)
    return centred.reshape(-1)                                         # (B,)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """KL_t = π_ref/π_θ − log(π_ref/π_θ) − 1 (Schulman's k3; GRPO eq. 4): unbiased, ≥ 0. (B, T) -> (B, T)."""
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)      # (B, T)
    return d.exp() - d - 1


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """log s_i = (1/|y_i|) Σ_t (logp − old_logp): GSPO eq. 7, s_i = (π_θ(y_i|x)/π_old(y_i|x))^{1/|y_i|}. -> (B, 1)."""
    return ((logp - old_logp) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)


def clipped_surrogate(log_ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float):
    """−min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A), PPO eq. 7 (arXiv 1707.06347). log_ratio (B, T) or (B, 1); adv broadcasts.

    Returns (per-element loss, ratio, binding): `binding` marks where the clipped branch is selected and strictly
    smaller, so the element's policy gradient is zero (the definition behind the clip/frac metric).
    """
    ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # (B, T|1)
    unclipped = ratio * adv                                            # (B, T|1)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv             # (B, T|1)
    return -torch.minimum(unclipped, clipped), ratio, clipped < unclipped


def clip_stats(ratio: Tensor, binding: Tensor, adv: Tensor, mask: Tensor, ratio_mask: Tensor) -> dict:
    """Token-weighted clip fractions and the ratio's range over `ratio_mask` (the elements the algorithm clips)."""
    binding = binding.expand_as(mask) * mask                           # (B, T)
    low = binding * (adv.expand_as(mask) < 0)                          # ratio < 1−ε_low with A < 0
    tokens = mask.sum().clamp(min=1)
    r = ratio.expand_as(ratio_mask)[ratio_mask.bool()]                 # (n,)
    return {
        "clip/frac": (binding.sum() / tokens).item(),
        "clip/frac_low": (low.sum() / tokens).item(),
        "clip/frac_high": ((binding.sum() - low.sum()) / tokens).item(),
        "ratio/mean": r.mean().item() if r.numel() else 1.0,
        "ratio/min": r.min().item() if r.numel() else 1.0,
        "ratio/max": r.max().item() if r.numel() else 1.0,
        "tokens": mask.sum().item(),
        "ratios": float(r.numel()),
    }


def _with_kl(loss_tok: Tensor, logp: Tensor, ref_logp: Tensor | None, beta: float, stats: dict, mask: Tensor,
             is_weight: Tensor | None = None):
    """(B, T) per-token loss: the policy term, times the rollout-correction weight if any (`rollout_correction`;
    the KL term is not reweighted), plus β·KL to the reference."""
    if is_weight is not None:
        loss_tok = loss_tok * is_weight                                 # (B, T)
    if beta > 0:
        if ref_logp is None:
            raise ValueError(f"beta={beta} > 0 needs ref_logp (the reference policy's log-probs)")
        kl = k3_kl(logp, ref_logp)                                      # (B, T)
        loss_tok = loss_tok + beta * kl
        stats["kl/loss"] = token_mean(kl.detach(), mask).item()
    return loss_tok


def gspo_loss(logp, old_logp, adv, mask, *, eps_low=3e-4, eps_high=4e-4, beta=0.0, ref_logp=None,
              variant="sequence", loss_agg="seq_mean_token_mean", is_weight=None):
    """GSPO, Zheng et al. 2025 (arXiv 2507.18071), eq. 5–7; `variant="token"` is GSPO-token, eq. 13–14.

    J = (1/G) Σ_i min(s_i A_i, clip(s_i, 1−ε_low, 1+ε_high) A_i), s_i the length-normalised sequence ratio.
    GSPO-token: s_{i,t} = sg[s_i]·π_θ(y_t)/sg[π_θ(y_t)] — the same value per token, the same gradient when
    A is per sequence. The per-sequence term is spread over its tokens and aggregated by `loss_agg`
    (the default seq_mean_token_mean is exactly eq. 5's mean over sequences). Shapes: (B, T), adv (B,).
    """
    log_s = sequence_log_ratio(logp, old_logp, mask)                   # (B, 1)
    if variant == "token":
        log_s = log_s.detach() + logp - logp.detach()                  # (B, T): value log s_i, grad ∇logp_t
    loss, ratio, binding = clipped_surrogate(log_s, adv[:, None], eps_low, eps_high)   # (B, 1|T)
    ratio_mask = mask if variant == "token" else (mask.sum(-1, keepdim=True) > 0).float()   # (B, T|1)
    stats = clip_stats(ratio.detach(), binding, adv[:, None], mask, ratio_mask)
    loss_tok = _with_kl(loss.expand_as(mask), logp, ref_logp, beta, stats, mask, is_weight)   # (B, T)
    return _policy_loss(AGGREGATIONS[loss_agg](loss_tok, mask), stats)


def grpo_loss(logp, old_logp, adv, mask, *, eps_low=0.2, eps_high=0.2, beta=0.04, ref_logp=None,
              loss_agg="seq_mean_token_mean", is_weight=None):
    """GRPO, Shao et al. 2024 (arXiv 2402.03300), eq. 3: token ratio ρ_{i,t} = π_θ/π_old,
    J = (1/G) Σ_i (1/|y_i|) Σ_t [min(ρA_i, clip(ρ, 1−ε, 1+ε)A_i) − β KL_{i,t}], KL the k3 estimator (eq. 4).
    `loss_agg="token_mean"` is DAPO's aggregation; eps_high > eps_low is DAPO's clip-higher. Shapes: (B, T), adv (B,).
    """
    loss, ratio, binding = clipped_surrogate(logp - old_logp, adv[:, None], eps_low, eps_high)  # (B, T)
    stats = clip_stats(ratio.detach(), binding, adv[:, None], mask, mask)
    loss_tok = _with_kl(loss, logp, ref_logp, beta, stats, mask, is_weight)      # (B, T)
    return _policy_loss(AGGREGATIONS[loss_agg](loss_tok, mask), stats)


def dapo_loss(logp, old_logp, adv, mask, *, eps_low=0.2, eps_high=0.28, beta=0.0, ref_logp=None,
              loss_agg="token_mean", is_weight=None):
    """DAPO, Yu et al. 2025 (arXiv 2503.14476), eq. 8: GRPO's token ratio with clip-higher (ε_low 0.2,
    ε_high 0.28, §3.1) and the token-level mean over the whole batch (eq. 12), no KL (§2.3). Dynamic sampling and
    the overlong penalty (§3.2, §3.4) are not part of the loss and not applied. Shapes: (B, T), adv (B,)."""
    return grpo_loss(logp, old_logp, adv, mask, eps_low=eps_low, eps_high=eps_high, beta=beta, ref_logp=ref_logp,
                     loss_agg=loss_agg, is_weight=is_weight)


def rollout_correction(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, mode: str, threshold: float,
                       geometric: bool) -> tuple[Tensor | None, dict]:
    """Importance weights for the sampler/trainer mismatch -> ((B, T) detached weights or None, stats).

    The rollout was drawn from the engine's μ, while the objective's π_old is the trainer's recomputation, so
    each token carries π_old(y_t)/μ(y_t). `token_truncate` (truncated IS) weights each token by
    min(π_old/μ, C); `sequence_mask` keeps a response (weight 1) while its sequence ratio lies in [1/C, C] and
    drops it (weight 0) otherwise, the ratio being the geometric mean over tokens for GSPO (as GSPO's own ratio,
    eq. 7) and the product for token-level objectives. Shapes: (B, T), mask (B, T) 0/1.
    """
    if mode == "none":
        return None, {}
    log_w = (old_logp - sampler_logp) * mask                           # (B, T)
    tokens = mask.sum().clamp(min=1)
    if mode == "token_truncate":
        raw = log_w.exp()                                              # (B, T)
        w = raw.clamp(max=threshold) * mask                            # (B, T)
        cut = ((raw > threshold) * mask).sum() / tokens
        return w.detach(), {"rollout_is/truncated_frac": cut.item(), "rollout_is/mean_weight": (w.sum() / tokens).item()}
    log_s = sequence_log_ratio(log_w, torch.zeros_like(log_w), mask) if geometric else log_w.sum(-1, keepdim=True)
    keep = (log_s.abs() <= math.log(threshold)).float()               # (B, 1)
    w = keep * mask                                                    # (B, T)
    return w.detach(), {"rollout_is/masked_frac": 1.0 - keep.mean().item(), "rollout_is/mean_weight": (w.sum() / tokens).item()}


def _policy_loss(loss: Tensor, stats: dict):
    stats["loss/policy"], stats["loss/value"] = loss.item(), 0.0
    return loss, stats


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8, total=lambda v: v) -> Tensor:
    """(x − mean) / std over the masked elements, unbiased variance (verl `masked_whiten`). (B, T) -> (B, T).
    `total` sums a scalar over data-parallel ranks, so K ranks whiten with the statistics of the global batch."""
    n = total(mask.sum())
    mean = total((x * mask).sum()) / n.clamp(min=1)
    var = total((((x - mean) * mask) ** 2).sum()) / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def ppo_token_rewards(rewards: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """r_t = −β_kl (log π_old − log π_ref) on every response token, + R on the last one (Ouyang et al. 2022,
    arXiv 2203.02155, eq. 2; Ziegler et al. 2019). rewards (B,), the rest (B, T) -> (B, T)."""
    r = -kl_coef * (old_logp - ref_logp) * mask                        # (B, T)
    lengths = mask.sum(-1).long()                                      # (B,)
    last = (lengths - 1).clamp(min=0)                                  # (B,)
    rows = torch.arange(r.shape[0], device=r.device)
    return r.index_put((rows, last), r[rows, last] + rewards * (lengths > 0))


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95):
    """GAE, Schulman et al. 2016 (arXiv 1506.02438, eq. 16): δ_t = r_t + γV_{t+1} − V_t, A_t = δ_t + γλA_{t+1},
    over response tokens only (V and A after a response's last token are 0). (B, T) x3 -> (advantages, returns)."""
    T = token_rewards.shape[1]
    adv = torch.zeros_like(token_rewards)                              # (B, T)
    carry = torch.zeros_like(token_rewards[:, 0])                      # (B,)
    for t in reversed(range(T)):
        nxt = mask[:, t + 1] if t + 1 < T else torch.zeros_like(carry)  # (B,) 1 while the response goes on
        next_v = values[:, t + 1] * nxt if t + 1 < T else torch.zeros_like(carry)
        delta = token_rewards[:, t] + gamma * next_v - values[:, t]
        carry = delta + gamma * lam * carry * nxt
        adv[:, t] = carry * mask[:, t]
    return adv, (adv + values) * mask


def ppo_loss(logp, old_logp, adv, mask, *, values, old_values, returns, eps_low=0.2, eps_high=0.2, value_clip=0.2,
             vf_coef=0.1, beta=0.0, ref_logp=None, loss_agg="token_mean", is_weight=None):
    """PPO-clip, Schulman et al. 2017 (arXiv 1707.06347, eq. 7 and 9) in the RLHF form (per-token advantages):
    L = token-mean −min(ρA, clip(ρ, 1−ε, 1+ε)A) + vf_coef · 0.5 · token-mean max((V−R)², (clip(V, V_old ± c) − R)²).
    adv, values, old_values, returns: (B, T)."""
    loss, ratio, binding = clipped_surrogate(logp - old_logp, adv, eps_low, eps_high)   # (B, T)
    stats = clip_stats(ratio.detach(), binding, adv, mask, mask)
    policy = AGGREGATIONS[loss_agg](_with_kl(loss, logp, ref_logp, beta, stats, mask, is_weight), mask)
    v_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)      # (B, T)
    value = 0.5 * token_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    stats["loss/policy"], stats["loss/value"] = policy.item(), value.item()
    return policy + vf_coef * value, stats


@dataclass(frozen=True)
class Algorithm:
    loss: Callable                     # (logp, old_logp, adv, mask, *, knobs..., tensors...) -> (loss, stats)
    advantage: str                     # "group": group_advantages (B,) | "gae": a critic and GAE, per token (B, T)

    def knobs(self) -> dict:
        """The loss's float/str keyword arguments and their defaults: what it reads from `cfg.algo`."""
        return {n: p.default for n, p in inspect.signature(self.loss).parameters.items()
                if p.kind is p.KEYWORD_ONLY and isinstance(p.default, (float, int, str))}

    def reads(self) -> set:
        """Every `algo.*` key this algorithm uses: the loss's knobs plus its advantage's."""
        return {"name", "group_size", *self.knobs(), *ADVANTAGE_KNOBS[self.advantage]}


ADVANTAGE_KNOBS = {"group": ("scale_rewards",), "gae": ("critic", "kl_coef", "gamma", "lam")}
ALGORITHMS = {
    "gspo": Algorithm(gspo_loss, "group"),
    "grpo": Algorithm(grpo_loss, "group"),
    "dapo": Algorithm(dapo_loss, "group"),
    "ppo": Algorithm(ppo_loss, "gae"),
}
# How the loop folds a stat over one rollout's minibatches: a min, a max, an unweighted mean ("updates"), a mean
# weighted by another stat, or None (a weight, not logged); any stat not named here is token-weighted.
FOLD = {"ratio/min": "min", "ratio/max": "max", "ratio/mean": "ratios", "loss/policy": "updates",
        "loss/value": "updates", "tokens": None, "ratios": None}


def fold(acc: dict, stats: dict) -> None:
    """Add one minibatch's loss stats to `acc` as `FOLD` declares (token-weighted by default)."""
    for k, v in stats.items():
        how = FOLD.get(k, "tokens")
        if how in ("min", "max"):
            acc[k] = v if k not in acc else (min if how == "min" else max)(acc[k], v)
        elif how is not None:
            w = stats.get(how, 1.0)                                # "updates": each minibatch counts once
            total, weight = acc.get(k, (0.0, 0.0))
            acc[k] = (total + v * w, weight + w)


def folded(acc: dict) -> dict:
    """The minibatch-folded stats: weighted means divided out."""
    return {k: v if not isinstance(v, tuple) else v[0] / max(v[1], 1.0) for k, v in acc.items()}


def get(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"algo={name!r}; expected one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]
