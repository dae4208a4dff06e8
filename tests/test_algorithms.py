"""Objectives against the papers' formulas, written here independently as plain loops in float64.

    pytest tests/test_algorithms.py -q
"""
import math

import pytest
import torch

from gspo_cli import algorithms as A


@pytest.fixture(autouse=True, scope="module")
def float64_here_only():
    """This module's references are float64; later modules must see torch's float32 default again."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def ragged(B, T, seed, min_len=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + torch.randn(B, T, generator=g) * 0.3
    ref = logp + torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, generator=g)
    return logp, old, ref, adv, mask


def ref_gspo(logp, old, adv, mask, eps_low, eps_high):
    """GSPO eq. 5-7 by hand: per sequence s_i = exp(mean_t(logp - old)), J = mean_i min(s A, clip(s) A)."""
    terms, clipped_tokens, tokens = [], 0, 0
    for i in range(logp.shape[0]):
        n = int(mask[i].sum())
        s = math.exp(sum(float(logp[i, t] - old[i, t]) for t in range(n)) / n)
        a = float(adv[i])
        unclipped, clipped = s * a, min(max(s, 1 - eps_low), 1 + eps_high) * a
        terms.append(-min(unclipped, clipped))
        clipped_tokens += n * (clipped < unclipped)
        tokens += n
    return sum(terms) / len(terms), clipped_tokens / tokens


def ref_grpo(logp, old, ref, adv, mask, eps, beta):
    """GRPO eq. 3-4 by hand: mean_i (1/|y_i|) sum_t [-min(rho A, clip(rho) A) + beta * k3]."""
    total, clipped_tokens, tokens = 0.0, 0, 0
    for i in range(logp.shape[0]):
        n = int(mask[i].sum())
        seq = 0.0
        for t in range(n):
            rho = math.exp(float(logp[i, t] - old[i, t]))
            a = float(adv[i])
            unclipped, clipped = rho * a, min(max(rho, 1 - eps), 1 + eps) * a
            d = float(ref[i, t] - logp[i, t])
            seq += -min(unclipped, clipped) + beta * (math.exp(d) - d - 1)
            clipped_tokens += clipped < unclipped
        total += seq / n
        tokens += n
    return total / logp.shape[0], clipped_tokens / tokens


@pytest.mark.parametrize("seed", range(4))
def test_gspo_matches_paper(seed):
    logp, old, _, adv, mask = ragged(8, 7, seed)
    loss, st = A.gspo_loss(logp, old, adv, mask, eps_low=0.05, eps_high=0.08)
    want, frac = ref_gspo(logp, old, adv, mask, 0.05, 0.08)
    assert loss.item() == pytest.approx(want, abs=1e-9)
    assert st["clip/frac"] == pytest.approx(frac, abs=1e-12)
    assert 0 < st["clip/frac"] < 1, "both branches should occur for this test to mean something"


@pytest.mark.parametrize("seed", range(4))
def test_grpo_matches_paper(seed):
    logp, old, ref, adv, mask = ragged(8, 7, seed)
    loss, st = A.grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.04, ref_logp=ref)
    want, frac = ref_grpo(logp, old, ref, adv, mask, 0.2, 0.04)
    assert loss.item() == pytest.approx(want, abs=1e-9)
    assert st["clip/frac"] == pytest.approx(frac, abs=1e-12)
    assert 0 < st["clip/frac"] < 1


def ref_dapo(logp, old, adv, mask, eps_low, eps_high):
    """DAPO eq. 8 by hand: sum over every token of -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) / all tokens."""
    total, clipped_tokens, tokens = 0.0, 0, 0
    for i in range(logp.shape[0]):
        for t in range(int(mask[i].sum())):
            rho, a = math.exp(float(logp[i, t] - old[i, t])), float(adv[i])
            unclipped, clipped = rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a
            total += -min(unclipped, clipped)
            clipped_tokens += clipped < unclipped
            tokens += 1
    return total / tokens, clipped_tokens / tokens


@pytest.mark.parametrize("seed", range(4))
def test_dapo_matches_paper(seed):
    logp, old, _, adv, mask = ragged(8, 7, seed)
    loss, st = A.dapo_loss(logp, old, adv, mask)                       # its own defaults: eps 0.2 / 0.28, token mean
    want, frac = ref_dapo(logp, old, adv, mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(want, abs=1e-9)
    assert st["clip/frac"] == pytest.approx(frac, abs=1e-12) and 0 < st["clip/frac"] < 1
    assert "kl/loss" not in st
    # clip-higher: a token at ratio 1.25 with A > 0 is clipped by symmetric eps 0.2, not by DAPO's 0.28
    one = torch.ones(1, 1)
    assert A.dapo_loss(math.log(1.25) * one, 0 * one, torch.ones(1), one)[1]["clip/frac"] == 0
    assert A.grpo_loss(math.log(1.25) * one, 0 * one, torch.ones(1), one, beta=0.0)[1]["clip/frac"] == 1


def test_registry_schema_and_conf_algo_agree():
    """Every algorithm has conf/algo/<name>.yaml naming it; each YAML sets only keys its algorithm reads; every knob a
    loss declares is an AlgoConfig field with the loss's own default type."""
    from dataclasses import fields
    from pathlib import Path

    from omegaconf import OmegaConf

    from gspo_cli.config import AlgoConfig

    conf = {p.stem: OmegaConf.to_container(OmegaConf.load(p)) for p in
            (Path(__file__).resolve().parent.parent / "conf" / "algo").glob("*.yaml")}
    assert set(conf) == set(A.ALGORITHMS)
    schema = {f.name: f.type for f in fields(AlgoConfig)}
    for name, algo in A.ALGORITHMS.items():
        assert conf[name]["name"] == name
        assert set(conf[name]) <= algo.reads(), (name, set(conf[name]) - algo.reads())
        assert algo.reads() <= set(schema), (name, algo.reads() - set(schema))
        assert algo.advantage in A.ADVANTAGE_KNOBS
        assert "loss_agg" in algo.knobs() and algo.knobs()["loss_agg"] in A.AGGREGATIONS


