"""Shared fixtures: the real Hydra composition of conf/, the tiny model with SmolLM2's real tokenizer, and a helper
that runs the real `gspo` console script as a subprocess."""
import json
import math
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
ENV = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
LEARNS = ["task.reward_fn=rewards:length_parity", "optim.lr=1e-3"]   # a tiny run whose weights really move


def gspo(*args, cwd, timeout=600):
    """Run the real console script; returns CompletedProcess with text stdout/stderr."""
    return subprocess.run([GSPO, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


TIMING = {"time/rollout", "time/update", "time/step", "time/generate", "time/weight_sync", "tokens_per_s"}   # wall-clock keys: never compared


def read_metrics(run: Path, timing: bool = False) -> list[dict]:
    """metrics.jsonl of a run dir, one dict per row; without the wall-clock keys unless `timing`."""
    rows = [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return rows if timing else [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def tiny_rollout(model, tok, G: int = 4, max_new_tokens: int = 8, seed: int = 0):
    """Two arithmetic prompts x G sampled responses from `model`: a (2G, ...) Rollout."""
    from gspo_cli import rollout

    enc = tok(["2 + 2 =", "what is 3 - 1?"], return_tensors="pt", padding=True)
    return rollout.generate(model, enc.input_ids.repeat_interleave(G, 0), enc.attention_mask.repeat_interleave(G, 0),
                            max_new_tokens=max_new_tokens, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                            generator=torch.Generator().manual_seed(seed))


def run_update(model, roll, adv, cfg, opt=None, value_targets=None, forward=None, ranks=None, shuffle_seed=0,
               ref_logp=None):
    """The real `loop.update` on a hand-made rollout, π_old = the sampler's log-probs."""
    from gspo_cli import loop
    from gspo_cli.distributed import Ranks

    opt = opt if opt is not None else torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    p = loop.Parts(cfg, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0), forward=forward,
                   ranks=ranks or Ranks(), shuffle_gen=torch.Generator().manual_seed(shuffle_seed))
    batch = loop.Batch([], roll, [], [], torch.zeros(roll.ids.shape[0]))
    order = loop.minibatch_order(roll.ids.shape[0], p)
    return loop.update(p, batch, order, adv, roll.logp, ref_logp, value_targets)


@pytest.fixture
def restored(tiny):
    """The session's tiny model, its weights put back after the test (tests that train it share it)."""
    model, _ = tiny
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    yield saved
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])


# A step re-run after a kill (resume from the checkpoint before it) has been seen to differ from the straight run by
# float rounding (~1e-7 relative, GSPO and PPO, on this 2-core CPU; cause not found), so kill/resume runs and PPO
# resumes compare within this tolerance. A forgotten weight or optimizer restore moves numbers far more (lr 1e-3).
PPO_RTOL = RESUME_RTOL = 1e-5


def same_rows(a: list[dict], b: list[dict], rtol: float = 0.0) -> bool:
    if rtol == 0.0:
        return a == b
    return [r.keys() for r in a] == [r.keys() for r in b] and all(
        math.isclose(x[k], y[k], rel_tol=rtol, abs_tol=1e-9) if isinstance(x[k], float) else x[k] == y[k]
        for x, y in zip(a, b) for k in x)


def assert_same_final_state(a: Path, b: Path, rtol: float = 0.0) -> None:
    """The last checkpoints of two runs hold the same weights and optimizer state (bit for bit unless rtol)."""
    from gspo_cli import checkpoint

    same = (lambda x, y: torch.equal(x, y)) if rtol == 0.0 else \
        (lambda x, y: torch.allclose(x, y, rtol=rtol, atol=1e-9))  # noqa: E731
    sa, sb = checkpoint.load(a), checkpoint.load(b)
    assert sa["step"] == sb["step"]
    for k, v in sa["model"].items():
        assert same(v, sb["model"][k]), f"weights differ: {k}"
    opt_a, opt_b = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and opt_a, "optimizer state saved"
    for i in opt_a:
        for k, v in opt_a[i].items():
            assert same(v, opt_b[i][k]) if torch.is_tensor(v) else v == opt_b[i][k], f"optimizer {i}.{k} differs"


def assert_trained(rows: list[dict]) -> None:
    """A claim that state was restored means something only if the state moved: non-zero gradients were applied."""
    assert any(r.get("grad/norm", 0) > 0 for r in rows), "no step had a gradient: the weights never moved"
