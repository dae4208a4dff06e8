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


def verify(kind: str, answer: str | None, oracle: str) -> float:
    """1.0 when the extracted answer matches the reference: math-verify's parse + verify (what TRL's accuracy_reward
    uses: 1/2 == 0.5 == \\frac{1}{2}) or exact string match."""
    if answer is None:
        return 0.0
    if kind == "exact":
        return float(answer.strip() == oracle.strip())
    from math_verify import parse, verify as math_verify

    return float(math_verify(parse(oracle), parse(answer)))


class FileData:
    """Rows of the user's own file as reasoning-gym-like entries {'question', 'answer'}, scored by a verifier."""

    def __init__(self, rows: list[dict], verifier: str):
        self.rows, self.verifier = rows, verifier

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def score_answer(self, answer, entry) -> float:
        return verify(self.verifier, answer, str(entry["answer"]))


def read_rows(path: str, cfg: TaskConfig) -> list[dict]:
    """A .jsonl / .json (a list) / .parquet file -> [{'question', 'answer'}] by task.prompt_key / task.answer_key."""
    import json
    from pathlib import Path

    p = Path(path)
    if path.startswith("hf:"):                # a Hugging Face datasets name (needs the network or its local cache)
        return _rows(_hub_dataset(path[3:]), path, cfg)
    if not p.is_file():
        raise ConfigError(f"task.path={path!r} is not a file: expected a .jsonl, .json or .parquet file, or "
                          "hf:NAME[:SPLIT] for a Hugging Face dataset")
    try:
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq
            raw = pq.read_table(p).to_pylist()
        elif p.suffix == ".json":
            raw = json.loads(p.read_text())
        else:
            raw = [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
    except (ValueError, ImportError, OSError) as e:
        raise ConfigError(f"task.path={path!r} is unreadable ({str(e).splitlines()[0][:100]}): expected one JSON "
                          "object per line (.jsonl), a JSON list (.json) or a parquet table") from None
    return _rows(raw, path, cfg)


def _hub_dataset(spec: str) -> list[dict]:
    name, _, split = spec.partition(":")
    try:
        import datasets
        return list(datasets.load_dataset(name, split=split or "train"))
    except Exception as e:  # noqa: BLE001 — not installed, offline, unknown name or split: one line
        raise ConfigError(f"task.path='hf:{spec}' could not be loaded ({str(e).strip().splitlines()[0][:120]}): "
                          "expected a Hugging Face dataset reachable online or in the local cache "
                          "(`pip install datasets`)") from None


def _rows(raw: list, path: str, cfg: TaskConfig) -> list[dict]:
    missing = [k for k in (cfg.prompt_key, cfg.answer_key) if not raw or not isinstance(raw[0], dict) or k not in raw[0]]
    if missing:
        raise ConfigError(f"task.path={path!r} rows have no {missing[0]!r} field: expected task.prompt_key and "
                          f"task.answer_key to name fields of its rows (found {sorted(raw[0]) if raw else 'no rows'})")
    return [{"question": str(r[cfg.prompt_key]), "answer": str(r[cfg.answer_key])} for r in raw]


def file_splits(cfg: TaskConfig, seed: int):
    """(train data, eval entries): eval from task.eval_path or the file's last task.eval_fraction, train shuffled."""
    import random as random_mod

    if not cfg.path:
        raise ConfigError("task.path='' is invalid: expected a file of prompts and answers (task=jsonl task.path=FILE)")
    rows = read_rows(cfg.path, cfg)
    kind = "math" if cfg.verifier == "default" else cfg.verifier
    if cfg.eval_path:
        evals = read_rows(cfg.eval_path, cfg)
    else:
        cut = max(1, int(len(rows) * cfg.eval_fraction))
        rows, evals = rows[:-cut], rows[-cut:]
    random_mod.Random(seed).shuffle(rows)
    return FileData(rows, kind), evals


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
        """{'reward', 'correct', 'format', 'error', 'answer'}: verifier score (+ format bonus); errors score 0, counted."""
        answer = extract_answer(completion, str(entry["answer"]))
        error = 0.0
        try:
            if self.reward_fn:
                score = float(self.reward_fn(entry["question"], completion, str(entry["answer"])))
            elif self.cfg.verifier != "default" and not isinstance(self.train, FileData):
                score = verify(self.cfg.verifier, answer, str(entry["answer"]))
            else:
                score = float(self.train.score_answer(answer=answer, entry=entry))
        except Exception:  # noqa: BLE001 — some verifiers raise on malformed answers; that is a wrong answer
            score, error = 0.0, 1.0
        fmt = float(bool(ANSWER_RE.search(completion)))
        return {"reward": score + self.cfg.format_reward * fmt, "correct": float(score >= 1.0), "format": fmt,
                "error": error, "answer": answer}


def encode(tok, task: Task, entries: list, device):
    """The entries' chat prompts as left-padded token ids and mask, (n, P) each."""
    try:
        texts = [tok.apply_chat_template(task.messages(e), tokenize=False, add_generation_prompt=True) for e in entries]
    except ValueError as e:  # a tokenizer with no chat template
        raise ConfigError(f"task={task.cfg.name}: the model's tokenizer cannot template its prompts "
                          f"({str(e).splitlines()[0][:100]}): expected a tokenizer with a chat template") from None
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
    if cfg.dataset == "jsonl":  # before the reasoning-gym import: a user's own file does not need it
        train, evals = file_splits(cfg, seed)
        return _task(cfg, train, evals[:cfg.eval_size])
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
    return _task(cfg, train, [evals[i] for i in range(cfg.eval_size)])


def _task(cfg: TaskConfig, train, evals: list) -> Task:
    """The task with its held-out set deduplicated by question, the user's reward checked on a sample, and the
    training stream checked to have questions left."""
    seen, eval_entries = set(), []
    for e in evals:
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
