"""Shared fixtures: the real Hydra composition of conf/, the tiny model with SmolLM2's real tokenizer, and a helper
that runs the real `gspo` console script as a subprocess."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model=tiny", "trainer.prompts_per_step=2", "algo.group_size=2", "trainer.minibatches=2",
        "rollout.max_new_tokens=8", "task.eval_size=4", "trainer.eval_every=2", "trainer.save_every=1"]


@pytest.fixture(scope="session")
def compose():
    from hydra import compose as hydra_compose, initialize_config_dir

    import gspo_cli.cli  # noqa: F401  registers the schema and resolvers

    def _compose(*overrides):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    return _compose


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) — a 2-layer random Llama with SmolLM2's tokenizer from the embedded GGUF."""
    from gspo_cli import models
    from gspo_cli.config import ModelConfig

    cfg = ModelConfig(name="tiny", source="tiny")
    tok = models.load_tokenizer(cfg)
    return models.load_policy(cfg, tok, torch.device("cpu")), tok


GSPO = str(Path(sys.executable).with_name("gspo"))   # the installed console script
ENV = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}


def gspo(*args, cwd, timeout=600):
    """Run the real console script; returns CompletedProcess with text stdout/stderr."""
    return subprocess.run([GSPO, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
