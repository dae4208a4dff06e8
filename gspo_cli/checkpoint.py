"""Atomic, complete checkpoints: one directory per saved step, written under a temporary name and renamed.

A checkpoint holds everything the next step depends on (nanoGPT's single dict, plus what RL needs): model and
optimizer and scheduler state, the step, the prompt cursor, every RNG (python, numpy, torch, the sampling and
shuffling generators), the W&B run id and the resolved config. A kill during a save leaves the previous
checkpoint intact; `keep_last` bounds the number on disk.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError

PREFIX = "step_"


def save(run_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"{PREFIX}{step:06d}", root / f".tmp_{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    with open(tmp / "state.pt", "rb") as f:
        os.fsync(f.fileno())
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


def load(run_dir: str | Path) -> dict:
    """The newest checkpoint of a run dir (or a checkpoint dir itself); ConfigError if there is none."""
    p = Path(run_dir)
    ck = p if (p / "state.pt").is_file() else latest(p)
    if ck is None:
        raise ConfigError(f"resume={str(run_dir)!r} is not a run dir with a checkpoint: expected a gspo run dir "
                          "containing checkpoints/step_*/state.pt")
    return torch.load(ck / "state.pt", map_location="cpu", weights_only=False)


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
