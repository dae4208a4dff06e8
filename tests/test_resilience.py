"""Nothing lost: kill -9 and resume gives the same metrics as an uninterrupted run (GSPO, GRPO, PPO), SIGTERM
checkpoints and exits, a kill during a save leaves the last checkpoint usable, non-finite steps are skipped.

    pytest tests/test_resilience.py -q
"""
import json
import math
import random
import signal
import subprocess
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import (ENV, GSPO, LEARNS, RESUME_RTOL, TINY, assert_same_final_state, assert_trained, read_metrics,
                      same_rows)
from gspo_cli import algorithms as A, checkpoint

RUN = [*TINY, *LEARNS, "trainer.steps=5", "trainer.eval_every=3"]


def popen(args, cwd):
    """`gspo train ARGS` running in the background, so a test can signal it."""
    return subprocess.Popen([GSPO, "train", *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


metrics = read_metrics


def wait_for_step(proc, run, step, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = run / "metrics.jsonl"
        if path.exists() and any(json.loads(ln)["step"] >= step for ln in path.read_text().splitlines() if ln):
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["gspo", "grpo", "ppo"])
def test_kill_9_at_a_random_step_then_resume_equals_the_uninterrupted_run(tmp_path, algo):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ref = popen([*RUN, f"algo={algo}", f"hydra.run.dir={straight}"], tmp_path)
    assert ref.wait(600) == 0, ref.stderr.read()[-3000:]

    kill_at = random.Random(algo).randint(2, 4)
    proc = popen([*RUN, f"algo={algo}", f"hydra.run.dir={killed}"], tmp_path)
    wait_for_step(proc, killed, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    # ppo resumes through resume=auto in the same dir (what a requeued SLURM job does); the others by path
    args = ["resume=auto", f"hydra.run.dir={killed}", *RUN, f"algo={algo}"] if algo == "ppo" else \
        [f"resume={killed}", LEARNS[0]]
    res = popen(args, tmp_path)
    assert res.wait(600) == 0, res.stderr.read()[-3000:]
    assert_trained(metrics(straight))
    assert same_rows(metrics(killed), metrics(straight), RESUME_RTOL), f"killed at step {kill_at}"
    assert_same_final_state(straight, killed, RESUME_RTOL)
    ids = {p.name.rsplit("-", 1)[-1] for p in (killed / "wandb").glob("offline-run-*")}
    assert len(ids) == 1, f"the W&B run is resumed, not duplicated: {ids}"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    run = tmp_path / "run"
    proc = popen([*TINY, "trainer.steps=50", "trainer.save_every=100", f"hydra.run.dir={run}"], tmp_path)
    wait_for_step(proc, run, 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = metrics(run)[-1]["step"]
    assert f"stopped by SIGTERM after step {last}; checkpoint saved" in err
    assert checkpoint.latest(run).name == f"step_{last:06d}" and last < 50


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_real_save_then_resume(tmp_path):
    """A model big enough (~60 M params, ~0.7 GB with AdamW state) that a save takes a while: kill -9 the moment the
    temporary checkpoint dir of step 2 appears; step 1's checkpoint must load, and resume must finish the run."""
    run = tmp_path / "run"
    big = [*TINY, "model.tiny_hidden=512", "model.tiny_layers=8", "trainer.steps=3", "trainer.eval_every=0",
           "logger.wandb.mode=disabled", f"hydra.run.dir={run}"]
    proc = popen(big, tmp_path)
    tmp = run / "checkpoints" / ".tmp_step_000002"
    t0 = time.time()
    while not tmp.exists():
        assert proc.poll() is None and time.time() - t0 < 300, "the save of step 2 was never seen"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert not (run / "checkpoints" / "step_000002").exists(), "killed before the rename: step 2 is not complete"
    assert checkpoint.latest(run).name == "step_000001" and checkpoint.load(run)["step"] == 1
    res = popen([f"resume={run}"], tmp_path)
    assert res.wait(600) == 0, res.stderr.read()[-3000:]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3] and checkpoint.latest(run).name == "step_000003"
    assert not tmp.exists()


def test_debris_of_a_killed_save_is_ignored_then_replaced(tmp_path):
    checkpoint.save(tmp_path, 3, {"step": 3, "w": torch.ones(2)}, keep_last=2)
    # what a kill in the middle of saving step 6 leaves behind: a half-written temporary dir
    tmp = tmp_path / "checkpoints" / ".tmp_step_000006"
    tmp.mkdir()
    (tmp / "state.pt").write_bytes(b"\x80\x02truncated")
    assert checkpoint.latest(tmp_path).name == "step_000003"
    assert checkpoint.load(tmp_path)["step"] == 3
    checkpoint.save(tmp_path, 6, {"step": 6}, keep_last=2)          # the next save replaces the debris
    assert checkpoint.load(tmp_path)["step"] == 6 and not tmp.exists()
    checkpoint.save(tmp_path, 6, {"step": 66}, keep_last=2)         # re-saving a step (after a resume) replaces it
    checkpoint.save(tmp_path, 9, {"step": 9}, keep_last=2)
    assert [p.name for p in checkpoint.all_checkpoints(tmp_path)] == ["step_000006", "step_000009"]
    assert checkpoint.load_file(tmp_path / "checkpoints" / "step_000006" / "state.pt")["step"] == 66


def test_nan_rewards_skip_updates_then_stop_with_a_checkpoint(tmp_path, monkeypatch):
    """A NaN reward (injected into the real task's scores) makes every update non-finite: each is skipped and
    counted, the weights stay finite, and after trainer.max_nonfinite steps in a row the run stops with a checkpoint."""
    from gspo_cli import loop, tasks
    from gspo_cli.config import Config

    real_score = tasks.Task.score
    monkeypatch.setattr(tasks.Task, "score", lambda self, e, c: {**real_score(self, e, c), "reward": math.nan})
    cfg = Config()
    cfg.model.name, cfg.model.source = "tiny", "tiny"
    cfg.algo.group_size, cfg.trainer.prompts_per_step, cfg.trainer.minibatches = 2, 2, 2
    cfg.rollout.max_new_tokens, cfg.trainer.eval_every, cfg.trainer.max_nonfinite = 4, 0, 1
    cfg.logger.wandb.mode = "disabled"
    with pytest.raises(loop.Stop, match=r"trainer.max_nonfinite=1 exceeded: 2 steps in a row") as e:
        loop.train(cfg, tmp_path, {"algo": {"name": "gspo"}})
    assert e.value.code == 3
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad/nonfinite"] for r in rows] == [2, 2]
    state = checkpoint.load(tmp_path)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(1, 7), G=st.sampled_from([1, 2]), seed=st.integers(0, 10_000),
       spread=st.floats(0.0, 30.0), eps=st.floats(0.0, 0.5), equal_rewards=st.booleans())
def test_finite_inputs_never_give_nan_or_inf(B, T, G, seed, spread, eps, equal_rewards):
    g = torch.Generator().manual_seed(seed)
    B = B * 2 if G == 2 else B
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    logp = -torch.rand(B, T, generator=g) * 20
    old = logp + (torch.rand(B, T, generator=g) - 0.5) * spread                  # ratios up to e^15
    rewards = torch.ones(B) if equal_rewards else torch.rand(B, generator=g)
    adv = A.group_advantages(rewards, 2) if G == 2 else rewards - 0.5
    for loss, stats in (A.gspo_loss(logp, old, adv, mask, eps_low=eps, eps_high=eps),
                        A.gspo_loss(logp, old, adv, mask, variant="token"),
                        A.grpo_loss(logp, old, adv, mask, beta=0.04, ref_logp=old),
                        A.ppo_loss(logp, old, adv[:, None].expand(B, T), mask, values=logp, old_values=old,
                                   returns=old * 0.5)):
        assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in stats.values())
    r = A.ppo_token_rewards(rewards, old, logp, mask, 0.05)
    adv_t, ret = A.gae(r, old, mask)
    assert torch.isfinite(A.whiten(adv_t, mask)).all() and torch.isfinite(ret).all()
