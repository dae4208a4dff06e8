"""What a hostile user tries: crafted checkpoints, concurrent runs, kills at bad moments, a full disk, meaningless
values, signals to the launcher. Each through the real console script or the real loader.

    pytest tests/test_faults.py -q
"""
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import ENV, GSPO, LEARNS, TINY, gspo, read_metrics
from gspo_cli import checkpoint

QUIET = [*TINY, "logger.wandb.mode=disabled"]


def one_error_line(out, start: str, code: int = 2) -> None:
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith(("error:", "stopped:"))]
    assert out.returncode == code, out.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith(start), out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step tiny GRPO run (seed 3) with checkpoints at steps 1 and 2."""
    d = tmp_path_factory.mktemp("finished")
    run = d / "run"
    out = gspo("train", *QUIET, *LEARNS, "algo=grpo", "seed=3", "trainer.steps=2", f"hydra.run.dir={run}", cwd=d)
    assert out.returncode == 0, out.stderr[-2000:]
    return run


def copy_run(src, dst):
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


class WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):          # what a crafted pickle does: call a function of its choosing on load
        return (open, (self.path, "w"))


@pytest.mark.slow
def test_a_crafted_checkpoint_is_refused_and_runs_no_code(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    target = tmp_path / "pwned"
    for ck in checkpoint.all_checkpoints(run):
        torch.save({"step": 2, "payload": WritesAFile(str(target))}, ck / "state.pt")
    out = gspo("train", f"resume={run}", "trainer.steps=3", cwd=tmp_path)
    one_error_line(out, "error: checkpoint ")
    assert "is not loadable" in out.stderr and not target.exists()


@pytest.mark.slow
def test_a_checkpoint_config_with_an_interpolation_is_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    state = checkpoint.load(run)
    state["config"]["logger"]["wandb"]["project"] = "${oc.env:HOME}"
    torch.save(state, checkpoint.latest(run) / "state.pt")
    one_error_line(gspo("train", f"resume={run}", "trainer.steps=3", cwd=tmp_path),
                   f"error: resume='{run}': the checkpoint's config holds an interpolation ('${{oc.env:HOME}}')")


@pytest.mark.slow
def test_a_checkpoint_cannot_switch_wandb_online(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    state = checkpoint.load(run)
    state["config"]["logger"]["wandb"].update(mode="online", project="someone-elses")
    torch.save(state, checkpoint.latest(run) / "state.pt")
    out = gspo("train", f"resume={run}", "trainer.steps=3", LEARNS[0], "logger.wandb.mode=disabled", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert checkpoint.load(run)["config"]["logger"]["wandb"]["mode"] == "disabled"


@pytest.mark.slow
def test_resume_keeps_the_runs_config_and_compare_reports_it(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    assert gspo("train", f"resume={run}", "trainer.steps=3", LEARNS[0], cwd=tmp_path).returncode == 0
    refused = gspo("train", f"resume={run}", "algo=gspo", "trainer.steps=4", cwd=tmp_path)
    assert refused.returncode == 2
    from omegaconf import OmegaConf
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert (saved.algo.name, saved.seed, saved.trainer.steps) == ("grpo", 3, 2)
    out = gspo("compare", str(run), "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    row = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()[1]
    assert row.startswith("grpo,1,"), row


@pytest.mark.slow
def test_resume_of_a_checkpoint_dir_and_of_a_finished_run_are_refused(finished, tmp_path):
    ck = checkpoint.latest(finished)
    one_error_line(gspo("train", f"resume={ck}", cwd=tmp_path),
                   f"error: resume='{ck}' is a checkpoint dir: expected its run dir ({finished})")
    one_error_line(gspo("train", f"resume={finished}", "trainer.steps=1", LEARNS[0], cwd=tmp_path),
                   "error: trainer.steps=1 is invalid: the checkpoint in resume=")
    one_error_line(gspo("train", *QUIET, "trainer.steps=3", f"hydra.run.dir={finished}", cwd=tmp_path),
                   f"error: hydra.run.dir='{finished}' already holds a run with checkpoints: expected resume=")


@pytest.mark.slow
def test_a_checkpoint_for_another_model_shape_is_one_line(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    one_error_line(gspo("train", f"resume={run}", "trainer.steps=3", "model.tiny_hidden=128", LEARNS[0], cwd=tmp_path),
                   "error: resume: the checkpoint's weights do not fit this model")


@pytest.mark.slow
def test_a_garbage_newest_checkpoint_falls_back_to_the_older_one(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    newest = checkpoint.latest(run)
    (newest / "state.pt").write_bytes((newest / "state.pt").read_bytes()[:1000])       # cut by a crash
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/me')                                                   # a line cut too
    out = gspo("train", f"resume={run}", "trainer.steps=3", LEARNS[0], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"warning: skipped {newest}" in out.stderr and "resumed from step 1" in out.stderr
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_second_run_on_the_same_dir_is_refused_while_the_first_runs(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([GSPO, "train", *QUIET, "trainer.steps=200", f"hydra.run.dir={run}"], cwd=tmp_path,
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (run / "metrics.jsonl").exists():
            assert first.poll() is None and time.time() - t0 < 120, first.stderr.read()[-2000:]
            time.sleep(0.1)
        out = gspo("train", *QUIET, "trainer.steps=2", f"hydra.run.dir={run}", cwd=tmp_path)
        one_error_line(out, f"error: hydra.run.dir='{run}' is in use by another gspo train (pid {first.pid})")
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_resume_auto_after_a_kill_before_the_first_checkpoint_starts_clean(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "trainer.steps=3", "trainer.save_every=100", f"hydra.run.dir={run}"]
    proc = subprocess.Popen([GSPO, "train", *args, "trainer.steps=50"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ((run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 2):
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest(run) is None
    out = gspo("train", *args, "resume=auto", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]
    assert len(list((run / "wandb").glob("offline-run-*"))) >= 1
    ids = {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")}
    assert len(ids) == 1, f"one W&B run, not two: {ids}"


def test_a_full_disk_during_a_save_is_one_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from gspo_cli import loop
    from gspo_cli.config import Config

    real_save = torch.save

    def full_disk(obj, path, *a, **kw):
        if obj.get("step") == 2:
            with open(path, "wb") as f:
                f.write(b"\0" * 1000)                    # a partly written file, then the disk is full
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **kw)
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    cfg = Config()
    cfg.model.name, cfg.model.source, cfg.algo.group_size, cfg.trainer.prompts_per_step = "tiny", "tiny", 2, 2
    cfg.trainer.minibatches, cfg.rollout.max_new_tokens, cfg.trainer.eval_every = 2, 4, 0
    cfg.trainer.save_every, cfg.trainer.steps, cfg.logger.wandb.mode = 1, 3, "disabled"
    with pytest.raises(checkpoint.SaveError, match=r"^checkpoint of step 2 not written \(\[Errno 28\] No space left "
                                                    r"on device\); the previous checkpoint .*step_000001 is intact"):
        loop.train(cfg, tmp_path, {"algo": {"name": "gspo"}})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]
    assert checkpoint.load(tmp_path)["step"] == 1


def test_weights_that_become_non_finite_in_a_step_stop_the_run(tiny, restored):
    """A finite loss and gradient, but an update that overflows fp32: the run stops instead of going on (and
    checkpointing) with non-finite weights."""
    from conftest import run_update, tiny_rollout
    from gspo_cli import algorithms, loop
    from gspo_cli.config import Config

    model, tok = tiny
    cfg = Config()
    cfg.trainer.minibatches, cfg.trainer.max_grad_norm, cfg.optim.lr = 1, 1e30, 3e38
    adv = 1e3 * algorithms.group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), 4)     # gradients > 1
    with pytest.raises(loop.Stop, match=r"^the weights became non-finite in an optimizer step \(optim.lr=3e\+38\)"):
        run_update(model, tiny_rollout(model, tok), adv, cfg, opt=torch.optim.SGD(model.parameters(), lr=3e38))


def test_the_finite_weights_check_is_exact_past_the_norms_range():
    """The fast check's norm overflows for finite weights of 1e20; it must still say finite, and catch one NaN or
    inf among finite tensors."""
    from gspo_cli.loop import finite

    assert finite([torch.ones(3), torch.full((4,), 1e20)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not finite([torch.ones(3), torch.tensor([1.0, bad])])


@pytest.mark.parametrize("overrides,start", [
    (["task.eval_size=3000"], "error: task.eval_size=3000 holds out 200 questions"),
    (["task=reasoning_gym"], "error: task.dataset='' is invalid: expected a reasoning-gym dataset name"),
    (["logger.wandb.mode=online"], "error: logger.wandb.mode='online': W&B did not start"),
    (["task.reward_fn=rewards:nope"], "error: task.reward_fn='rewards:nope' cannot be imported"),
    (["task.reward_fn=rewards:not_a_number"], "error: task.reward_fn='rewards:not_a_number' returned 'seven'"),
])
def test_silent_wrong_runs_are_one_line_now(tmp_path, overrides, start):
    env = {k: v for k, v in ENV.items() if not k.startswith(("WANDB_API", "WANDB_MODE"))}
    out = subprocess.run([GSPO, "train", *QUIET, *overrides], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    one_error_line(out, start)


def test_reasoning_gym_params_by_override(compose):
    from gspo_cli.config import to_config

    cfg = to_config(compose("task=reasoning_gym", "task.dataset=leg_counting", "+task.params.max_animals=4"))
    assert cfg.task.params == {"max_animals": 4}


@pytest.mark.slow
def test_sigterm_to_the_launcher_reaches_every_rank_and_it_waits(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([GSPO, "train", *QUIET, "trainer.devices=2", "trainer.steps=100", "trainer.save_every=100",
                             "trainer.threads=1", f"hydra.run.dir={run}"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.time()
    while not ((run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 2):
        assert proc.poll() is None and time.time() - t0 < 300, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)                 # to the launcher only, as a user's `kill PID` does
    _, err = proc.communicate(timeout=300)
    last = read_metrics(run)[-1]["step"]
    assert f"stopped by SIGTERM after step {last}; checkpoint saved" in err, err[-3000:]
    assert checkpoint.latest(run).name == f"step_{last:06d}" and last < 100
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)                        # no rank trains on in the background


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_with_the_last_checkpoint_intact(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([GSPO, "train", *QUIET, "model.tiny_hidden=256", "rollout.max_new_tokens=256",
                             "trainer.steps=50", f"hydra.run.dir={run}"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while checkpoint.latest(run) is None:
        assert proc.poll() is None and time.time() - t0 < 300, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    t1 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - t1 < 10, err[-2000:]
    assert "stopped: interrupted twice, at once; the last checkpoint" in err
    assert json.dumps(checkpoint.load(run)["step"])


def test_signal_handlers_are_restored_after_an_in_process_run(tmp_path):
    from gspo_cli import loop
    from gspo_cli.config import Config

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    cfg = Config()
    cfg.model.name, cfg.model.source, cfg.algo.group_size, cfg.trainer.prompts_per_step = "tiny", "tiny", 2, 2
    cfg.trainer.minibatches, cfg.rollout.max_new_tokens, cfg.trainer.eval_every = 2, 4, 0
    cfg.trainer.steps, cfg.logger.wandb.mode = 1, "disabled"
    loop.train(cfg, tmp_path, {"algo": {"name": "gspo"}})
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
