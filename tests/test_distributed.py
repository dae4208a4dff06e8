"""Data parallel with PyTorch's own engine, for real: 2 `torchrun` ranks (gloo, CPU) against 1 process.

    pytest tests/test_distributed.py -q
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ENV, TINY, gspo, read_metrics
from ddp_worker import run
from gspo_cli.distributed import Ranks

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize("algo,agg", [("gspo", "seq_mean_token_mean"), ("grpo", "token_mean"), ("ppo", "token_mean")])
def test_two_gloo_ranks_give_the_gradients_of_one_process_over_the_global_batch(tmp_path, algo, agg):
    out = tmp_path / "rank0.pt"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HERE / "ddp_worker.py"), algo, agg, str(out)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=False)
    torch.set_num_threads(1)
    one = run(algo, agg, Ranks())
    assert one["stats"]["grad/norm"] > 0
    assert ddp["stats"]["grad/norm"] == pytest.approx(one["stats"]["grad/norm"], rel=1e-5)
    for name, g in one["grads"].items():
        torch.testing.assert_close(ddp["grads"][name], g, rtol=1e-4, atol=1e-7, msg=f"gradient of {name}")
        torch.testing.assert_close(ddp["params"][name], one["params"][name], rtol=1e-5, atol=1e-7, msg=name)





@pytest.mark.slow
def test_two_rank_run_logs_once_checkpoints_on_rank_0_and_resumes_exactly(tmp_path):
    args = [*TINY, "trainer.prompts_per_step=4", "trainer.devices=2", "logger.wandb.mode=offline"]
    straight, part = tmp_path / "straight", tmp_path / "part"
    out = gspo("train", *args, "trainer.steps=3", f"hydra.run.dir={straight}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "launching 2 ranks" in out.stderr
    got = read_metrics(straight)
    assert [r["step"] for r in got] == [0, 1, 2, 3], "rank 0 alone writes metrics: one row per step"
    assert len(list((straight / "wandb").glob("offline-run-*"))) == 1
    state = torch.load(straight / "checkpoints" / "step_000003" / "state.pt", weights_only=False)
    assert len(state["rng_ranks"]) == 2 and state["config"]["trainer"]["devices"] == 2

    assert gspo("train", *args, "trainer.steps=2", f"hydra.run.dir={part}", cwd=tmp_path).returncode == 0
    out = gspo("train", f"resume={part}", "trainer.steps=3", cwd=tmp_path)    # 2 ranks again, from the checkpoint
    assert out.returncode == 0, out.stderr[-3000:]
    assert read_metrics(part) == got

    out = gspo("train", f"resume={part}", "trainer.devices=1", "trainer.steps=4", cwd=tmp_path)
    assert out.returncode == 2 and "was written by 2 rank(s), this run has 1" in out.stderr


@pytest.mark.slow
def test_bare_torchrun_needs_one_run_dir_for_all_ranks(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "gspo_cli.cli", "train", *TINY, "trainer.steps=1"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error: hydra.run.dir is unset under torchrun: expected hydra.run.dir=DIR" in proc.stderr


def test_slurm_presets_compose_and_a_requeued_job_resumes():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import gspo_cli.cli  # noqa: F401  registers the schema

    with initialize_config_dir(config_dir=str(HERE.parent / "conf"), version_base="1.3"):
        launcher = compose(config_name="config", overrides=["hydra/launcher=slurm_8gpu"],
                           return_hydra_config=True).hydra.launcher
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.max_num_timeout) == (8, 8, 3)
    job = instantiate(launcher)
    again = job.checkpoint(["algo=gspo", "seed=1", "resume=null"], "hydra.sweep.dir", 0, "job", {})
    assert again.args[0] == ["algo=gspo", "seed=1", "resume=auto"], "the requeued job continues from its checkpoint"


@pytest.mark.slow
def test_slurm_tasks_become_ranks_through_submitit_environment(tmp_path):
    """Two `gspo train` processes with the variables SLURM gives two tasks of one job (what slurm_8gpu starts,
    at 2 instead of 8): submitit's TorchDistributedEnvironment makes them ranks 0 and 1 of one gloo group."""
    run = tmp_path / "r"
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1",
             "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": "29531"}
    procs = [subprocess.Popen([sys.executable, "-m", "gspo_cli.cli", "train", *TINY, "trainer.prompts_per_step=4",
                               "trainer.steps=2", "logger.wandb.mode=disabled", f"hydra.run.dir={run}"], cwd=tmp_path,
                              env={**ENV, **slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
                                   "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    state = torch.load(run / "checkpoints" / "step_000002" / "state.pt", weights_only=False)
    assert state["config"]["trainer"]["devices"] == 2 and len(state["rng_ranks"]) == 2
