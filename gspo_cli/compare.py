"""`gspo compare DIR... [--out DIR]`: turn finished runs into the results table and plots.

Reads every run dir below the given dirs (a dir holding `metrics.jsonl` and `.hydra/config.yaml`; a run named twice
counts once), groups complete runs by every config key that differs between them except the seed (so runs of
another task or lr never merge into one row), and writes `compare.md`, `compare.csv` and one PNG per metric (mean
over seeds, seed range shaded) to `--out` (default: `compare/` inside the first dir). Each number is the mean over
seeds with a 95 % t-interval; for the headline metrics the table says whether the best group's lead over the next
is significant (Welch's t-test over seeds, p < 0.05). Runs that stopped before `trainer.steps` are listed as
incomplete and left out of every number.
Column definitions: docs/results.md.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from .config import Config, ConfigError

PLOTS = {"reward/mean": "linear", "eval/accuracy": "linear", "clip/frac": "log", "kl/ref": "linear",
         "entropy": "linear", "grad/norm": "linear"}
COLUMNS = ["group", "seeds", "reward improvement", "eval accuracy before → after", "clip frac (low / high)",
           "KL to ref", "collapses", "non-finite steps", "grad-norm spike", "stability", "wall min/run"]


IGNORED = ("seed", "resume", "logger.", "trainer.device", "trainer.threads", "trainer.devices", "task.eval_seed")
HEADLINE = {"reward improvement": "improvement", "eval accuracy before → after": "eval_after",
            "clip frac (low / high)": "clip"}


@dataclass
class Run:
    path: Path
    algo: str
    seed: int
    steps: int
    rows: list = field(default_factory=list)
    flat: dict = field(default_factory=dict)     # the run's config as dotted key -> value
    group: str = ""                               # what sets it apart from the other runs compared

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one metric; step 0 holds only the pre-training eval."""
        pts = [(r["step"], r[key]) for r in self.rows if r.get(key) is not None]
        return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)

    @property
    def complete(self) -> bool:
        return any(r["step"] == self.steps and "reward/mean" in r for r in self.rows)


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, val in node.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    return {prefix[:-1]: str(node)}


def label_groups(runs: list[Run]) -> None:
    """Each run's group: algo.name plus every other key whose value differs between the runs (except the seed and
    logging); algo.* knobs name a group only where runs of the same algorithm differ in them."""
    keys = sorted({k for r in runs for k in r.flat})
    differ = [k for k in keys if not k.startswith(IGNORED) and len({r.flat.get(k) for r in runs}) > 1]
    for r in runs:
        same_algo = [x for x in runs if x.algo == r.algo]
        parts = [f"{k}={r.flat.get(k)}" for k in differ if k != "algo.name" and
                 (not k.startswith("algo.") or len({x.flat.get(k) for x in same_algo}) > 1)]
        r.group = ", ".join([r.algo, *parts])


def load_runs(dirs: list[str]) -> list[Run]:
    runs, seen = [], set()
    # A key that a run's config lacks (written before the key existed) has the schema's default value, so adding
    # an option does not split old runs from new ones.
    defaults = _flat(dataclasses.asdict(Config()))
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise ConfigError(f"compare dir {d!r} does not exist: expected a run or sweep dir")
        for metrics in sorted(root.rglob("metrics.jsonl")):
            run_dir = metrics.parent
            if run_dir.resolve() in seen:       # `gspo compare RUN RUN` or a dir inside another: one run
                continue
            seen.add(run_dir.resolve())
            cfg_path = run_dir / ".hydra" / "config.yaml"
            if not cfg_path.is_file():
                continue
            cfg = OmegaConf.load(cfg_path)
            try:
                rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"metrics file {str(metrics)!r} is unreadable ({e}): expected one JSON object "
                                  "per line as gspo train writes it") from None
            flat = {**defaults, **_flat(OmegaConf.to_container(cfg))}
            runs.append(Run(run_dir, cfg.algo.name, int(cfg.seed), int(cfg.trainer.steps), rows, flat))
    if not runs:
        raise ConfigError(f"compare dirs {dirs!r} hold no run: expected dirs with metrics.jsonl and .hydra/config.yaml")
    label_groups(runs)
    return runs