def test_gspo_ratio_is_length_normalised_geometric_mean_and_ignores_padding():
    logp = torch.tensor([[-1.0, -2.0, -3.0, 99.0]])
    old = torch.tensor([[-1.5, -2.5, -2.0, -99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    log_s = A.sequence_log_ratio(logp, old, mask)
    assert log_s.item() == pytest.approx((0.5 + 0.5 - 1.0) / 3)
    pi, pi_old = math.exp(-6.0), math.exp(-6.0)           # (π/π_old)^{1/|y|} with |y| = 3
    assert log_s.exp().item() == pytest.approx((pi / pi_old) ** (1 / 3))


def test_clip_binds_exactly_where_design_says():
    # per-token ratios: below, inside, at the edge, above the band; with A > 0 and A < 0
    log_ratio = torch.tensor([[math.log(0.7), 0.0, math.log(1.2), math.log(1.5)]] * 2)
    adv = torch.tensor([[1.0], [-1.0]])
    _, _, binding = A.clipped_surrogate(log_ratio, adv, 0.2, 0.2)
    # A > 0: only ratio > 1 + eps binds; A < 0: only ratio < 1 - eps binds; the edge (1.2) never binds
    assert binding.tolist() == [[False, False, False, True], [True, False, False, False]]
    mask = torch.ones(2, 4)
    st = A.clip_stats(log_ratio.exp(), binding, adv, mask, mask)
    assert (st["clip/frac"], st["clip/frac_low"], st["clip/frac_high"]) == (0.25, 0.125, 0.125)


def test_gspo_counts_every_token_of_a_clipped_sequence():
    logp = torch.zeros(2, 4)
    old = torch.tensor([[-0.1] * 4, [0.0] * 4])            # row 0: s = e^0.1 > 1 + eps, A > 0 -> clipped
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    _, st = A.gspo_loss(logp, old, torch.tensor([1.0, 1.0]), mask)
    assert st["clip/frac"] == pytest.approx(3 / 4) and st["clip/frac_high"] == pytest.approx(3 / 4)


def test_straddling_tokens_clip_in_grpo_not_in_gspo():
    # token ratios 0.5 and 2.0 straddle the band; their geometric mean is exactly 1
    logp = torch.tensor([[math.log(0.5), math.log(2.0)]])
    old, mask, adv = torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([1.0])
    _, g = A.grpo_loss(logp, old, adv, mask, beta=0.0)
    _, s = A.gspo_loss(logp, old, adv, mask)
    assert g["clip/frac"] == 0.5 and s["clip/frac"] == 0.0


def test_gspo_token_has_gspo_value_and_gradient():
    logp, old, _, adv, mask = ragged(6, 5, 7)
    grads = []
    for variant in ("sequence", "token"):
        x = logp.clone().requires_grad_(True)
        loss, _ = A.gspo_loss(x, old, adv, mask, eps_low=0.05, eps_high=0.05, variant=variant)
        loss.backward()
        grads.append((loss.item(), x.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-12)


def test_on_policy_ratio_one_and_gspo_gradient_equals_grpo():
    logp, _, _, adv, mask = ragged(6, 5, 3)
    out = {}
    for name, fn in (("gspo", A.gspo_loss), ("grpo", A.grpo_loss)):
        x = logp.clone().requires_grad_(True)
        loss, st = fn(x, logp.detach(), adv, mask, beta=0.0) if name == "grpo" else fn(x, logp.detach(), adv, mask)
        loss.backward()
        assert st["clip/frac"] == 0 and st["ratio/min"] == st["ratio/max"] == 1.0
        out[name] = x.grad
    assert torch.allclose(out["gspo"], out["grpo"], atol=1e-12)


@pytest.mark.parametrize("G", [2, 3, 8])
def test_group_advantages_loop_reference(G):
    r = torch.rand(5 * G, generator=torch.Generator().manual_seed(G))
    adv = A.group_advantages(r, G)
    for g in range(5):
        grp = [float(x) for x in r[g * G:(g + 1) * G]]
        mean = sum(grp) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1))
        for j in range(G):
            assert adv[g * G + j].item() == pytest.approx((grp[j] - mean) / (std + 1e-6), abs=1e-9)
    assert torch.allclose(A.group_advantages(r, G, scale=False), r - r.view(-1, G).mean(-1).repeat_interleave(G))


def test_equal_rewards_give_exactly_zero_advantage_and_no_nan():
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    adv = A.group_advantages(r, 4)
    assert adv[:8].eq(0).all() and torch.isfinite(adv).all() and adv[8:].abs().gt(0.5).all()
    logp, old, _, _, mask = ragged(12, 5, 0)
    for fn in (A.gspo_loss, A.grpo_loss):
        loss, _ = fn(logp, old, adv, mask, beta=0.0)
        assert torch.isfinite(loss)


def test_k3_kl_nonnegative_and_zero_at_equality():
    logp, _, ref, _, mask = ragged(4, 6, 1)
    kl = A.k3_kl(logp, ref)
    assert (kl >= 0).all() and A.k3_kl(logp, logp).abs().max() == 0
    d = ref - logp
    assert torch.allclose(kl, d.exp() - d - 1)


def test_aggregations_and_microbatch_accumulation():
    x, _, _, _, mask = ragged(8, 6, 5)
    assert A.token_mean(x, mask).item() == pytest.approx(((x * mask).sum() / mask.sum()).item())
    per_seq = [(x[i] * mask[i]).sum() / mask[i].sum() for i in range(8)]
    assert A.seq_mean_token_mean(x, mask).item() == pytest.approx(sum(per_seq).item() / 8)
    # seq_mean_token_mean accumulates over equal micro-batches as a plain average of the micro-batch losses
    halves = [A.seq_mean_token_mean(x[i:i + 4], mask[i:i + 4]) for i in (0, 4)]
    assert (sum(halves) / 2).item() == pytest.approx(A.seq_mean_token_mean(x, mask).item())


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="algo='dpo'; expected one of"):
        A.get("dpo")


# ---- PPO: GAE, shaped rewards, the clipped policy and value losses ----

def test_gae_hand_computed_three_tokens():
    # r = (0, 0, 1), V = (0.5, 0.6, 0.7), gamma = 1, lam = 0.5
    # delta_2 = 1 - 0.7 = 0.3; delta_1 = 0 + 0.7 - 0.6 = 0.1; delta_0 = 0 + 0.6 - 0.5 = 0.1
    # A_2 = 0.3; A_1 = 0.1 + 0.5 * 0.3 = 0.25; A_0 = 0.1 + 0.5 * 0.25 = 0.225; R = A + V
    r, v, m = torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.6, 0.7, 9.0]]), torch.tensor([[1.0, 1, 1, 0]])
    adv, ret = A.gae(r, v, m, gamma=1.0, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.225, 0.25, 0.3, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.725, 0.85, 1.0, 0.0]]))


