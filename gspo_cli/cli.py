"""`gspo train ...`: the console script. Hydra composes `conf/` (typed by config.py), this file turns the result into
a validated `Config`, resolves `resume=`, and calls `loop.train`. Nothing else lives here.

    gspo train                                    # GSPO on the embedded SmolLM2, arithmetic, CPU, offline
    gspo train algo=grpo trainer.steps=100        # any Hydra override; --cfg job, --help, -m work as usual
    gspo train resume=outputs/2026-11-25/10-00-00 # continue that run from its last checkpoint
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from . import config as config_mod  # registers the schema in Hydra's ConfigStore
from .config import ConfigError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
COMMANDS = {"train": "train a policy (Hydra app; `gspo train --help` lists the config groups)",
            "eval": "greedy accuracy, pass@k, maj@k of a run or an untrained model: gspo eval [RUN] [overrides]",
            "export": "a run as a Hugging Face model dir: gspo export RUN [out=DIR] [dtype=] [lora=merged|adapter]",
            "plan": "estimated peak accelerator memory of a train command, no weights loaded: gspo plan OVERRIDES",
            "compare": "results table and plots from run/sweep dirs: gspo compare DIR... [--out DIR]"}


LOCK_HELD = "GSPO_RUN_DIR_LOCK_HELD"   # set for the ranks a launcher started: it holds the run dir's lock for them


def _resumes_into(resume) -> bool:
    """`resume=<existing dir>` continues in that dir; `resume=auto` (or a bad path, refused later) does not."""
    return resume not in (None, "auto") and os.path.isdir(resume)


def _run_dir(resume, default):
    """hydra.run.dir: a resumed run continues in its own dir; `resume=auto` keeps the new (or requeued) dir."""
    return resume if _resumes_into(resume) else default


def _output_subdir(resume):
    """Keep the original .hydra/ of a resumed run; the resume's own composed config goes beside it."""
    return ".hydra/resume" if _resumes_into(resume) else ".hydra"


OmegaConf.register_new_resolver("gspo_run_dir", _run_dir, replace=True)
OmegaConf.register_new_resolver("gspo_output_subdir", _output_subdir, replace=True)


def _resumed_config(cfg: DictConfig, state: dict, overrides: list[str]) -> DictConfig:
    """The checkpoint's own config, with this command's plain key=value overrides on top (e.g. trainer.steps=80).
    W&B settings come from this command alone: a checkpoint never switches logging online or to another project."""
    saved = _plain_saved_config(state["config"], cfg.resume)
    chosen = {o.lstrip("+").split("=", 1)[0] for o in overrides}
    for key in ("algo", "model"):
        if key in chosen and saved[key]["name"] != cfg[key]["name"]:
            raise ConfigError(f"{key}={cfg[key]['name']!r} does not match the checkpoint in resume={cfg.resume!r}, "
                              f"which is {key}={saved[key]['name']!r}: expected the same {key} (or no {key} override)")
    dotted = [o.lstrip("+") for o in overrides if "." in o.split("=", 1)[0] and not o.startswith("~")]
    merged = OmegaConf.merge(saved, OmegaConf.from_dotlist(dotted), {"resume": cfg.resume})
    merged.logger = cfg.logger
    if merged.task.reward_fn is not None and merged.task.reward_fn != cfg.task.reward_fn:
        raise ConfigError(f"resume={cfg.resume!r}: the checkpoint names task.reward_fn={merged.task.reward_fn!r}, code "
                          f"that is imported only when this command names it too: expected "
                          f"task.reward_fn={merged.task.reward_fn} on the command line")
    if merged.trainer.steps <= state["step"]:
        raise ConfigError(f"trainer.steps={merged.trainer.steps} is invalid: the checkpoint in resume={cfg.resume!r} "
                          f"is at step {state['step']}; expected trainer.steps > {state['step']} to continue it")
    return merged


def _plain_saved_config(saved, resume) -> DictConfig:
    """A checkpoint's config as plain data: an interpolation (`${oc.env:...}`) in it is refused, never resolved."""
    def strings(x):
        if isinstance(x, dict):
            return [s for v in x.values() for s in strings(v)]
        if isinstance(x, list):
            return [s for v in x for s in strings(v)]
        return [x] if isinstance(x, str) else []
    bad = [v for v in strings(saved) if "${" in v]
    if not isinstance(saved, dict) or bad:
        raise ConfigError(f"resume={resume!r}: the checkpoint's config holds an interpolation ({bad[0][:60]!r}) "
                          "where gspo train saves resolved values: expected a checkpoint written by gspo train")
    return OmegaConf.create(saved)


