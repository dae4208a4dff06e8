"""Rewards for tests, imported through `task.reward_fn=rewards:NAME` (tests/ is on the subprocesses' PYTHONPATH)."""


def length_parity(prompt: str, completion: str, answer: str) -> float:
    """1 for an even number of characters: deterministic, and it varies within a group even for a random model, so
    advantages and gradients are non-zero and a run trains for real."""
    return float(len(completion) % 2 == 0)


def not_a_number(prompt: str, completion: str, answer: str):
    return "seven"
