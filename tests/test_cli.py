"""Hydra composition of every config group, `--cfg job` / `--help`, and each bad input as one line through the
real console script.  pytest tests/test_cli.py -q"""
import pytest

from conftest import ROOT, gspo
from gspo_cli.config import ConfigError, to_config


@pytest.mark.parametrize("group", ["algo", "model", "task", "optim"])
def test_every_option_of_every_group_composes_and_validates(compose, group):
    from omegaconf import OmegaConf

    options = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
    assert len(options) >= 2
    for opt in options:
        extra = ["task.dataset=leg_counting"] if (group, opt) == ("task", "reasoning_gym") else []
        cfg = to_config(compose(f"{group}={opt}", *extra))
        # the option file's own name: key is what the composed config carries
        assert getattr(cfg, group).name == OmegaConf.load(ROOT / "conf" / group / f"{opt}.yaml").name
        if group in ("algo", "optim"):
            assert getattr(cfg, group).name == opt


def test_paper_hyperparameters_per_algorithm(compose):
    gspo_cfg, grpo_cfg = to_config(compose("algo=gspo")), to_config(compose("algo=grpo"))
    assert (gspo_cfg.algo.eps_low, gspo_cfg.algo.eps_high, gspo_cfg.algo.beta) == (3e-4, 4e-4, 0.0)
    assert (grpo_cfg.algo.eps_low, grpo_cfg.algo.eps_high, grpo_cfg.algo.beta) == (0.2, 0.2, 0.04)


def test_default_is_gspo_on_embedded_smollm2_arithmetic(compose):
    cfg = to_config(compose())
    assert (cfg.algo.name, cfg.model.name, cfg.model.source, cfg.task.name) == ("gspo", "smollm2-135m", "gguf",
                                                                              "arithmetic")


def test_scripts_get_the_config_train_runs_with():
    """cli.composed (for bench/ scripts) composes conf/ as `gspo train` does: the task's own params, overrides."""
    from gspo_cli.cli import composed

    cfg = composed(["algo=grpo"])
    assert cfg.algo.name == "grpo" and cfg.task.params == {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                            "max_digits": 1}


def test_validate_names_key_value_and_allowed(compose):
    with pytest.raises(ConfigError, match=r"^rollout.temperature=0.0 is invalid: expected a float > 0$"):
        to_config(compose("rollout.temperature=0"))


def test_cfg_job_and_help(tmp_path):
    out = gspo("train", "algo=grpo", "trainer.steps=7", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0 and "name: grpo" in out.stdout and "steps: 7" in out.stdout
    help_ = gspo("train", "--help", cwd=tmp_path)
    assert help_.returncode == 0 and "algo: dapo, grpo, gspo, ppo" in help_.stdout and "gspo train" in help_.stdout and "model:" in help_.stdout
    top = gspo("--help", cwd=tmp_path)
    assert top.returncode == 0 and top.stdout.splitlines()[0] == "usage: gspo COMMAND [hydra overrides]"
    assert [ln.split()[0] for ln in top.stdout.splitlines()[1:]] == ["train", "eval", "export", "plan", "compare"]
    bad = gspo("trian", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown command 'trian': expected one of ['compare', 'eval', 'export', 'plan', 'train']"


# Validation errors: checked in-process (the console script prints them as "error: <message>", exit 2; the
# subprocess tests below show that path once for each kind of error).
INVALID = [
    (["trainer.steps=-1"], "trainer.steps=-1 is invalid: expected an integer > 0"),
    (["algo.group_size=1"], "algo.group_size=1 is invalid: expected an integer >= 2 (group advantages)"),
    (["trainer.minibatches=3"], "trainer.minibatches=3 is invalid: expected a divisor of prompts_per_step x group_size = 16"),
    (["optim.lr=0"], "optim.lr=0.0 is invalid: expected a float in (0, 1]"),
    (["optim.lr=1e39"], "optim.lr=1e+39 is invalid: expected a float in (0, 1]"),
    (["rollout.max_new_tokens=0"], "rollout.max_new_tokens=0 is invalid: expected an integer > 0"),
    (["algo.eps_low=-0.1"], "algo.eps_low=-0.1 is invalid: expected a float >= 0"),
    (["algo=grpo", "algo.variant=token"], "algo.variant='token' is invalid: expected the default 'sequence': algo=grpo "
                                          "never reads algo.variant, so setting it would change nothing"),
    (["algo=gspo", "algo.kl_coef=0.1"], "algo.kl_coef=0.1 is invalid: expected the default 0.05: algo=gspo never reads"),
    (["algo=ppo", "algo.scale_rewards=false"], "algo.scale_rewards=False is invalid: expected the default True: "
                                               "algo=ppo never reads"),
    (["model.dtype=bfloat16"], "model.dtype='bfloat16' is invalid: expected 'float32' for full fine-tuning: bf16 "
                               "weights keep 8 mantissa bits, so AdamW steps at optim.lr=1e-05"),
    (["rollout.old_logp=maybe"], "rollout.old_logp='maybe' is invalid: expected one of ['auto', 'sampler', 'recompute']"),
    (["trainer.lm_head_chunk=-1"], "trainer.lm_head_chunk=-1 is invalid: expected an integer >= 0"),
    (["optim.lr=inf"], "optim.lr=inf is invalid: expected a finite number"),
    (["task.format_reward=inf"], "task.format_reward=inf is invalid: expected a finite number"),
    (["seed=-1"], "seed=-1 is invalid: expected an integer >= 0"),
    (["optim.beta1=2"], "optim.beta1=2.0 is invalid: expected a float in [0, 1)"),
    (["optim.weight_decay=-1"], "optim.weight_decay=-1.0 is invalid: expected a float >= 0"),
    (["model.lora.dropout=2"], "model.lora.dropout=2.0 is invalid: expected a float in [0, 1)"),
    (["task.eval_size=0"], "task.eval_size=0 is invalid: expected an integer > 0 with trainer.eval_every=10"),
    (["rollout.vllm.block_size=20"], "rollout.vllm.block_size=20 is invalid: expected null or a multiple of 16 (of 32 on CPU)"),
]


@pytest.mark.parametrize("overrides,line", INVALID, ids=[" ".join(b[0]) for b in INVALID])
def test_invalid_values_name_key_value_and_allowed(compose, overrides, line):
    with pytest.raises(ConfigError) as e:
        to_config(compose("model=tiny", *overrides))
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_bf16_base_is_accepted_under_lora(compose):
    cfg = to_config(compose("model=tiny", "model.dtype=bfloat16", "model.lora.r=4"))
    assert cfg.model.dtype == "bfloat16"


BAD = [
    (["trainer.steps=-1"], "error: trainer.steps=-1 is invalid: expected an integer > 0"),
    (["task=nope"], "error: task='nope' is not a config option: expected one of "
                    "['arithmetic', 'gsm', 'jsonl', 'reasoning_gym', 'zebra']"),
    (["algo=ppo2"], "error: algo='ppo2' is not a config option: expected one of ['dapo', 'grpo', 'gspo', 'ppo']"),
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