def _resume_state(resume, run_dir: Path):
    """The checkpoint to continue from (None for a fresh run), after checking that `resume` names a run dir."""
    from . import checkpoint

    warn = lambda line: print(f"warning: {line}", file=sys.stderr)  # noqa: E731
    if resume == "auto":
        return checkpoint.load(run_dir, warn) if checkpoint.latest(run_dir) else None
    if resume is None:
        if checkpoint.latest(run_dir):
            raise ConfigError(f"hydra.run.dir={str(run_dir)!r} already holds a run with checkpoints: expected "
                              f"resume={run_dir} (or resume=auto) to continue it, or another run dir")
        return None
    if not Path(resume).is_dir():
        raise ConfigError(f"resume={resume!r} is not a directory: expected a gspo run dir")
    if (Path(resume) / "state.pt").is_file():
        raise ConfigError(f"resume={resume!r} is a checkpoint dir: expected its run dir "
                          f"({Path(resume).parent.parent}), where the run continues")
    return checkpoint.load(resume, warn)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def train(cfg: DictConfig) -> None:
    import torch
    from hydra.core.hydra_config import HydraConfig

    from . import checkpoint, distributed, loop
    from .logging import console

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    world = distributed.world_size_from_env()
    main_rank = distributed.rank_from_env() == 0
    holds_lock = main_rank and LOCK_HELD not in os.environ   # rank 0, or the launcher that starts the ranks
    try:
        with _run_dir_lock(run_dir) if holds_lock else contextlib.nullcontext():
            state = _resume_state(cfg.resume, run_dir)
            typed, plain = _final_config(cfg, state, hc, world)
            if world == 1 and typed.trainer.devices > 1:
                sys.exit(_relaunch_under_torchrun(typed.trainer.devices, list(hc.overrides.task), run_dir))
            if main_rank:
                console.print(f"run dir: {run_dir}", highlight=False)
            loop.train(typed, run_dir, plain, resume_state=state)
    except ConfigError as e:
        _fail(f"error: {e}", 2)
    except loop.Stop as e:
        _fail(f"stopped: {e}", e.code)
    except checkpoint.SaveError as e:
        _fail(f"error: {e}", 5)
    except KeyboardInterrupt:
        last = checkpoint.latest(run_dir)
        _fail(f"stopped: interrupted twice, at once; the last checkpoint ({last or 'none yet'}) is intact", 130)
    except torch.cuda.OutOfMemoryError as e:
        _fail(f"error: out of GPU memory ({str(e).splitlines()[0][:120]}); reduce it with trainer.minibatches=<more>, "
              "rollout.max_new_tokens=<fewer>, model.gradient_checkpointing=true, optim=adamw8bit, "
              "trainer.prompts_per_step=<fewer> or a smaller model (`gspo plan` estimates each)", 4)


def _final_config(cfg: DictConfig, state, hc, world: int):
    """The run's config: the checkpoint's on resume, this command's overrides on top, W&B group and tags filled in;
    -> (validated Config, the same as plain data for the checkpoint and W&B)."""
    if state is not None:
        cfg = _resumed_config(cfg, state, list(hc.overrides.task))
    if world > 1:
        _check_shared_run_dir(hc, cfg)
        cfg.trainer.devices = world
    if cfg.logger.wandb.group is None and hc.mode.name == "MULTIRUN":
        cfg.logger.wandb.group = Path(hc.sweep.dir).name
    if not cfg.logger.wandb.tags:
        cfg.logger.wandb.tags = [f"algo={cfg.algo.name}", f"seed={cfg.seed}", f"task={cfg.task.name}",
                                 f"model={cfg.model.name}"]
    typed = config_mod.to_config(cfg)
    return typed, OmegaConf.to_container(OmegaConf.structured(typed), resolve=True)


