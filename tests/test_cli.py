"""Hydra composition of every config group, `--cfg job` / `--help`, and each bad input as one line through the
real console script.  pytest tests/test_cli.py -q"""
import pytest

from conftest import ROOT, gspo
from gspo_cli.config import ConfigError, to_config


@pytest.mark.parametrize("group", ["algo", "model", "task", "optim"])
def test_every_option_of_every_group_composes_and_validates(compose, group):
    options = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
    assert len(options) >= 2
    for opt in options:
        extra = ["task.dataset=leg_counting"] if (group, opt) == ("task", "reasoning_gym") else []
        cfg = to_config(compose(f"{group}={opt}", *extra))
        assert getattr(cfg, group).name == (opt if group != "task" else cfg.task.name)
        if group == "algo":
            assert cfg.algo.name == opt


def test_paper_hyperparameters_per_algorithm(compose):
    gspo_cfg, grpo_cfg = to_config(compose("algo=gspo")), to_config(compose("algo=grpo"))
    assert (gspo_cfg.algo.eps_low, gspo_cfg.algo.eps_high, gspo_cfg.algo.beta) == (3e-4, 4e-4, 0.0)
    assert (grpo_cfg.algo.eps_low, grpo_cfg.algo.eps_high, grpo_cfg.algo.beta) == (0.2, 0.2, 0.04)


def test_default_is_gspo_on_embedded_smollm2_arithmetic(compose):
    cfg = to_config(compose())
    assert (cfg.algo.name, cfg.model.name, cfg.model.source, cfg.task.name) == ("gspo", "smollm2-135m", "gguf",
                                                                              "arithmetic")


def test_validate_names_key_value_and_allowed(compose):
    with pytest.raises(ConfigError, match=r"^rollout.temperature=0.0 is invalid: expected a float > 0$"):
        to_config(compose("rollout.temperature=0"))


def test_cfg_job_and_help(tmp_path):
    out = gspo("train", "algo=grpo", "trainer.steps=7", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0 and "name: grpo" in out.stdout and "steps: 7" in out.stdout
    help_ = gspo("train", "--help", cwd=tmp_path)
    assert help_.returncode == 0 and "algo: grpo, gspo, ppo" in help_.stdout and "gspo train" in help_.stdout and "model:" in help_.stdout
    top = gspo("--help", cwd=tmp_path)
    assert top.returncode == 0 and "train" in top.stdout
    bad = gspo("trian", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown command 'trian': expected one of ['compare', 'train']"


BAD = [
    (["trainer.steps=-1"], "error: trainer.steps=-1 is invalid: expected an integer > 0"),
    (["algo.group_size=1"], "error: algo.group_size=1 is invalid: expected an integer >= 2 (group advantages)"),
    (["trainer.minibatches=3"],
     "error: trainer.minibatches=3 is invalid: expected a divisor of prompts_per_step x group_size = 16"),
    (["optim.lr=0"], "error: optim.lr=0.0 is invalid: expected a float > 0"),
    (["rollout.temperature=0"], "error: rollout.temperature=0.0 is invalid: expected a float > 0"),
    (["rollout.max_new_tokens=0"], "error: rollout.max_new_tokens=0 is invalid: expected an integer > 0"),
    (["algo.eps_low=-0.1"], "error: algo.eps_low=-0.1 is invalid: expected a float >= 0"),
    (["task=nope"], "error: task='nope' is not a config option: expected one of "
                    "['arithmetic', 'gsm', 'reasoning_gym', 'zebra']"),
    (["algo=ppo2"], "error: algo='ppo2' is not a config option: expected one of ['grpo', 'gspo', 'ppo']"),
    (["trainer.steps=abc"],
     "error: trainer.steps='abc' is invalid: Value 'abc' of type 'str' could not be converted to Integer"),
    (["task.dataset=nope_ds"], "error: task.dataset='nope_ds' is not a reasoning-gym dataset"),
    (["resume=/nonexistent/run"], "error: resume='/nonexistent/run' is not a directory: expected a gspo run dir"),
    (["model=qwen1.5b"], "error: model=qwen1.5b: weights for 'deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B' are not "
                         "in the local cache and the hub is unreachable"),
]


@pytest.mark.parametrize("overrides,line", BAD, ids=[b[0][0] for b in BAD])
def test_bad_input_is_one_line_and_nonzero(tmp_path, overrides, line):
    out = gspo("train", "model=tiny", *overrides, cwd=tmp_path) if overrides != ["model=qwen1.5b"] else \
        gspo("train", *overrides, cwd=tmp_path)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith(line), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
