"""The loop end to end: real `gspo train` subprocesses on the tiny model (GSPO and GRPO), W&B offline, checkpoints,
resume; and an in-process check that an update changes every parameter.  pytest tests/test_train.py -q"""
import json

import torch

from conftest import TINY, gspo
from gspo_cli import algorithms, loop, rollout
from gspo_cli.config import Config

KEYS = ["reward/mean", "reward/std", "reward/accuracy", "clip/frac", "clip/frac_low", "clip/frac_high", "ratio/mean",
        "ratio/max", "ratio/min", "kl/ref", "entropy", "len/mean", "len/clipped_frac", "grad/norm", "grad/nonfinite",
        "loss/policy", "loss/value", "lr", "time/rollout", "time/update", "tokens_per_s"]
TIMING = {"time/rollout", "time/update", "time/step", "tokens_per_s"}


def rows(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_gspo_run_writes_everything_and_resume_continues_exactly(tmp_path):
    straight, part = tmp_path / "straight", tmp_path / "part"
    out = gspo("train", *TINY, "trainer.steps=4", f"hydra.run.dir={straight}", cwd=tmp_path)
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

    # 2 steps, then resume to 4 in the same dir: the same trajectory as the straight run
    assert gspo("train", *TINY, "trainer.steps=2", f"hydra.run.dir={part}", cwd=tmp_path).returncode == 0
    out = gspo("train", f"resume={part}", "trainer.steps=4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step 2" in out.stderr
    resumed = rows(part)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in resumed]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in got]
    assert (part / ".hydra" / "config.yaml").read_text().count("steps: 2") == 1, "the original config is kept"


def test_grpo_run_logs_its_kl_term(tmp_path):
    run = tmp_path / "grpo"
    out = gspo("train", *TINY, "algo=grpo", "trainer.steps=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    last = rows(run)[-1]
    assert set(KEYS) <= set(last) and "kl/loss" in last and last["kl/ref"] >= 0


def test_resume_with_another_algorithm_is_refused(tmp_path):
    run = tmp_path / "r"
    assert gspo("train", *TINY, "trainer.steps=1", f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    out = gspo("train", f"resume={run}", "algo=grpo", cwd=tmp_path)
    assert out.returncode == 2
    assert "error: algo='grpo' does not match the checkpoint" in out.stderr


def test_one_update_changes_every_parameter(tiny):
    model, tok = tiny
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = Config()
    cfg.trainer.minibatches, cfg.algo.group_size, cfg.optim.lr = 1, 4, 0.1
    enc = tok(["2 + 2 =", "what is 3 - 1?"], return_tensors="pt", padding=True)
    roll = rollout.generate(model, enc.input_ids.repeat_interleave(4, 0), enc.attention_mask.repeat_interleave(4, 0),
                            max_new_tokens=8, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                            generator=torch.Generator().manual_seed(0))
    adv = algorithms.group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    try:
        stats = loop.update(model, opt, sched, roll, adv, None, cfg, torch.Generator().manual_seed(0),
                            loop.loss_kwargs(cfg))
        assert stats["grad/nonfinite"] == 0 and stats["grad/norm"] > 0
        for n, p in model.named_parameters():
            assert not torch.equal(p, saved[n]), f"{n} did not change"
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])


def test_ppo_run_logs_value_metrics_and_checkpoints_the_value_head(tmp_path):
    run = tmp_path / "ppo"
    out = gspo("train", *TINY, "algo=ppo", "trainer.steps=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    last = rows(run)[-1]
    assert set(KEYS) <= set(last)
    assert {"value/explained_variance", "value/mean", "returns/mean"} <= set(last) and last["loss/value"] > 0
    state = torch.load(run / "checkpoints" / "step_000002" / "state.pt", weights_only=False)
    assert "value_head.weight" in state["model"] and state["model"]["value_head.weight"].abs().sum() > 0
