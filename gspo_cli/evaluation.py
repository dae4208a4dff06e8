"""Held-out evaluation, shared by the in-run eval and `gspo eval`: greedy accuracy and, with `eval.samples=k`,
pass@k' (the unbiased estimator of Chen et al. 2021, arXiv 2107.03374, eq. 1) for every k' in `eval.k` and maj@k
(the majority answer over the k samples, scored by the task's verifier).

    gspo eval RUN                                   # the run's last checkpoint, its own task and settings
    gspo eval RUN/checkpoints/step_000020 eval.samples=8 eval.k=[1,4,8] rollout.temperature=1.0
    gspo eval model=smollm2-135m task.eval_size=64  # an untrained model
"""
from __future__ import annotations

import json
from collections import Counter
from math import comb
from pathlib import Path

import numpy as np

from .config import Config


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 − C(n − c, k) / C(n, k): the chance that at least one of k of the n samples is correct, c of n correct."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(answers: list, correct: list) -> float:
    """1 if the most frequent extracted answer (ties: the first seen; None never wins) is a correct one."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0.0
    best = max(counts, key=lambda a: (counts[a], -answers.index(a)))
    return float(correct[answers.index(best)])


def summarize(greedy: list[dict], sampled: list[list[dict]], ks: list[int], details: dict | None = None) -> dict:
    """Metrics from per-prompt scores: greedy (one per prompt) and, when sampling, k scored samples per prompt.
    `details`, when given, receives the per-prompt counts behind them (what eval.json records)."""
    if details is not None:
        details["greedy_correct"] = [int(s["correct"]) for s in greedy]
        details["samples_correct"] = [int(sum(s["correct"] for s in row)) for row in sampled]
    out = {"eval/accuracy": float(np.mean([s["correct"] for s in greedy])),
           "eval/reward": float(np.mean([s["reward"] for s in greedy]))}
    if sampled:
        n = len(sampled[0])
        for k in ks:
            out[f"eval/pass@{k}"] = float(np.mean([pass_at_k(n, int(sum(s["correct"] for s in row)), k)
                                                   for row in sampled]))
        out[f"eval/maj@{n}"] = float(np.mean([majority_correct([s["answer"] for s in row],
                                                               [s["correct"] for s in row]) for row in sampled]))
    return out


def write(path: Path, cfg: Config, metrics: dict, source: str, details: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"source": source, "task": cfg.task.name, "dataset": cfg.task.dataset,
                                "prompts": len(details["greedy_correct"]), "samples": cfg.eval.samples,
                                "temperature": cfg.rollout.temperature, **metrics, **details}, indent=1) + "\n")
    return path


def show(metrics: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        t.add_row(k, f"{v:.4f}")
    Console().print(t)


def run_config(target: str | None, overrides: list[str]):
    """The eval's config and weights: a run's (or one checkpoint's) saved config with this command's overrides on
    top (`task=` swaps the task; `model=` is refused, the weights are the run's), or a fresh composition for an
    untrained model. -> (Config, checkpoint state or None, default eval.json path)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from . import checkpoint
    from .cli import CONF_DIR, _plain_saved_config
    from .config import ConfigError, to_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        composed = compose(config_name="config", overrides=overrides)
    if target is None:
        return to_config(composed), None, Path("eval.json")
    path = Path(target)
    if not path.is_dir():
        raise ConfigError(f"gspo eval {target!r}: not a directory: expected a run dir or one of its checkpoint dirs")
    state = checkpoint.load_run_or_checkpoint(path, "gspo eval")
    keys = {o.lstrip("+").split("=", 1)[0] for o in overrides}
    if "model" in keys:
        raise ConfigError(f"model= with gspo eval {target!r}: expected no model override (the weights are the run's)")
    saved = _plain_saved_config(state["config"], target)
    saved.logger, saved.eval = composed.logger, composed.eval
    for group in ("task", "optim"):
        if group in keys:
            saved[group] = composed[group]
    dotted = [o.lstrip("+") for o in overrides if "." in o.split("=", 1)[0]]
    cfg = to_config(OmegaConf.merge(saved, OmegaConf.from_dotlist(dotted)))
    ckpt = path if (path / "state.pt").is_file() else path / "checkpoints" / f"{checkpoint.PREFIX}{state['step']:06d}"
    return cfg, state, ckpt / "eval.json"


def main(args: list[str]) -> None:
    """`gspo eval [RUN | CHECKPOINT_DIR] [overrides]`."""
    from . import loop, models

    target = args[0] if args and "=" not in args[0] else None
    cfg, state, default_out = run_config(target, args[1:] if target else args)
    cfg.trainer.eval_every, cfg.logger.wandb.mode = 1, "disabled"
    p = loop.build(cfg, loop.Ranks())
    if state is not None:
        models.load_trainable_state(p.policy, state["model"])
        loop.sync_engine(p)
    details = {}
    metrics = loop.evaluate(p, details)
    out = write(Path(cfg.eval.out) if cfg.eval.out else default_out, cfg, metrics,
                f"{target} (step {state['step']})" if state else f"model={cfg.model.name}, untrained", details)
    show(metrics, f"gspo eval: {cfg.model.name} on {cfg.task.name} ({len(p.task.eval_entries)} prompts)")
    print(f"wrote {out}")