def ref_gae(r, v, mask, gamma, lam):
    B, T = r.shape
    adv = [[0.0] * T for _ in range(B)]
    for i in range(B):
        n = int(mask[i].sum())
        for t in range(n):
            total = 0.0
            for k in range(t, n):
                nv = float(v[i, k + 1]) if k + 1 < n else 0.0
                total += (gamma * lam) ** (k - t) * (float(r[i, k]) + gamma * nv - float(v[i, k]))
            adv[i][t] = total
    return torch.tensor(adv)


@pytest.mark.parametrize("seed", range(3))
def test_gae_matches_the_sum_of_discounted_deltas(seed):
    _, _, _, _, mask = ragged(6, 7, seed)
    g = torch.Generator().manual_seed(seed)
    r, v = torch.randn(6, 7, generator=g) * mask, torch.randn(6, 7, generator=g)
    adv, ret = A.gae(r, v, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, ref_gae(r, v, mask, 0.9, 0.8), atol=1e-9)
    assert torch.allclose(ret, (adv + v) * mask)


def test_ppo_token_rewards_put_the_task_reward_on_the_last_token():
    old, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    r = A.ppo_token_rewards(torch.tensor([2.0]), old, ref, mask, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[-0.05, 2.0, 0.0]]))


@pytest.mark.parametrize("seed", range(3))
def test_ppo_loss_matches_formula(seed):
    logp, old, _, _, mask = ragged(5, 6, seed)
    g = torch.Generator().manual_seed(seed + 10)
    adv, values, old_values, returns = (torch.randn(5, 6, generator=g) for _ in range(4))
    loss, st = A.ppo_loss(logp, old, adv, mask, values=values, old_values=old_values, returns=returns,
                          eps_low=0.2, eps_high=0.2, value_clip=0.2, vf_coef=0.1)
    pg, vf, n, clipped = 0.0, 0.0, 0, 0
    for i in range(5):
        for t in range(int(mask[i].sum())):
            rho, a = math.exp(float(logp[i, t] - old[i, t])), float(adv[i, t])
            u, c = rho * a, min(max(rho, 0.8), 1.2) * a
            pg -= min(u, c)
            clipped += c < u
            v, vo, R = float(values[i, t]), float(old_values[i, t]), float(returns[i, t])
            vc = vo + min(max(v - vo, -0.2), 0.2)
            vf += 0.5 * max((v - R) ** 2, (vc - R) ** 2)
            n += 1
    assert loss.item() == pytest.approx(pg / n + 0.1 * vf / n, abs=1e-9)
    assert st["loss/policy"] == pytest.approx(pg / n) and st["loss/value"] == pytest.approx(vf / n)
    assert st["clip/frac"] == pytest.approx(clipped / n) and 0 < clipped < n


