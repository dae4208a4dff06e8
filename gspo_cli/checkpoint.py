"""Atomic, complete checkpoints: one directory per saved step, written under a temporary name and renamed.

A checkpoint holds everything the next step depends on (nanoGPT's single dict, plus what RL needs): model and
optimizer and scheduler state, the step, the prompt cursor, every RNG (python, numpy, torch, the sampling and
shuffling generators), the W&B run id and the resolved config. A kill during a save leaves the previous
checkpoint intact; `keep_last` bounds the number on disk. Loading never runs code from the file: `torch.load` with
`weights_only=True` and an allow-list of the numpy types the RNG states use; anything else is refused.
"""
from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from . import distributed, models
from .config import ConfigError

PREFIX = "step_"
SAFE_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]  # numpy's RNG state


class SaveError(OSError):
    """A checkpoint could not be written (disk full, ...); the previous checkpoint is intact."""


def save(run_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"{PREFIX}{step:06d}", root / f".tmp_{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        torch.save(state, tmp / "state.pt")
        with open(tmp / "state.pt", "rb") as f:
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError from its zip writer
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest(run_dir)
        raise SaveError(f"checkpoint of step {step} not written ({str(e).splitlines()[0][:100]}); "
                        f"{'the previous checkpoint ' + str(last) + ' is intact' if last else 'no earlier checkpoint'}"
                        "; free space and continue with resume=" + str(run_dir)) from None
    if final.exists():  # re-saving a step (a resumed run): retire the old one under a temporary name first
        old = root / f".old_{PREFIX}{step:06d}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for stale in all_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def all_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.pt").is_file())


def latest(run_dir: Path) -> Path | None:
    found = all_checkpoints(run_dir)
    return found[-1] if found else None


def load_file(path: Path) -> dict:
    """One state.pt, unpickled with weights_only (no code runs); ConfigError naming the file if that fails."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — truncated, garbage or a pickle asking for code: all are refused
        raise ConfigError(f"checkpoint {str(path)!r} is not loadable ({str(e).strip().splitlines()[-1][:160]}): "
                          "expected a state.pt written by gspo train") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ConfigError(f"checkpoint {str(path)!r} holds no gspo state: expected a state.pt written by gspo train")
    return state


def load(run_dir: str | Path, warn=print, what: str = "resume") -> dict:
    """The newest loadable checkpoint of a run dir; an unreadable newer one is skipped with a line through `warn`.
    ConfigError if there is none."""
    found = all_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"{what} {str(run_dir)!r}: not a run dir with a checkpoint: expected a gspo run dir "
                          "containing checkpoints/step_*/state.pt")
    for ck in reversed(found):
        try:
            return load_file(ck / "state.pt")
        except ConfigError as e:
            if ck == found[0]:
                raise
            warn(f"skipped {ck}: {e}")
    raise AssertionError("unreachable")


def load_run_or_checkpoint(path: Path, what: str) -> dict:
    """One checkpoint dir's state, or a run dir's newest loadable one (gspo eval, gspo export)."""
    return load_file(path / "state.pt") if (path / "state.pt").is_file() else load(path, what=what)


def rng_state(*generators: torch.Generator) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "generators": [g.get_state() for g in generators]}


def set_rng_state(state: dict, *generators: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)


def restore(p, state: dict | None, run_dir: Path) -> tuple[int, int, str | None]:
    """Into the loop's parts (`loop.Parts`): weights, optimizer, schedule and every rank's RNGs from a checkpoint
    -> (step, prompt cursor, W&B run id)."""
    if state is None:
        return 0, 0, None
    models.load_trainable_state(p.policy, state["model"])
    p.opt.load_state_dict(state["optimizer"])
    p.sched.load_state_dict(state["scheduler"])
    saved_rngs = state.get("rng_ranks", [state["rng"]])
    if len(saved_rngs) != p.ranks.world:
        raise ConfigError(f"resume={str(run_dir)!r} was written by {len(saved_rngs)} rank(s), this run has "
                          f"{p.ranks.world}: expected trainer.devices={len(saved_rngs)} to continue it exactly")
    set_rng_state(saved_rngs[p.ranks.rank], p.sample_gen, p.shuffle_gen)
    if p.ranks.main:
        print(f"resumed from step {state['step']}", file=sys.stderr)
    return state["step"], state["cursor"], state["wandb_id"]


def save_run(p, run_dir: Path, step: int, cursor: int, wandb_id, config_dict: dict) -> None:
    """Everything the loop's parts (`loop.Parts`) need to continue, from every rank, written by rank 0."""
    rngs = distributed.gather_objects(rng_state(p.sample_gen, p.shuffle_gen), p.ranks)
    if p.ranks.main:
        save(run_dir, step, {
            "step": step, "cursor": cursor, "wandb_id": wandb_id, "config": config_dict,
            "model": models.trainable_state(p.policy), "optimizer": p.opt.state_dict(),
            "scheduler": p.sched.state_dict(), "rng": rngs[0], "rng_ranks": rngs}, p.cfg.trainer.keep_last)