def _fail(line: str, code: int):
    print(line, file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def _run_dir_lock(run_dir: Path):
    """An exclusive lock on the run dir for the run's life: a second `gspo train` there gets one line, not a run
    that interleaves metrics and checkpoints with the first."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise ConfigError(f"hydra.run.dir={str(run_dir)!r} is in use by another gspo train (pid {holder}): "
                              "expected another run dir, or wait for that run to end") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


def _relaunch_under_torchrun(devices: int, overrides: list[str], run_dir: Path) -> int:
    """trainer.devices=K: the same command as K data-parallel ranks (torchrun, one machine), in this run dir."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
           "-m", "gspo_cli.cli", "train", *[o for o in overrides if not o.startswith("hydra.run.dir=")],
           f"hydra.run.dir={run_dir}"]
    print(f"launching {devices} ranks: {' '.join(cmd[1:])}", file=sys.stderr)
    child = subprocess.Popen(cmd, env={**os.environ, LOCK_HELD: "1"})   # this process holds the run dir's lock
    forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731  torchrun passes it on to every rank
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()   # the ranks finish their step and checkpoint before they exit
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _check_shared_run_dir(hc, cfg) -> None:
    """Under a bare torchrun every rank composes its own config: `${now:}` could name a different dir per rank."""
    from hydra.types import RunMode

    named = any(o.startswith("hydra.run.dir=") for o in [*hc.overrides.hydra, *hc.overrides.task]) \
        or cfg.resume not in (None, "auto")
    if hc.mode == RunMode.RUN and not named:
        raise ConfigError("hydra.run.dir is unset under torchrun: expected hydra.run.dir=DIR so that every rank "
                          "uses one run dir (or launch with trainer.devices=K, which sets it)")


def _one_line(e: Exception) -> str:
    """Hydra's composition errors (unknown option, wrong type) as one line naming the key, the value, the expected."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, name = e.missing_cfg_file.rsplit("/", 1)
        return f"{group}={name!r} is not a config option: expected one of {sorted(e.options or [])}"
    cause = e if isinstance(e, OmegaConfBaseException) else e.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        msg = str(cause).splitlines()[0]
        return f"{cause.full_key}={cause.value!r} is invalid: {msg}" if cause.value is not None else \
            f"{cause.full_key}: {msg}"
    return " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())


def _eval(args: list[str]) -> None:
    from .evaluation import main as run
    run(args)


def _export(args: list[str]) -> None:
    from .export import main as run
    run(args)


def compare_main(args: list[str]) -> None:
    from .compare import main as run
    run(args)


def composed(overrides: list[str] = ()) -> config_mod.Config:
    """The validated config that `gspo train OVERRIDES` runs with (conf/ composed by Hydra; for scripts)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return config_mod.to_config(compose(config_name="config", overrides=list(overrides)))


def plan(overrides: list[str]) -> None:
    """`gspo plan`: the config composed as `gspo train` composes it; with a sweep, every algorithm of the sweep."""
    from hydra import compose, initialize_config_dir

    from . import plan as plan_mod

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        swept = str(OmegaConf.select(cfg, "hydra.sweeper.params.algo", default="") or "")
        algos = [a.strip() for a in swept.split(",") if a.strip()] or [None]
        lines = []
        for algo in algos:
            job = compose(config_name="config", overrides=[*overrides, *([f"algo={algo}"] if algo else [])])
            lines.append(plan_mod.show(config_mod.to_config(job)))
    if len(lines) > 1:
        print(f"sweep over algo={','.join(algos)}: " + ("fits" if all(ln.startswith("fits") for ln in lines)
                                                     else "does not fit for every job"))


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: gspo COMMAND [hydra overrides]", *(f"  {c:8s} {d}" for c, d in COMMANDS.items())]
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}: expected one of {sorted(COMMANDS)}", file=sys.stderr)
            sys.exit(2)
        print("\n".join(lines))
        return
    if argv[0] in ("compare", "plan", "eval", "export"):
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException
        if argv[1:2] in (["-h"], ["--help"]):
            print(f"usage: gspo {argv[0]}: {COMMANDS[argv[0]]}")
            return
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            {"compare": compare_main, "plan": plan, "eval": _eval, "export": _export}[argv[0]](argv[1:])
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except (HydraException, OmegaConfBaseException) as e:
            print(f"error: {_one_line(e)}", file=sys.stderr)
            sys.exit(2)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.argv = ["gspo", *argv[1:]]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us raw; we print them as one line
    from hydra.errors import ConfigCompositionException, HydraException
    from omegaconf.errors import OmegaConfBaseException
    try:
        train()
    except (ConfigCompositionException, HydraException, OmegaConfBaseException) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