def collapses(reward: np.ndarray, window: int = 5, min_frac: float = 0.1) -> int:
    """Count collapses: the reward's moving average falls more than 2σ below its running max and stays
    there for at least `min_frac` of the steps. σ is the noise of one step's mean reward, estimated from the data as
    std(r_t − r_{t−1})/√2 (a trend barely moves it), so that a drop counts only when it is twice what a step's
    sampling noise gives — with few prompts per step that noise is far above std(rewards)/√batch."""
    n = len(reward)
    if n < window + 1:
        return 0
    ma = np.convolve(reward, np.ones(window) / window, mode="valid")                  # (n - window + 1,)
    sigma = float(np.std(np.diff(reward), ddof=1)) / math.sqrt(2)
    below = ma < np.maximum.accumulate(ma) - 2 * sigma - 1e-12
    need, count, run = max(1, math.ceil(min_frac * n)), 0, 0
    for b in below:
        run = run + 1 if b else 0
        count += run == need
    return count


def _edges_mean(y: np.ndarray) -> tuple[float, float]:
    k = max(1, int(round(0.1 * len(y))))
    return float(y[:k].mean()), float(y[-k:].mean())


def run_stats(run: Run) -> dict:
    _, reward = run.series("reward/mean")
    _, ev = run.series("eval/accuracy")
    _, clip = run.series("clip/frac")
    _, norms = run.series("grad/norm")
    _, kl = run.series("kl/ref")
    first, last = _edges_mean(reward)
    return {
        "improvement": last - first,
        "eval_before": float(ev[0]) if len(ev) else math.nan, "eval_after": float(ev[-1]) if len(ev) else math.nan,
        "clip": float(clip.mean()), "clip_low": float(run.series("clip/frac_low")[1].mean()),
        "clip_high": float(run.series("clip/frac_high")[1].mean()),
        "kl": float(np.nanmean(kl)) if len(kl) else math.nan,
        "collapses": collapses(reward),
        "nonfinite": int((run.series("grad/nonfinite")[1] > 0).sum()),
        "spike": float(norms.max() / max(np.median(norms), 1e-12)) if len(norms) else math.nan,
        "wall_min": float(run.series("time/step")[1].sum() / 60),
    }


def interval(xs: list[float]) -> tuple[float, float]:
    """The 95 % t-interval of the mean over seeds (nan, nan with one seed)."""
    from scipy import stats

    xs = np.asarray(xs, float)
    if len(xs) < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / math.sqrt(len(xs))
    return xs.mean() - half, xs.mean() + half


def _ci(xs: list[float], fmt: str = "{:+.3f}") -> str:
    lo, hi = interval(xs)
    return fmt.format(np.mean(xs)) + ("" if math.isnan(lo) else f" [{fmt.format(lo)}, {fmt.format(hi)}]")


def significance(groups: dict) -> list[str]:
    """For each headline metric: does the best group lead the next by more than seed noise? Welch's t-test."""
    from scipy import stats

    lines = []
    for column, key in HEADLINE.items():
        ranked = sorted(groups, key=lambda g: -np.mean(groups[g][key]))
        if len(ranked) < 2:
            continue
        best, nxt = ranked[:2]
        a, b = groups[best][key], groups[nxt][key]
        if min(len(a), len(b)) < 2:
            lines.append(f"{column}: {best} leads {nxt} by {np.mean(a) - np.mean(b):.4g}; not testable (one seed)")
            continue
        p = stats.ttest_ind(a, b, equal_var=False).pvalue
        if math.isnan(p):                                  # no spread in either group: no evidence of a difference
            lines.append(f"{column}: {best} and {nxt} have no spread over seeds: not significant at 0.05")
            continue
        verdict = "significant" if p < 0.05 else "not significant"
        lines.append(f"{column}: {best} leads {nxt} by {np.mean(a) - np.mean(b):.4g} (Welch's t-test over seeds, "
                     f"p = {p:.3g}: {verdict} at 0.05)")
    return lines