def test_whiten_zero_mean_unit_std_over_mask():
    x, _, _, _, mask = ragged(6, 8, 2)
    w = A.whiten(x * 5 + 3, mask)
    vals = w[mask.bool()]
    assert vals.mean().abs() < 1e-9 and vals.std().item() == pytest.approx(1.0, abs=1e-6)
    assert w[~mask.bool()].abs().max() == 0


@pytest.mark.parametrize("name", ["gspo", "gspo_token", "grpo", "dapo", "ppo"])
def test_gradcheck(name):
    logp, old, ref, adv, mask = ragged(3, 4, 11)
    x = logp.clone().requires_grad_(True)
    if name == "ppo":
        g = torch.Generator().manual_seed(1)
        tok_adv, old_v, ret = (torch.randn(3, 4, generator=g) for _ in range(3))
        v = (old_v + 0.05 * torch.randn(3, 4, generator=g)).requires_grad_(True)
        fn = lambda x, v: A.ppo_loss(x, old, tok_adv, mask, values=v, old_values=old_v, returns=ret)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, v))
        return
    kw = {"gspo": dict(eps_low=0.05, eps_high=0.05), "gspo_token": dict(eps_low=0.05, eps_high=0.05, variant="token"),
          "grpo": dict(beta=0.04, ref_logp=ref), "dapo": {}}[name]
    fn = {"grpo": A.grpo_loss, "dapo": A.dapo_loss}.get(name, A.gspo_loss)
    assert torch.autograd.gradcheck(lambda x: fn(x, old, adv, mask, **kw)[0], (x,))


