"""Where a run's numbers go: metrics.jsonl (the source of truth), W&B (offline by default), samples.jsonl, and the
console (a rich progress bar on a terminal, one plain line per step elsewhere, a summary table at the end)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import torch

from . import algorithms, distributed
from .config import ConfigError

console = Console(stderr=True)
PROGRESS_KEYS = {"reward/mean": "reward", "reward/accuracy": "acc", "eval/accuracy": "eval_acc", "clip/frac": "clip",
                 "time/step": "s/step"}
SUMMARY_KEYS = ("reward/mean", "reward/accuracy", "eval/accuracy", "clip/frac", "kl/ref", "entropy", "len/mean",
                "grad/norm", "time/step")


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the rows of steps <= last_step (none on a fresh start): a resumed run re-does what came after its
    checkpoint. A line cut by a crash is dropped."""
    if path.exists():
        rows = []
        for ln in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if last_step > 0 and row.get("step", last_step + 1) <= last_step:
                rows.append(ln)
        path.write_text("".join(r + "\n" for r in rows))


class NullLogger:
    """What ranks other than 0 log to: nothing. The same methods as RunLogger, so the loop has no `if rank 0`."""
    history: list = []
    wandb_id = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def samples(self, rows: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger:
    def __init__(self, run_dir: Path, config: dict, *, steps: int, start_step: int, wandb_cfg, wandb_id=None,
                 name: str = ""):
        self.run_dir, self.steps = Path(run_dir), steps
        self.metrics_path, self.samples_path = self.run_dir / "metrics.jsonl", self.run_dir / "samples.jsonl"
        for p in (self.metrics_path, self.samples_path):
            _truncate_jsonl(p, start_step)
        self.history: list[dict] = []
        self.wandb = None
        if wandb_cfg.mode != "disabled":
            import wandb

            id_file = self.run_dir / "wandb" / "gspo_run_id"  # a restart before the first checkpoint: the same run
            wandb_id = wandb_id or (id_file.read_text().strip() if id_file.is_file() else None)
            try:
                self.wandb = wandb.init(project=wandb_cfg.project, group=wandb_cfg.group, tags=list(wandb_cfg.tags),
                                        name=name or self.run_dir.name, dir=str(self.run_dir), mode=wandb_cfg.mode,
                                        id=wandb_id, resume="allow", config=config,
                                        settings=wandb.Settings(console="off", silent=True))
            except Exception as e:  # noqa: BLE001 — wandb raises many types (no credentials, no network, ...)
                raise ConfigError(f"logger.wandb.mode={wandb_cfg.mode!r}: W&B did not start "
                                  f"({str(e).strip().splitlines()[0][:120]}): expected `wandb login` for online, or "
                                  "logger.wandb.mode=offline") from None
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(self.wandb.id)
        self.wandb_id = self.wandb.id if self.wandb is not None else None
        self.progress = None
        if console.is_terminal:
            self.progress = Progress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                                     TextColumn("{task.fields[info]}"), console=console)
            self.task = self.progress.add_task("train", total=steps, completed=start_step, info="")
            self.progress.start()

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.history.append(row)
        info = "  ".join(f"{label}={metrics[k]:.3g}" for k, label in PROGRESS_KEYS.items() if k in metrics)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        else:
            console.print(f"step {step}/{self.steps}  {info}", highlight=False)

    def samples(self, rows: list[dict]) -> None:
        with open(self.samples_path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.wandb is not None:
            self.wandb.finish()
        table = Table(title=f"run {self.run_dir}")
        table.add_column("metric")
        table.add_column("first", justify="right")
        table.add_column("last", justify="right")
        for k in SUMMARY_KEYS:
            vals = [r[k] for r in self.history if k in r and not (isinstance(r[k], float) and math.isnan(r[k]))]
            if vals:
                table.add_row(k, f"{vals[0]:.4g}", f"{vals[-1]:.4g}")
        console.print(table)


def step_row(p, batch, old_logp, ref_logp, stats: dict, t0, t1, t2) -> dict:
    """The step's metrics row from the loop's parts and batch (`loop.Parts`, `loop.Batch`): per-response metrics
    over the global batch, then every rank's stats reduced."""
    trainer, mask, token_mean = p.cfg.trainer, batch.roll.mask, algorithms.token_mean
    rows = torch.tensor([[s["correct"], s["format"], s["error"]] for s in batch.scores], dtype=torch.float32,
                        device=p.device)                                                               # (B, 3)
    rows = torch.cat([batch.rewards[:, None], rows, mask.sum(-1, keepdim=True),
                      (~batch.roll.finished).float()[:, None]], dim=1)                                # (B, 6)
    r, correct, fmt, err, lengths, clipped = distributed.gather(rows, p.ranks).T.contiguous()      # (B_all,) x6
    return {"reward/mean": r.mean().item(), "reward/std": r.std().item(), "reward/accuracy": correct.mean().item(),
            "reward/format": fmt.mean().item(), "reward/verifier_errors": err.sum().item(),
            "reward/zero_std_frac": (r.view(-1, p.cfg.algo.group_size).std(-1) == 0).float().mean().item(),
            "len/mean": lengths.mean().item(), "len/clipped_frac": clipped.mean().item(),
            **distributed.reduce_metrics({
                **stats,
                "kl/ref": token_mean(algorithms.k3_kl(old_logp, ref_logp), mask).item() if ref_logp is not None
                else float("nan"),
                "entropy": token_mean(batch.roll.entropy, mask).item(), "lr": p.sched.get_last_lr()[0],
                "time/rollout": t1 - t0, "time/update": t2 - t1, "time/step": t2 - t0,
                "tokens_per_s": mask.sum().item() * (1 + trainer.epochs) / (t2 - t0)}, p.ranks, p.device)}
