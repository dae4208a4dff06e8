"""`gspo train ...`: the console script. Hydra composes `conf/` (typed by config.py), this file turns the result into
a validated `Config`, resolves `resume=`, and calls `loop.train`. Nothing else lives here.

    gspo train                                    # GSPO on the embedded SmolLM2, arithmetic, CPU, offline
    gspo train algo=grpo trainer.steps=100        # any Hydra override; --cfg job, --help, -m work as usual
    gspo train resume=outputs/2026-11-25/10-00-00 # continue that run from its last checkpoint
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from . import config as config_mod  # registers the schema in Hydra's ConfigStore
from .config import ConfigError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
COMMANDS = {"train": "train a policy (Hydra app; `gspo train --help` lists the config groups)",
            "plan": "estimated peak accelerator memory of a train command, no weights loaded: gspo plan OVERRIDES",
            "compare": "results table and plots from run/sweep dirs: gspo compare DIR... [compare.out=results]"}


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
    """The checkpoint's own config, with this command's plain key=value overrides on top (e.g. trainer.steps=80)."""
    saved = OmegaConf.create(state["config"])
    chosen = {o.lstrip("+").split("=", 1)[0] for o in overrides}
    for key in ("algo", "model"):
        if key in chosen and saved[key]["name"] != cfg[key]["name"]:
            raise ConfigError(f"{key}={cfg[key]['name']!r} does not match the checkpoint in resume={cfg.resume!r}, "
                              f"which is {key}={saved[key]['name']!r}: expected the same {key} (or no {key} override)")
    dotted = [o.lstrip("+") for o in overrides if "." in o.split("=", 1)[0] and not o.startswith("~")]
    return OmegaConf.merge(saved, OmegaConf.from_dotlist(dotted), {"resume": cfg.resume})


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def train(cfg: DictConfig) -> None:
    import torch
    from hydra.core.hydra_config import HydraConfig

    from . import checkpoint, distributed, loop
    from .logging import console

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    world = distributed.world_size_from_env()
    try:
        state = None
        if cfg.resume == "auto":
            state = checkpoint.load(run_dir) if checkpoint.latest(run_dir) else None
        elif cfg.resume is not None:
            if not Path(cfg.resume).is_dir():
                raise ConfigError(f"resume={cfg.resume!r} is not a directory: expected a gspo run dir")
            state = checkpoint.load(cfg.resume)
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
        if world == 1 and typed.trainer.devices > 1:
            sys.exit(_relaunch_under_torchrun(typed.trainer.devices, list(hc.overrides.task), run_dir))
        plain = OmegaConf.to_container(OmegaConf.structured(typed), resolve=True)
        if os.environ.get("RANK", "0") == "0":
            console.print(f"run dir: {run_dir}", highlight=False)
        loop.train(typed, run_dir, plain, resume_state=state)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except loop.Stop as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.code)
    except torch.cuda.OutOfMemoryError as e:
        print(f"error: out of GPU memory ({str(e).splitlines()[0][:120]}); reduce it with trainer.minibatches=<more>, "
              "rollout.max_new_tokens=<fewer>, model.gradient_checkpointing=true, optim=adamw8bit, "
              "trainer.prompts_per_step=<fewer> or a smaller model", file=sys.stderr)
        sys.exit(4)


def _relaunch_under_torchrun(devices: int, overrides: list[str], run_dir: Path) -> int:
    """trainer.devices=K: the same command as K data-parallel ranks (torchrun, one machine), in this run dir."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
           "-m", "gspo_cli.cli", "train", *[o for o in overrides if not o.startswith("hydra.run.dir=")],
           f"hydra.run.dir={run_dir}"]
    print(f"launching {devices} ranks: {' '.join(cmd[1:])}", file=sys.stderr)
    return subprocess.run(cmd).returncode


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


def compare_main(args: list[str]) -> None:
    from .compare import main as run
    run(args)


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
    if argv[0] in ("compare", "plan"):
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException
        try:
            compare_main(argv[1:]) if argv[0] == "compare" else plan(argv[1:])
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