@pytest.mark.parametrize("name", ["gspo", "grpo", "dapo"])
def test_length_one_and_all_padding_rows(name):
    # row 0: one token; row 1: all padding (counts as 0 in the mean over sequences, as TRL); row 2: three tokens
    logp = torch.tensor([[-1.0, 0, 0], [5.0, 5.0, 5.0], [-1.0, -2.0, -0.5]])
    old = torch.tensor([[-1.2, 0, 0], [0.0, 0.0, 0.0], [-1.1, -2.1, -0.4]])
    mask = torch.tensor([[1.0, 0, 0], [0, 0, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -3.0, -1.0])
    fn = {"gspo": A.gspo_loss, "grpo": A.grpo_loss, "dapo": A.dapo_loss}[name]
    kw = dict(eps_low=0.1, eps_high=0.1) if name == "gspo" else dict(beta=0.0)
    loss, st = fn(logp, old, adv, mask, **kw)
    reference = {"gspo": ref_gspo, "grpo": lambda *a: ref_grpo(a[0], a[1], a[1], a[2], a[3], 0.2, 0.0),
                 "dapo": lambda *a: ref_dapo(*a[:4], 0.2, 0.28)}[name]
    want, frac = reference(logp[[0, 2]], old[[0, 2]], adv[[0, 2]], mask[[0, 2]], 0.1, 0.1)
    # an all-padding row counts as 0 in the mean over sequences; the token mean never sees it
    assert torch.isfinite(loss) and loss.item() == pytest.approx(want * (1 if name == "dapo" else 2 / 3), abs=1e-9)
    assert st["clip/frac"] == pytest.approx(frac) and st["tokens"] == 4
    assert st["ratio/max"] < 1.5, "the padded row's ratio (e^5) must not enter the stats"


@pytest.mark.parametrize("seed", range(3))
def test_rollout_correction_against_loops(seed):
    """token_truncate: w = min(π_old/μ, C) per token; sequence_mask: keep a response while its ratio (geometric
    mean for GSPO, product otherwise) is within [1/C, C] — checked element by element against plain loops."""
    _, old, sampler, _, mask = ragged(6, 9, seed)
    sampler = old + torch.randn(old.shape, generator=torch.Generator().manual_seed(seed)) * 0.6
    C = 1.5
    w, stats = A.rollout_correction(old, sampler, mask, "token_truncate", C, geometric=False)
    for i in range(6):
        for t in range(9):
            want = min(math.exp(old[i, t] - sampler[i, t]), C) if mask[i, t] else 0.0
            assert w[i, t].item() == pytest.approx(want, rel=1e-12)
    assert 0 < stats["rollout_is/truncated_frac"] < 1
    for geometric in (True, False):
        w, stats = A.rollout_correction(old, sampler, mask, "sequence_mask", C, geometric=geometric)
        kept = 0
        for i in range(6):
            n = int(mask[i].sum())
            log_s = sum((old[i, t] - sampler[i, t]).item() for t in range(n))
            log_s = log_s / n if geometric else log_s
            keep = abs(log_s) <= math.log(C)
            kept += keep
            assert torch.equal(w[i], mask[i] * float(keep))
        assert stats["rollout_is/masked_frac"] == pytest.approx(1 - kept / 6)
    assert A.rollout_correction(old, sampler, mask, "none", C, geometric=True) == (None, {})


def test_rollout_correction_weights_only_the_policy_term():
    """The correction multiplies each token's policy loss, not the KL term: a zero weight on every token leaves
    β·KL alone; a weight of one changes nothing."""
    logp, old, ref, adv, mask = ragged(4, 7, 0)
    for name in ("gspo", "grpo", "dapo"):
        loss_fn = A.get(name).loss
        plain, _ = loss_fn(logp, old, adv, mask, ref_logp=ref, beta=0.1)
        ones, _ = loss_fn(logp, old, adv, mask, ref_logp=ref, beta=0.1, is_weight=torch.ones_like(mask))
        zeros, _ = loss_fn(logp, old, adv, mask, ref_logp=ref, beta=0.1, is_weight=torch.zeros_like(mask))
        kl_only, _ = loss_fn(logp, logp, torch.zeros_like(adv), mask, ref_logp=ref, beta=0.1)
        assert torch.equal(plain, ones)
        assert zeros.item() == pytest.approx(kl_only.item(), rel=1e-12)
        assert zeros.item() != pytest.approx(plain.item(), rel=1e-3)
