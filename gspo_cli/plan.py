"""`gspo plan <train overrides>`: the run's peak accelerator memory, estimated from its config alone (no weights).

The model is built on PyTorch's meta device (shapes, no storage) for exact parameter counts; the rest is arithmetic
over the config's shapes, per rank:

    persistent   weights (dtype bytes) + grads and AdamW moments of the trainable ones (fp32; 8-bit moments for
                 adamw8bit) + the frozen reference copy (none with LoRA: the base with adapters off)
    rollout/eval KV cache of B = prompts x G rows over prompt + new tokens, and the sampler's (B, V) fp32 buffers
    reference    a no-grad forward of one minibatch: one layer's activations and one LM-head chunk
    update       one minibatch's saved activations (all layers; with gradient checkpointing one input per layer
                 plus one layer recomputed) and the LM-head chunk with its backward

Activation sizes per token and layer follow the Llama/Qwen2 layer: saved inputs of the norms, projections,
attention and the gated MLP, (8 H + 4 kv + 4 I) elements. They were checked against measured peaks of random-init
stand-ins on CPU (bench/plan_vs_measured.py); GPU kernels and the CUDA allocator add a margin this does not model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Config
from .models import arch_config

GIB = 1024 ** 3
LOGIT_COPIES = 4.2  # fp32 (rows, T, V) copies alive at once in a log-prob pass's forward + backward (measured)


@dataclass
class Shapes:
    params: int          # every weight of the policy
    trainable: int       # what the optimizer updates
    layers: int
    hidden: int
    inter: int
    kv: int              # key/value width: kv heads x head dim
    vocab: int


def shapes(cfg: Config) -> Shapes:
    """Exact parameter counts from the model built on the meta device (no memory, no download)."""
    from transformers import AutoModelForCausalLM

    conf = arch_config(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    params = sum(p.numel() for p in model.parameters())
    trainable = params
    if cfg.model.lora.r > 0:  # r x (in + out) per adapted Linear
        trainable = sum(cfg.model.lora.r * (m.in_features + m.out_features) for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in cfg.model.lora.target_modules)
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
    kv_heads = getattr(conf, "num_key_value_heads", None) or conf.num_attention_heads
    return Shapes(params, trainable, conf.num_hidden_layers, conf.hidden_size, conf.intermediate_size,
                  kv_heads * head_dim, conf.vocab_size)


def estimate(cfg: Config, s: Shapes, prompt_tokens: int, device_type: str = "cuda") -> dict:
    """Bytes per part and per phase for one rank; `prompt_tokens` is the longest prompt of a batch."""
    tr, G = cfg.trainer, cfg.algo.group_size
    bf16 = tr.precision == "bf16" or (tr.precision == "auto" and device_type == "cuda")
    act = 2 if bf16 else 4                                                   # activation bytes
    w_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    rows = tr.prompts_per_step // tr.devices * G                             # rollout rows per rank
    mb = rows // tr.minibatches                                              # update rows per minibatch
    L, T = prompt_tokens + cfg.rollout.max_new_tokens, cfg.rollout.max_new_tokens
    chunk = tr.lm_head_chunk if 0 < tr.lm_head_chunk < T else T
    lora = cfg.model.lora.r > 0
    critic = cfg.algo.name == "ppo" and cfg.algo.critic == "separate"
    use_ref = (cfg.algo.beta > 0 or tr.log_ref_kl or cfg.algo.name == "ppo") and not lora
    moments = 2 if cfg.optim.name == "adamw8bit" else 8
    per_layer = (8 * s.hidden + 4 * s.kv + 4 * s.inter) * act               # saved bytes per token per layer
    layers_saved = 1 + (s.hidden * act * s.layers / per_layer if cfg.model.gradient_checkpointing else s.layers)
    parts = {
        "weights": s.params * w_bytes + (s.trainable * 4 if lora else 0),
        "grads": s.trainable * 4,
        "optimizer state": s.trainable * moments,
        "reference copy": s.params * w_bytes if use_ref else 0,
        "critic copy": s.params * (4 + 4 + moments) if critic else 0,
        "activations (update)": mb * L * per_layer * layers_saved,
        "LM-head chunk (update)": LOGIT_COPIES * mb * chunk * s.vocab * 4,
        "rollout KV cache": rows * L * s.layers * 2 * s.kv * act,
        "sampler buffers": 6 * rows * s.vocab * 4,
    }
    persistent = sum(parts[k] for k in ("weights", "grads", "optimizer state", "reference copy", "critic copy"))
    phases = {
        "rollout / eval": persistent + parts["rollout KV cache"] + parts["sampler buffers"],
        "reference / π_old": persistent + mb * L * per_layer + 3 * mb * chunk * s.vocab * 4,
        "update": persistent + parts["activations (update)"] + parts["LM-head chunk (update)"],
    }
    return {"parts": parts, "phases": phases, "peak": max(phases.values()), "rows": rows, "minibatch": mb,
            "tokens": L, "precision": "bf16" if bf16 else "fp32"}


def verdict(cfg: Config, est: dict) -> str:
    """One line: fits, or which knob to turn first."""
    budget = cfg.trainer.memory_gb * GIB
    if est["peak"] <= budget:
        return f"fits: peak {est['peak'] / GIB:.1f} GiB of trainer.memory_gb={cfg.trainer.memory_gb:g}"
    worst = max(est["phases"], key=est["phases"].get)
    knob = {"update": "trainer.minibatches=<more> or model.gradient_checkpointing=true",
            "rollout / eval": "trainer.prompts_per_step=<fewer> or rollout.max_new_tokens=<fewer>",
            "reference / π_old": "trainer.minibatches=<more> or trainer.lm_head_chunk=<smaller>"}[worst]
    if est["parts"]["optimizer state"] + est["parts"]["weights"] > budget / 2:
        knob = "optim=adamw8bit, model.lora.r=<rank> or more devices"
    return (f"does not fit: peak {est['peak'] / GIB:.1f} GiB ({worst}) > trainer.memory_gb="
            f"{cfg.trainer.memory_gb:g}; turn {knob}")


def prompt_tokens(cfg: Config) -> int:
    """The longest chat prompt of the task's held-out set, by the model's tokenizer (SmolLM2's where the model's own
    is not on this machine)."""
    from . import models, tasks

    try:
        tok = models.load_tokenizer(cfg.model)
    except Exception:  # noqa: BLE001 — no local tokenizer: the embedded one is a close stand-in for the count
        tok = models.load_tokenizer(type(cfg.model)())
    task = tasks.build_task(cfg.task, cfg.seed)
    entries = task.eval_entries[:64] or task.next_batch(0, 8)[0]
    return int(tasks.encode(tok, task, entries, "cpu")[1].sum(-1).max())


def show(cfg: Config) -> str:
    from rich.console import Console
    from rich.table import Table

    device_type = "cpu" if cfg.trainer.device == "cpu" else "cuda"
    est = estimate(cfg, shapes(cfg), prompt_tokens(cfg), device_type)
    t = Table(title=f"gspo plan: {cfg.model.name}, {cfg.algo.name}",
              caption=f"per rank: {est['rows']} rollout rows, minibatch {est['minibatch']}, {est['tokens']} tokens, "
                      f"{est['precision']}")
    t.add_column("part / phase")
    t.add_column("GiB", justify="right")
    for k, v in est["parts"].items():
        t.add_row(k, f"{v / GIB:.2f}")
    for k, v in est["phases"].items():
        t.add_row(f"[bold]peak in {k}[/bold]", f"[bold]{v / GIB:.2f}[/bold]")
    Console().print(t)
    line = verdict(cfg, est)
    print(line)
    return line
