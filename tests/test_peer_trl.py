"""Cross-check with a peer: TRL's own GRPOTrainer loss code (trl==1.16.0, `_compute_loss`) on the same tensors.

TRL's method reads trainer state; we give it a minimal `self` (its real `accelerate.Accelerator` for the
reductions, a log-prob provider in place of the model forward) so that every line of loss and clip-metric math
that runs is TRL's. Where TRL's definition differs from ours, the test shows the difference explicitly:
- loss aggregation: TRL loss_type="grpo" is ours seq_mean_token_mean (GRPO eq. 3 and GSPO eq. 5) — equal;
- GSPO clip fraction: TRL counts clipped *sequences* / sequences; ours counts every token of a clipped sequence
  (token-weighted). Equal when all lengths are equal, different otherwise — asserted both ways below.

    pytest tests/test_peer_trl.py -q
"""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from gspo_cli import algorithms as A

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="trl is a dev extra")


def trl_loss(logp, old, adv, mask, *, level, eps_low, eps_high, beta=0.0, ref=None):
    from accelerate import Accelerator

    x = logp.clone().requires_grad_(True)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (x, torch.zeros_like(x), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type="grpo", epsilon_low=eps_low, epsilon_high=eps_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        accelerator=Accelerator(cpu=True), _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(logp.shape[0], 1, dtype=torch.long),
              "prompt_mask": torch.ones(logp.shape[0], 1, dtype=torch.long),
              "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old}
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    loss = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    return loss.item(), x.grad, {k: v[-1] for k, v in fake._metrics["train"].items()}


def batch(seed, equal_lengths=False):
    g = torch.Generator().manual_seed(seed)
    B, T = 8, 6
    lengths = torch.full((B,), T) if equal_lengths else torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + torch.randn(B, T, generator=g) * 0.2
    return logp, old, logp + torch.randn(B, T, generator=g) * 0.2, torch.randn(B, generator=g), mask


@pytest.mark.parametrize("seed", range(3))
def test_gspo_loss_and_gradient_equal_trl_sequence_level(seed):
    logp, old, _, adv, mask = batch(seed)
    want, want_grad, m = trl_loss(logp, old, adv, mask, level="sequence", eps_low=0.05, eps_high=0.05)
    x = logp.clone().requires_grad_(True)
    loss, st = A.gspo_loss(x, old, adv, mask, eps_low=0.05, eps_high=0.05)
    loss.backward()
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert torch.allclose(x.grad, want_grad, atol=1e-6)
    # clip fraction: TRL's is per sequence; ours per token. Recompute ours per sequence to show they agree on which
    # sequences are clipped, and that the two definitions differ on ragged lengths.
    log_s = A.sequence_log_ratio(logp, old, mask)
    _, _, binding = A.clipped_surrogate(log_s, adv[:, None], 0.05, 0.05)
    assert binding.float().mean().item() == pytest.approx(m["clip_ratio/region_mean"], abs=1e-7)
    token_weighted = (binding.float() * mask).sum() / mask.sum()
    assert st["clip/frac"] == pytest.approx(token_weighted.item(), abs=1e-7)


def test_gspo_clip_fraction_definitions_agree_on_equal_lengths():
    logp, old, _, adv, mask = batch(5, equal_lengths=True)
    _, _, m = trl_loss(logp, old, adv, mask, level="sequence", eps_low=0.02, eps_high=0.02)
    _, st = A.gspo_loss(logp, old, adv, mask, eps_low=0.02, eps_high=0.02)
    assert 0 < st["clip/frac"] < 1
    assert st["clip/frac"] == pytest.approx(m["clip_ratio/region_mean"], abs=1e-7)
    assert st["clip/frac_low"] == pytest.approx(m["clip_ratio/low_mean"], abs=1e-7)
    assert st["clip/frac_high"] == pytest.approx(m["clip_ratio/high_mean"], abs=1e-7)


@pytest.mark.parametrize("seed", range(3))
def test_grpo_loss_kl_and_clip_fractions_equal_trl_token_level(seed):
    logp, old, ref, adv, mask = batch(seed)
    want, want_grad, m = trl_loss(logp, old, adv, mask, level="token", eps_low=0.2, eps_high=0.2, beta=0.04, ref=ref)
    x = logp.clone().requires_grad_(True)
    loss, st = A.grpo_loss(x, old, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.04, ref_logp=ref)
    loss.backward()
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert torch.allclose(x.grad, want_grad, atol=1e-6)
    assert 0 < st["clip/frac"] < 1
    for ours, theirs in (("clip/frac", "clip_ratio/region_mean"), ("clip/frac_low", "clip_ratio/low_mean"),
                         ("clip/frac_high", "clip_ratio/high_mean"), ("kl/loss", "kl")):
        assert st[ours] == pytest.approx(m[theirs], abs=1e-6), ours
