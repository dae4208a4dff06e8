"""The loop end to end: real `gspo train` subprocesses on the tiny model (GSPO and GRPO), W&B offline, checkpoints,
resume; and an in-process check that an update changes every parameter.  pytest tests/test_train.py -q"""
import json
import math

import pytest
import torch

from conftest import (LEARNS, TIMING, TINY, assert_same_final_state, assert_trained, gspo, read_metrics, run_update,
                      tiny_rollout)
from gspo_cli import algorithms, rollout
from gspo_cli.config import Config

KEYS = ["reward/mean", "reward/std", "reward/accuracy", "clip/frac", "clip/frac_low", "clip/frac_high", "ratio/mean",
        "ratio/max", "ratio/min", "kl/ref", "entropy", "len/mean", "len/clipped_frac", "grad/norm", "grad/nonfinite",
        "loss/policy", "loss/value", "lr", "time/rollout", "time/update", "tokens_per_s"]


def rows(run):
    return read_metrics(run, timing=True)


@pytest.mark.slow
def test_gspo_run_writes_everything_and_resume_continues_exactly(tmp_path):
    straight, part = tmp_path / "straight", tmp_path / "part"
    out = gspo("train", *TINY, *LEARNS, "trainer.steps=4", f"hydra.run.dir={straight}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = rows(straight)
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    for r in got[1:]:
        assert set(KEYS) <= set(r), set(KEYS) - set(r)
    assert "eval/accuracy" in got[0] and "eval/accuracy" in got[2] and "eval/accuracy" in got[4]
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    assert list((straight / "wandb").glob("offline-run-*/run-*.wandb")), "a real offline W&B run"
    assert (straight / ".hydra" / "config.yaml").is_file()
    samples = [json.loads(ln) for ln in (straight / "samples.jsonl").read_text().splitlines()]
    assert {"step", "prompt", "completion", "answer", "reward"} <= set(samples[0]) and samples[-1]["step"] == 4

    # 2 steps, then resume to 4 in the same dir: the same trajectory and the same final state as the straight run
    assert_trained(got)
    assert gspo("train", *TINY, *LEARNS, "trainer.steps=2", f"hydra.run.dir={part}", cwd=tmp_path).returncode == 0
    out = gspo("train", f"resume={part}", "trainer.steps=4", LEARNS[0], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step 2" in out.stderr
    resumed = rows(part)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in resumed]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in got]
    assert_same_final_state(straight, part)
    from omegaconf import OmegaConf
    original = OmegaConf.load(part / ".hydra" / "config.yaml")
    assert (original.trainer.steps, original.model.name) == (2, "tiny"), "the original config is kept"
    assert (part / ".hydra" / "resume" / "config.yaml").is_file(), "the resume's own composed config goes beside it"


@pytest.mark.slow
def test_grpo_run_logs_its_kl_term(tmp_path):
    run = tmp_path / "grpo"
    out = gspo("train", *TINY, "algo=grpo", "trainer.steps=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    last = rows(run)[-1]
    assert set(KEYS) <= set(last) and "kl/loss" in last


def test_grpo_kl_term_is_the_k3_mean_and_pulls_toward_the_reference(tiny, restored):
    """The tiny model earns no reward, so a run's KL stays ~0; here the reference differs from the policy by hand."""
    model, tok = tiny
    cfg = Config()
    cfg.algo.name, cfg.algo.eps_low, cfg.algo.eps_high, cfg.algo.beta = "grpo", 0.2, 0.2, 0.04
    cfg.trainer.minibatches, cfg.algo.group_size, cfg.optim.lr = 1, 4, 1e-2
    roll = tiny_rollout(model, tok)
    ref_logp = roll.logp - 0.5 * roll.mask                                               # (B, T)
    stats = run_update(model, roll, torch.zeros(8), cfg, ref_logp=ref_logp)
    d = -0.5
    assert stats["kl/loss"] == pytest.approx(math.exp(d) - d - 1, rel=1e-4)             # k3 at log-ratio −0.5
    assert stats["grad/norm"] > 0, "with zero advantages only the KL term moves the policy"
    with torch.no_grad():
        after = rollout.token_logps(model, roll.prompt_ids, roll.prompt_mask, roll.ids, roll.mask)
    assert ((after - roll.logp) * roll.mask).sum() < 0, "log-probs moved toward the (lower) reference"


@pytest.mark.slow
def test_resume_with_another_algorithm_is_refused(tmp_path):
    run = tmp_path / "r"
    assert gspo("train", *TINY, "trainer.steps=1", f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    out = gspo("train", f"resume={run}", "algo=grpo", cwd=tmp_path)
    assert out.returncode == 2
    assert "error: algo='grpo' does not match the checkpoint" in out.stderr


def test_one_update_changes_every_parameter(tiny, restored):
    model, tok = tiny
    cfg = Config()
    cfg.trainer.minibatches, cfg.algo.group_size, cfg.optim.lr = 1, 4, 0.1
    adv = algorithms.group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), 4)
    stats = run_update(model, tiny_rollout(model, tok), adv, cfg)
    assert stats["grad/nonfinite"] == 0 and stats["grad/norm"] > 0
    assert stats["rollout/logp_diff"] < 1e-5, "π_old from the fp32 sampler is the trainer's own log-prob"
    for n, p in model.named_parameters():
        assert not torch.equal(p, restored[n]), f"{n} did not change"


@pytest.mark.slow
def test_ppo_run_logs_value_metrics_and_checkpoints_the_value_head(tmp_path):
    run = tmp_path / "ppo"
    out = gspo("train", *TINY, "algo=ppo", "trainer.steps=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    last = rows(run)[-1]
    assert set(KEYS) <= set(last)
    assert {"value/explained_variance", "value/mean", "returns/mean"} <= set(last) and last["loss/value"] > 0
    state = torch.load(run / "checkpoints" / "step_000002" / "state.pt", weights_only=False)
    assert "value_head.weight" in state["model"] and state["model"]["value_head.weight"].abs().sum() > 0
