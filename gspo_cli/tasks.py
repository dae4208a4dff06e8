"""reasoning-gym tasks -> chat prompts (as token ids), and rewards from each task's own verifier (`score_answer`).

Answer extraction (README "Answer parsing"): reasoning models (DeepSeek-R1-Distill-Qwen: "<think>...</think> answer")
are read after their last </think>; then the text inside the last <answer>...</answer> pair when there is one;
else the last \boxed{...} (R1's habit); otherwise, when the oracle answer is a number, the last number in the
completion (SmolLM2-135M rarely writes the tags: "4 + 3 = 7" scores); otherwise the last non-empty line. The verifier then scores that string in [0, 1];
`reward/accuracy` counts scores of 1. A verifier that raises on a malformed answer scores 0 and is counted.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .config import ConfigError, TaskConfig

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)      # reasoning_gym.utils.extract_answer's tags
BOXED_RE = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")        # \boxed{12}, \boxed{\frac{1}{2}}
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")                        # the last-number fallback of the TRL baseline (bench/vs_trl.py)
TRAIN_SIZE = 1_000_000                                             # virtual size; items are generated on demand


def extract_answer(completion: str, oracle: str) -> str | None:
    completion = completion.rsplit("</think>", 1)[-1]       # a reasoning model's answer follows its thinking
    tagged = ANSWER_RE.findall(completion)
    if tagged:
        return tagged[-1].strip()
    boxed = BOXED_RE.findall(completion)
    if boxed:
        return boxed[-1].strip()
    if NUMBER_RE.fullmatch(oracle.strip()):
        nums = NUMBER_RE.findall(completion.replace(",", ""))
        return nums[-1] if nums else None
    lines = [ln.strip() for ln in completion.strip().splitlines() if ln.strip()]
    return lines[-1].rstrip(".") if lines else None


@dataclass
class Task:
    """A training stream and a held-out eval set of one reasoning-gym dataset, disjoint by question text."""
    cfg: TaskConfig
    train: object          # reasoning_gym ProceduralDataset
    eval_entries: list
    reward_fn: object = None   # task.reward_fn: score(prompt, completion, answer) -> float, replacing the verifier

    def next_batch(self, cursor: int, n: int) -> tuple[list, int]:
        """n training entries from `cursor` on, skipping eval questions; returns (entries, next cursor)."""
        held_out, out, start = {e["question"] for e in self.eval_entries}, [], cursor
        while len(out) < n:
            entry = self.train[cursor % len(self.train)]
            cursor += 1
            if entry["question"] not in held_out:
                out.append(entry)
            if cursor - start > 100 * n + 1000:  # the held-out set has taken (nearly) every question there is
                raise ConfigError(f"task.eval_size={self.cfg.eval_size} holds out {len(held_out)} questions and "
                                  f"{self.cfg.dataset} with task.params={dict(self.cfg.params)} has (nearly) no others: "
                                  "expected a smaller task.eval_size or harder task.params")
        return out, cursor

    def messages(self, entry) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return sys_msg + [{"role": "user", "content": entry["question"]}]

    def score(self, entry, completion: str) -> dict:
        """{'reward', 'correct', 'format', 'error'}: verifier score (+ format bonus); errors score 0, counted."""
        answer = extract_answer(completion, str(entry["answer"]))
        error = 0.0
        try:
            score = float(self.reward_fn(entry["question"], completion, str(entry["answer"])) if self.reward_fn
                          else self.train.score_answer(answer=answer, entry=entry))
        except Exception:  # noqa: BLE001 — some verifiers raise on malformed answers; that is a wrong answer
            score, error = 0.0, 1.0
        fmt = float(bool(ANSWER_RE.search(completion)))
        return {"reward": score + self.cfg.format_reward * fmt, "correct": float(score >= 1.0), "format": fmt,
                "error": error}


def encode(tok, task: Task, entries: list, device):
    """The entries' chat prompts as left-padded token ids and mask, (n, P) each."""
    texts = [tok.apply_chat_template(task.messages(e), tokenize=False, add_generation_prompt=True) for e in entries]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def decode(tok, ids, mask) -> list[str]:
    """Responses (B, T) to text, each cut at its length (pad == EOS for SmolLM2: never cut by token id)."""
    lengths = mask.sum(-1).long().tolist()
    return [tok.decode(row[:n].tolist(), skip_special_tokens=True) for row, n in zip(ids, lengths)]


def load_reward_fn(spec: str):
    """`module:function` from the Python path (the user's own code, named on this command line)."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name) if name else None
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"task.reward_fn={spec!r} cannot be imported ({e}): expected module:function on the "
                          "Python path") from None
    if not callable(fn):
        raise ConfigError(f"task.reward_fn={spec!r} is not a callable: expected module:function with the signature "
                          "score(prompt, completion, answer) -> float")
    return fn


def build_task(cfg: TaskConfig, seed: int) -> Task:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if cfg.dataset not in DATASETS:
        raise ConfigError(f"task.dataset={cfg.dataset!r} is not a reasoning-gym dataset: expected one of "
                          f"{sorted(DATASETS)[:8]}... ({len(DATASETS)} in all)")
    params = dict(cfg.params)
    try:
        train = reasoning_gym.create_dataset(cfg.dataset, seed=seed, size=TRAIN_SIZE, **params)
        evals = reasoning_gym.create_dataset(cfg.dataset, seed=cfg.eval_seed, size=max(cfg.eval_size, 1), **params)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"task.params={params!r} rejected by reasoning-gym {cfg.dataset!r}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    seen, eval_entries = set(), []
    for i in range(cfg.eval_size):
        e = evals[i]
        if e["question"] not in seen:
            seen.add(e["question"])
            eval_entries.append(e)
    task = Task(cfg, train, eval_entries, load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None)
    if task.reward_fn is not None:
        sample = task.next_batch(0, 1)[0][0]
        value = task.reward_fn(sample["question"], "42", str(sample["answer"]))
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"task.reward_fn={cfg.reward_fn!r} returned {value!r} on a sample: expected a finite "
                              "float from score(prompt, completion, answer)")
    task.next_batch(0, 16)  # fails at start-up, in one line, when the held-out set leaves no training question
    return task