def table(runs: list[Run]) -> tuple[list[dict], list[str]]:
    out, groups = [], {}
    for group in sorted({r.group for r in runs}):
        stats = [run_stats(r) for r in runs if r.group == group]
        s = groups[group] = {k: [x[k] for x in stats] for k in stats[0]}
        stable = sum(s["collapses"]) == 0 and sum(s["nonfinite"]) == 0 and max(s["spike"]) < 10
        out.append({
            "group": group, "seeds": len(stats),
            "reward improvement": _ci(s["improvement"]),
            "eval accuracy before → after": f"{np.mean(s['eval_before']):.3f} → {_ci(s['eval_after'], '{:.3f}')}",
            "clip frac (low / high)": f"{_ci(s['clip'], '{:.4f}')} ({np.mean(s['clip_low']):.4f} / "
                                      f"{np.mean(s['clip_high']):.4f})",
            "KL to ref": f"{np.mean(s['kl']):.4f}", "collapses": int(sum(s["collapses"])),
            "non-finite steps": int(sum(s["nonfinite"])), "grad-norm spike": f"{max(s['spike']):.1f}x",
            "stability": "stable" if stable else "unstable", "wall min/run": f"{np.mean(s['wall_min']):.1f}",
        })
    return out, significance(groups)


def plot(runs: list[Run], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, scale in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        for group in sorted({r.group for r in runs}):
            curves = [r.series(key) for r in runs if r.group == group]
            curves = [c for c in curves if len(c[0])]
            if not curves:
                continue
            n = min(len(c[0]) for c in curves)
            x, ys = curves[0][0][:n], np.stack([c[1][:n] for c in curves])
            if scale == "log":
                ys = np.clip(ys, 1e-5, None)
            line, = ax.plot(x, ys.mean(0), label=f"{group} (n={len(curves)})", marker="o" if key.startswith("eval")
                            else None, ms=3)
            if len(curves) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), alpha=0.2, color=line.get_color())
        ax.set_yscale(scale)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{key.replace('/', '_')}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def main(args: list[str]) -> None:
    import argparse

    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="gspo compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", help="run or sweep dirs")
    parser.add_argument("--out", help="where the table and plots go (default: DIRS[0]/compare)")
    opts, unknown = parser.parse_known_args(args)
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not a compare option: expected run or sweep dirs and --out DIR")
    if not opts.dirs:
        raise ConfigError("gspo compare needs at least one run or sweep dir: gspo compare multirun/...")
    runs = load_runs(opts.dirs)
    out = Path(opts.out or Path(opts.dirs[0]) / "compare")
    out.mkdir(parents=True, exist_ok=True)
    done, incomplete = [r for r in runs if r.complete], [r for r in runs if not r.complete]
    if not done:
        raise ConfigError(f"no complete run under {opts.dirs!r}: all {len(runs)} stopped before trainer.steps")
    label_groups(done)
    rows, tests = table(done)
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    md += ["", "Mean over seeds [95 % t-interval]. " + " ".join(f"{t}." for t in tests)] if tests else []
    if incomplete:
        md += ["", "Incomplete runs (left out): " + ", ".join(
            f"`{r.path}` ({r.group}, seed {r.seed}, {max((x['step'] for x in r.rows), default=0)}/{r.steps} steps)"
            for r in incomplete)]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    pngs = plot(done, out)
    console = Console()
    t = Table(title=f"{len(done)} complete runs ({len(incomplete)} incomplete)")
    for c in COLUMNS:
        t.add_column(c)
    for r in rows:
        t.add_row(*(str(r[c]) for c in COLUMNS))
    console.print(t)
    for line in tests:
        print(line)
    for r in incomplete:  # plain print: a path wrapped at the terminal's width cannot be pasted or grepped
        print(f"incomplete, left out: {r.path} ({r.group}, seed {r.seed})")
    print(f"wrote {out / 'compare.md'}, {out / 'compare.csv'} and {len(pngs)} plots in {out}")
