"""reasoning-gym tasks -> chat prompts (as token ids), and rewards from each task's own verifier (`score_answer`).

Answer extraction (README "Answer parsing"): reasoning models (DeepSeek-R1-Distill-Qwen: "<think>...</think> answer")
are read after their last </think>; then the text inside the last <answer>...</answer> pair when there is one;
else the last \boxed{...} (R1's habit); otherwise, when the oracle answer is a number, the last number in the
completion (SmolLM2-135M rarely writes the tags: "4 + 3 = 7" scores); otherwise the last non-empty line. The verifier then scores that string in [0, 1];
`reward/accuracy` counts scores of 1. A verifier that raises on a malformed answer scores 0 and is counted.
"""
from __future__ import annotations

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

    def next_batch(self, cursor: int, n: int) -> tuple[list, int]:
        """n training entries from `cursor` on, skipping eval questions; returns (entries, next cursor)."""
        held_out = {e["question"] for e in self.eval_entries}
        out = []
        while len(out) < n:
            entry = self.train[cursor % len(self.train)]
            cursor += 1
            if entry["question"] not in held_out:
                out.append(entry)
        return out, cursor

    def messages(self, entry) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return sys_msg + [{"role": "user", "content": entry["question"]}]

    def score(self, entry, completion: str) -> dict:
        """{'reward', 'correct', 'format', 'error'}: verifier score (+ format bonus); errors score 0, counted."""
        answer = extract_answer(completion, str(entry["answer"]))
        error = 0.0
        try:
            score = float(self.train.score_answer(answer=answer, entry=entry))
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
    return Task(cfg, train, eval_entries)
