"""Sweeps and `gspo compare`: a real 2-algorithm x 2-seed multirun of the tiny model, the table and PNGs from it,
incomplete runs listed, stability on synthetic curves, and submitit's local launcher (the SLURM code path).

    pytest tests/test_compare.py -q
"""
import csv
import json
import shutil
import subprocess

import numpy as np
import pytest

from conftest import TINY, gspo
from gspo_cli.compare import collapses

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    out = gspo("train", "-m", *TINY, "algo=gspo,grpo", "seed=0,1", "trainer.steps=3", "trainer.eval_every=3",
               "logger.wandb.mode=offline", f"hydra.sweep.dir={root}/sw", cwd=root, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "sw"


def wandb_records(run_dir):
    """Read an offline W&B run back with wandb's own reader (`wandb leet inspect --json`)."""
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    out = subprocess.run(["wandb", "leet", "inspect", "--json", str(offline)], capture_output=True, text=True,
                         timeout=120)
    return [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]


@pytest.mark.slow
def test_multirun_writes_one_dir_per_job_with_a_grouped_tagged_wandb_run(sweep):
    dirs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert dirs == ["0_gspo_s0", "1_gspo_s1", "2_grpo_s0", "3_grpo_s1"]
    records = wandb_records(sweep / "2_grpo_s0")
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["run_group"] == sweep.name, "W&B groups the sweep by its sweep dir"
    assert run["tags"] == ["algo=grpo", "seed=0", "task=arithmetic", "model=tiny"]
    logged = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [h["_step"] for h in logged] == [0, 1, 2, 3] and "clip/frac" in logged[1] and "reward/mean" in logged[3]


@pytest.mark.slow
def test_compare_table_plots_and_incomplete_runs(sweep, tmp_path):
    work = tmp_path / "sw"
    shutil.copytree(sweep, work)
    # make one run incomplete, as a crash would leave it
    m = work / "3_grpo_s1" / "metrics.jsonl"
    m.write_text("".join(ln + "\n" for ln in m.read_text().splitlines()[:2]))
    out = gspo("compare", str(work), "--out", str(tmp_path / "res"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "incomplete, left out" in out.stdout and "3_grpo_s1" in out.stdout
    rows = list(csv.DictReader(open(tmp_path / "res" / "compare.csv")))
    assert [(r["group"], r["seeds"]) for r in rows] == [("grpo", "1"), ("gspo", "2")]
    assert {"reward improvement", "eval accuracy before → after", "clip frac (low / high)", "KL to ref", "collapses",
            "non-finite steps", "grad-norm spike", "stability", "wall min/run"} <= set(rows[0])
    md = (tmp_path / "res" / "compare.md").read_text()
    assert md.startswith("| group |") and "Incomplete runs (left out)" in md and "3_grpo_s1" in md
    assert "not testable (one seed)" in md, md   # grpo has one complete seed here: no t-test
    for name in ("reward_mean", "eval_accuracy", "clip_frac", "kl_ref", "entropy", "grad_norm"):
        png = tmp_path / "res" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000, name


def test_compare_bad_inputs_are_one_line(tmp_path):
    bad = gspo("compare", str(tmp_path / "nope"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: compare dir") and bad.stderr.count("\n") == 1
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("algo: {name: gspo}\nseed: 0\ntrainer: {steps: 3}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2, "rew')
    bad = gspo("compare", str(tmp_path), cwd=tmp_path)
    assert bad.returncode == 2 and "is unreadable" in bad.stderr and bad.stderr.count("\n") == 1


def test_stability_detects_a_collapse_and_not_a_noisy_rise():
    rng = np.random.default_rng(0)
    steps = 60
    rising = np.clip(np.linspace(0.1, 0.8, steps) + rng.normal(0, 0.12, steps), 0, 1)
    assert collapses(rising) == 0
    collapse = np.concatenate([np.linspace(0.1, 0.8, 30), np.full(30, 0.05)]) + rng.normal(0, 0.05, steps)
    assert collapses(collapse) == 1
    brief_dip = np.concatenate([np.full(28, 0.8), [0.0, 0.0], np.full(30, 0.8)]) + rng.normal(0, 0.03, steps)
    assert collapses(brief_dip) == 0, "a dip shorter than 10 % of the steps is not a collapse"


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_one_job_sweep(tmp_path):
    out = gspo("train", "-m", "hydra/launcher=submitit_local", *TINY, "trainer.steps=2",
               "logger.wandb.mode=disabled", f"hydra.sweep.dir={tmp_path}/sub", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(ln) for ln in (tmp_path / "sub" / "0_gspo_s0" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2
    assert list((tmp_path / "sub" / ".submitit").rglob("*_result.pkl")), "ran through submitit's executor"


def fake_run(root, name, algo, seed, improvement, task="arithmetic", steps=10, extra=""):
    """A finished run dir as `gspo train` leaves it (config + metrics), with a chosen reward trend."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        f"algo: {{name: {algo}}}\nseed: {seed}\ntask: {{name: {task}}}\ntrainer: {{steps: {steps}}}\n{extra}")
    rng = np.random.default_rng(seed)
    rows = [{"step": 0, "eval/accuracy": 0.3}] + [
        {"step": t, "reward/mean": 0.2 + improvement * t / steps + 0.001 * rng.standard_normal(), "clip/frac": 0.01,
         "clip/frac_low": 0.0, "clip/frac_high": 0.01, "grad/norm": 1.0, "grad/nonfinite": 0, "kl/ref": 0.0,
         "time/step": 1.0} for t in range(1, steps + 1)]
    rows[-1]["eval/accuracy"] = 0.3 + improvement
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_compare_groups_by_what_differs_counts_a_run_once_and_marks_significance(tmp_path):
    root = tmp_path / "runs"
    for seed in range(3):
        fake_run(root, f"g{seed}", "gspo", seed, 0.5)
        fake_run(root, f"r{seed}", "grpo", seed, 0.1)
        fake_run(root, f"z{seed}", "gspo", seed, 0.3, task="zebra")
    out = gspo("compare", str(root), str(root / "g0"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = list(csv.DictReader(open(root / "compare" / "compare.csv")))       # the default: inside the first dir
    assert {r["group"]: r["seeds"] for r in rows} == {"gspo, task.name=arithmetic": "3", "gspo, task.name=zebra": "3",
                                                      "grpo, task.name=arithmetic": "3"}
    best = next(r for r in rows if r["group"] == "gspo, task.name=arithmetic")
    assert best["reward improvement"].startswith("+0.4") and "[" in best["reward improvement"]
    lines = {ln.split(":")[0]: ln for ln in out.stdout.splitlines() if "t-test" in ln or "spread" in ln}
    assert lines["reward improvement"].startswith("reward improvement: gspo, task.name=arithmetic leads gspo, "
                                                  "task.name=zebra by 0.18")
    assert lines["reward improvement"].endswith(": significant at 0.05)")
    assert lines["clip frac (low / high)"].endswith("no spread over seeds: not significant at 0.05")


def test_a_key_missing_from_older_runs_counts_as_its_default(tmp_path):
    """Runs written before an option existed group with new runs at its default, and apart from other values."""
    from gspo_cli import compare

    root = tmp_path / "runs"
    fake_run(root, "old", "gspo", 0, 0.5)                                             # no rollout.engine key
    fake_run(root, "new", "gspo", 1, 0.5, extra="rollout: {engine: hf}\n")
    fake_run(root, "eng", "gspo", 0, 0.5, extra="rollout: {engine: vllm}\n")
    groups = {r.path.name: r.group for r in compare.load_runs([str(root)])}
    assert groups == {"old": "gspo, rollout.engine=hf", "new": "gspo, rollout.engine=hf",
                      "eng": "gspo, rollout.engine=vllm"}


def test_compare_help_prints_usage(tmp_path):
    out = gspo("compare", "--help", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("usage: gspo compare")
