"""The memory and precision knobs, each where it runs on this CPU: LoRA (PEFT) with the reference as the base
with adapters disabled, bitsandbytes AdamW8bit, bf16 autocast, and their config validation.

    pytest tests/test_memory_knobs.py -q
"""

import pytest
import torch

from conftest import (LEARNS, PPO_RTOL, TINY, assert_same_final_state, assert_trained, gspo, read_metrics, run_update,
                      same_rows, tiny_rollout)
from gspo_cli import algorithms, loop, models, rollout
from gspo_cli.config import Config, ModelConfig, OptimConfig



def tiny_cfg(**lora):
    cfg = ModelConfig(name="tiny", source="tiny")
    for k, v in lora.items():
        setattr(cfg.lora, k, v)
    return cfg


batch = tiny_rollout


def logps(model, roll, **kw):
    return rollout.token_logps(model, roll.prompt_ids, roll.prompt_mask, roll.ids, roll.mask, **kw)


def test_lora_reference_is_the_base_model_with_adapters_disabled(tiny):
    base, tok = tiny
    policy = models.load_policy(tiny_cfg(r=4), tok, torch.device("cpu"), seed=0)
    assert models.is_lora(policy)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)   # a trained adapter: the policy now differs from the base
    roll = batch(base, tok)
    want = logps(base, roll)                                                          # (B, T)
    assert not torch.allclose(logps(policy, roll), want, atol=1e-3)
    p = loop.Parts(Config(), policy, use_ref=True)
    order = [torch.arange(4), torch.arange(4, 8)]
    ref = loop.reference_logps(p, loop.Batch([], roll, [], [], torch.zeros(8)), order)   # (B, T)
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-6)
    assert not torch.allclose(logps(policy, roll), want, atol=1e-3), "adapters are back on after the reference"


@pytest.mark.slow
def test_lora_run_checkpoints_adapters_only_and_resumes_exactly(tmp_path):
    args = [*TINY, *LEARNS, "algo=ppo", "model.lora.r=4"]
    straight, part = tmp_path / "straight", tmp_path / "part"
    out = gspo("train", *args, "trainer.steps=3", f"hydra.run.dir={straight}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    state = torch.load(straight / "checkpoints" / "step_000003" / "state.pt", weights_only=False)
    keys = set(state["model"])
    assert keys and all("lora_" in k or k.startswith("value_head.") for k in keys), sorted(keys)[:5]
    assert {"value_head.weight", "value_head.bias"} <= keys
    assert gspo("train", *args, "trainer.steps=2", f"hydra.run.dir={part}", cwd=tmp_path).returncode == 0
    assert gspo("train", f"resume={part}", "trainer.steps=3", LEARNS[0], cwd=tmp_path).returncode == 0
    read = read_metrics
    assert_trained(read(straight))
    assert same_rows(read(part), read(straight), PPO_RTOL)
    assert_same_final_state(straight, part, PPO_RTOL)


def test_adamw8bit_runs_on_cpu_with_8bit_state(tiny, restored):
    bnb = pytest.importorskip("bitsandbytes")
    model, tok = tiny
    opt = models.build_optimizer(model, OptimConfig(name="adamw8bit", lr=1e-2))
    assert isinstance(opt, bnb.optim.AdamW8bit)
    cfg = Config()
    cfg.trainer.minibatches, cfg.algo.group_size = 1, 4
    adv = algorithms.group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), 4)
    stats = run_update(model, batch(model, tok), adv, cfg, opt=opt)
    assert stats["grad/nonfinite"] == 0
    emb = model.get_input_embeddings().weight
    assert opt.state[emb]["state1"].dtype == torch.uint8, "the embedding's Adam moments are 8-bit"
    assert not torch.equal(emb, restored["model.embed_tokens.weight"])


def test_bf16_autocast_keeps_log_probs_in_fp32_and_close_to_fp32(tiny):
    model, tok = tiny
    roll = batch(model, tok)
    with models.autocast(torch.device("cpu"), "bf16"):
        low = logps(model, roll)
    assert low.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32
    assert (low - logps(model, roll)).abs().max() < 0.05


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    base, tok = tiny
    ckpt = models.load_policy(ModelConfig(name="tiny", source="tiny", gradient_checkpointing=True), tok,
                              torch.device("cpu"), seed=0)
    assert ckpt.is_gradient_checkpointing
    roll = batch(base, tok)
    grads = []
    for m in (base, ckpt):
        m.train()
        m.zero_grad()
        logps(m, roll, share_prompt=False).sum().backward()   # checkpointing takes the full pass: compare with it
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        m.zero_grad()
        m.eval()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.slow
def test_bf16_8bit_and_checkpointing_run_end_to_end(tmp_path):
    out = gspo("train", *TINY, "trainer.precision=bf16", "optim=adamw8bit", "model.gradient_checkpointing=true",
               "trainer.steps=2",
               f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    state = torch.load(tmp_path / "r" / "checkpoints" / "step_000002" / "state.pt", weights_only=False)
    assert state["config"]["trainer"]["precision"] == "bf16" and state["config"]["optim"]["name"] == "adamw8bit"


@pytest.mark.parametrize("override,line", [
    ("trainer.precision=fp16", "error: trainer.precision='fp16' is invalid: expected one of ['auto', 'fp32', 'bf16']"),
    ("model.lora.r=-1", "error: model.lora.r=-1 is invalid: expected an integer >= 0"),
    ("trainer.devices=0", "error: trainer.devices=0 is invalid: expected an integer >= 1"),
    ("trainer.devices=3", "error: trainer.prompts_per_step=2 is invalid: expected a multiple of trainer.devices=3"),
])
def test_bad_knob_values_get_one_line(tmp_path, override, line):
    out = gspo("train", *TINY, override, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(line), out.stderr[-500:]
