"""The article's scale, checked on CPU with stand-ins: updates that survive rounding in every accepted precision,
chunked LM-head log-probs equal to the unchunked ones, π_old in the trainer's numerics under bf16, `gspo plan`.

A stand-in is DeepSeek-R1-Distill-Qwen-1.5B's architecture (conf/model/qwen1.5b.yaml: width 1536, 12 heads with 2
KV heads, vocab 151,936, untied head) with 2 layers instead of 28 and random weights.

    pytest tests/test_scale.py -q
"""
import gc
import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, gspo, tiny_rollout
from gspo_cli import algorithms, loop, models, rollout
from gspo_cli.config import Config

QWEN = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "qwen1.5b.yaml"))


def stand_in_config(**model) -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.source, cfg.model.arch = "qwen1.5b-2layer", "random", {**QWEN["arch"],
                                                                                    "num_hidden_layers": 2}
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.optim.lr, cfg.trainer.minibatches, cfg.algo.group_size = 1e-6, 1, 4
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("precision,dtype,lora_r", [("fp32", "float32", 0), ("bf16", "float32", 0),
                                                    ("bf16", "bfloat16", 8)],
                         ids=["fp32", "fp32-master-bf16-autocast", "bf16-base-lora"])
def test_one_step_at_lr_1e_6_changes_every_weight_that_got_a_gradient(tiny, precision, dtype, lora_r):
    _, tok = tiny
    cfg = stand_in_config(dtype=dtype)
    cfg.model.lora.r = lora_r
    policy = models.load_policy(cfg.model, tok, torch.device("cpu"), seed=0)
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trainable.values()), "what the optimizer updates is fp32"
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = models.build_optimizer(policy, cfg.optim)
    p = loop.Parts(cfg, policy, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0), precision=precision)
    roll = tiny_rollout(policy, tok, max_new_tokens=6)
    batch = loop.Batch([], roll, [], [], torch.zeros(8))
    adv = algorithms.group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), 4)
    stats = loop.update(p, batch, loop.minibatch_order(8, p), adv, roll.logp)
    assert stats["grad/nonfinite"] == 0 and stats["grad/norm"] > 0
    got, moved = 0, 0
    for n, param in trainable.items():
        has_grad = param.grad is not None and param.grad.ne(0)
        if has_grad is not False:
            got += int(has_grad.sum())
            moved += int((param.detach().ne(before[n]) & has_grad).sum())
    assert got > 0 and moved / got >= 0.99, f"{moved}/{got} weights with a gradient moved"
    del policy, opt, p, trainable, before
    gc.collect()


def test_chunked_log_probs_and_gradients_equal_the_unchunked_ones(tiny):
    model, tok = tiny
    roll = tiny_rollout(model, tok, max_new_tokens=12)
    args = (roll.prompt_ids, roll.prompt_mask, roll.ids, roll.mask)
    out = {}
    for chunk in (0, 5):   # 12 positions in pieces of 5, 5, 2
        model.zero_grad()
        logp = rollout.token_logps(model, *args, temperature=0.7, chunk=chunk)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        out[chunk] = logp.detach(), {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad()
    torch.testing.assert_close(out[5][0], out[0][0], rtol=0, atol=1e-6)
    for n, g in out[0][1].items():
        torch.testing.assert_close(out[5][1][n], g, rtol=1e-6, atol=1e-6, msg=n)   # fp32 sums in another order
    assert any(g.abs().sum() > 0 for g in out[0][1].values())


@pytest.mark.slow
def test_bf16_first_minibatch_ratio_is_one_when_pi_old_is_recomputed():
    """The real SmolLM2 under bf16 autocast: with π_old recomputed (auto), every GSPO sequence ratio of the first
    minibatch is within 1e-4 of 1 and nothing clips; with the sampler's bf16 log-probs as π_old it does not hold, and
    rollout/logp_diff shows why."""
    cfg = Config()
    cfg.trainer.precision, cfg.trainer.prompts_per_step, cfg.trainer.minibatches = "bf16", 4, 4
    cfg.rollout.max_new_tokens, cfg.task.eval_size, cfg.trainer.log_ref_kl = 24, 0, False
    p = loop.build(cfg, loop.Ranks())
    batch = loop.sample_and_score(p, p.task.next_batch(0, 4)[0], cfg.algo.group_size)
    order = loop.minibatch_order(16, p)
    adv = torch.randn(16, generator=torch.Generator().manual_seed(0))           # non-zero: the clip can bind
    stats = {}
    for mode in ("sampler", "auto"):  # each: π_old, then the first minibatch's update (one step) alone
        cfg.rollout.old_logp = mode
        cfg.rollout.is_correction = "token_truncate"          # read before the update: a full π_old pass
        full = loop.old_logps(p, batch, order[:4])
        cfg.rollout.is_correction = "none"                    # the first minibatch's π_old is its own forward
        old_logp = loop.old_logps(p, batch, order[:4])
        stats[mode] = loop.update(p, batch, order[:1], adv, old_logp)
        m = batch.roll.mask
        assert torch.equal(old_logp * m, full * m), "the update's own first forward is the π_old pass, bit for bit"
    auto, sampler = stats["auto"], stats["sampler"]
    assert abs(auto["ratio/min"] - 1) < 1e-4 and abs(auto["ratio/max"] - 1) < 1e-4, auto
    assert auto["clip/frac"] == 0
    assert sampler["rollout/logp_diff"] > 1e-3, "the bf16 sampler's log-probs are not the trainer's"


def test_plan_of_the_h100_preset_fits_80_gb(tmp_path):
    out = gspo("plan", "+experiment=compare_h100", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "peak in update" in out.stdout and "LM-head chunk (update)" in out.stdout
    verdicts = [ln for ln in out.stdout.splitlines() if ln.startswith(("fits", "does not fit"))]
    assert len(verdicts) == 3 and all(v.startswith("fits: peak") for v in verdicts), verdicts
    assert out.stdout.strip().splitlines()[-1] == "sweep over algo=gspo,grpo,ppo: fits"


@pytest.mark.slow
def test_plan_says_which_knob_when_it_does_not_fit(tmp_path):
    out = gspo("plan", "+experiment=compare_h100", "trainer.memory_gb=40", "trainer.lm_head_chunk=0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "does not fit: peak" in out.stdout and "(update) > trainer.memory_gb=40; turn" in out.stdout


def test_plan_counts_exact_parameters_without_loading_weights():
    from gspo_cli import plan

    cfg = stand_in_config()
    s = plan.shapes(cfg)
    H, kv, inter, V = 1536, 256, 8960, 151936
    layer = (H * H + H) + 2 * (H * kv + kv) + H * H + 3 * H * inter + 2 * H     # q (bias), k, v (bias), o, MLP, norms
    want = 2 * V * H + 2 * layer + H                                              # embedding, untied head, final norm
    assert s.params == want and s.trainable == s.params and s.kv == 256
    cfg.model.lora.r = 8
    lora_layer = 8 * ((H + H) + 2 * (H + kv) + (H + H) + 3 * (H + inter))
    assert plan.shapes(cfg).trainable == 2 * lora_layer
    assert math.isfinite(plan.estimate(cfg, s, 100)["peak"])
