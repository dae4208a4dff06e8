"""`gspo export RUN [out=DIR] [dtype=float32|bfloat16] [lora=merged|adapter] [push_to_hub=REPO]`: a trained policy
as a Hugging Face model directory that `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load with no gspo code: safetensors weights, config, tokenizer and chat
template. LoRA adapters are merged into the base (`merge_and_unload`) unless `lora=adapter` asks for the adapter
alone (PEFT's format); PPO's value head (and critic copy) is left out.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError

OPTIONS = {"out": None, "dtype": "float32", "lora": "merged", "push_to_hub": None}


def parse(args: list[str]) -> tuple[str, dict]:
    runs = [a for a in args if "=" not in a]
    opts = dict(a.split("=", 1) for a in args if "=" in a)
    if len(runs) != 1:
        raise ConfigError(f"gspo export {' '.join(args)!r}: expected one run dir (gspo export RUN [out=DIR] "
                          "[dtype=float32|bfloat16] [lora=merged|adapter] [push_to_hub=REPO])")
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"{unknown[0]}= is not an export option: expected one of {sorted(OPTIONS)}")
    opts = {**OPTIONS, **opts}
    if opts["dtype"] not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype={opts['dtype']!r} is invalid: expected 'float32' or 'bfloat16'")
    if opts["lora"] not in ("merged", "adapter"):
        raise ConfigError(f"lora={opts['lora']!r} is invalid: expected 'merged' or 'adapter'")
    return runs[0], opts


def main(args: list[str]) -> Path:
    from . import checkpoint, models
    from .cli import _plain_saved_config
    from .config import to_config

    run, opts = parse(args)
    path = Path(run)
    if not path.is_dir():
        raise ConfigError(f"gspo export {run!r}: not a directory: expected a gspo run dir")
    state = checkpoint.load_run_or_checkpoint(path, "gspo export")
    cfg = to_config(_plain_saved_config(state["config"], run))
    tok = models.load_tokenizer(cfg.model)
    policy = models.load_policy(cfg.model, tok, torch.device("cpu"), seed=cfg.seed)
    if "value_head.weight" in state["model"] or any(k.startswith("critic.") for k in state["model"]):
        models.add_value_head(policy, separate=any(k.startswith("critic.") for k in state["model"]))
    models.load_trainable_state(policy, state["model"])
    for name in ("value_head", "critic"):          # PPO's critic is not part of the policy
        if hasattr(policy, name):
            delattr(policy, name)
    if models.is_lora(policy) and opts["lora"] == "merged":
        policy = policy.merge_and_unload()
    out = Path(opts["out"] or path / "export")
    policy.to(models.DTYPES[opts["dtype"]]).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(f"wrote {out} ({'LoRA adapter' if models.is_lora(policy) else 'full model'}, {opts['dtype']}, "
          f"step {state['step']} of {run})")
    if opts["push_to_hub"]:
        try:
            policy.push_to_hub(opts["push_to_hub"])
            tok.push_to_hub(opts["push_to_hub"])
        except Exception as e:  # noqa: BLE001 — offline, no token, no rights: one line, the local export stays
            raise ConfigError(f"push_to_hub={opts['push_to_hub']!r} failed ({str(e).strip().splitlines()[0][:120]}); "
                              f"the export in {out} is complete: upload it later with `hf upload`") from None
    return out
