"""Answer parsing, verifier rewards and the held-out split.  pytest tests/test_tasks.py -q"""
import pytest

from gspo_cli import tasks
from gspo_cli.config import ConfigError, TaskConfig

ARITH = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)


@pytest.mark.parametrize("completion,oracle,want", [
    ("The answer is <answer>7</answer>.", "7", "7"),
    ("<answer>1</answer> wait <answer> 8 </answer>", "8", "8"),
    ("The final answer to 4 + 3 is 7.", "7", "7"),
    ("It is 1,234 apples", "1234", "1234"),
    ("minus: -4", "-4", "-4"),
    ("no digits here", "3", None),
    ("Let me think.\nArnold", "arnold", "Arnold"),
    # DeepSeek-R1-Distill-Qwen style: numbers inside the thinking do not count; \boxed{} does
    ("Okay, 3 + 4 is 7, or 8?\n</think>\n\nThe sum is \\boxed{7}.", "7", "7"),
    ("First 2, then 5.</think>\nSo the answer is 9", "9", "9"),
    ("</think> half: \\boxed{\\frac{1}{2}}", "1/2", "\\frac{1}{2}"),
    ("I think <answer>3</answer> but wait</think><answer>4</answer>", "4", "4"),
    ("still thinking about 12 and 13", "13", "13"),
    ("", "arnold", None),
])
def test_extract_answer(completion, oracle, want):
    assert tasks.extract_answer(completion, oracle) == want


def test_score_uses_the_verifier_and_format_bonus():
    task = tasks.build_task(TaskConfig(dataset="chain_sum", params=ARITH, eval_size=4, format_reward=0.1), 0)
    e = task.eval_entries[0]
    right, wrong = task.score(e, f"<answer>{e['answer']}</answer>"), task.score(e, "<answer>99999</answer>")
    plain = task.score(e, f"So the result is {e['answer']}.")
    assert right == {"reward": 1.1, "correct": 1.0, "format": 1.0, "error": 0.0, "answer": "1"}
    assert wrong["correct"] == 0.0 and wrong["reward"] == pytest.approx(0.1)
    assert plain["correct"] == 1.0 and plain["reward"] == 1.0


def test_training_stream_never_yields_an_eval_question_and_is_deterministic():
    task = tasks.build_task(TaskConfig(dataset="chain_sum", params=ARITH, eval_size=64), 0)
    held = {e["question"] for e in task.eval_entries}
    batch, cursor = task.next_batch(0, 300)
    assert len(held) > 30 and not held & {e["question"] for e in batch}
    assert cursor > 300, "1-digit sums repeat: some training items must have been skipped"
    again, _ = task.next_batch(0, 300)
    assert [e["question"] for e in again] == [e["question"] for e in batch]
    tail, _ = task.next_batch(cursor - 5, 3)  # resuming at a cursor continues the same stream
    assert all(e in batch for e in tail)


def test_other_reasoning_gym_datasets_by_name():
    task = tasks.build_task(TaskConfig(dataset="leg_counting", params={"max_animals": 4}, eval_size=2), 0)
    e = task.eval_entries[0]
    assert task.score(e, f"There are {e['answer']} legs.")["correct"] == 1.0


@pytest.mark.parametrize("dataset,params,match", [
    ("no_such_set", {}, "task.dataset='no_such_set' is not a reasoning-gym dataset"),
    ("chain_sum", {"bogus": 1}, "task.params={'bogus': 1} rejected by reasoning-gym 'chain_sum'"),
])
def test_bad_task_is_one_line(dataset, params, match):
    with pytest.raises(ConfigError, match=match) as e:
        tasks.build_task(TaskConfig(dataset=dataset, params=params), 0)
    assert "\n" not in str(e.value)


def test_a_verifier_that_raises_scores_zero_and_is_counted(monkeypatch):
    task = tasks.build_task(TaskConfig(dataset="chain_sum", params=ARITH, eval_size=2), 0)

    def broken(answer, entry):
        raise ValueError("malformed answer")  # what some reasoning-gym verifiers do on junk
    monkeypatch.setattr(task.train, "score_answer", broken)
    assert task.score(task.eval_entries[0], "<answer>junk</answer>") == {"reward": 0.0, "correct": 0.0,
                                                                          "format": 1.0, "error": 1.0,
                                                                          "answer": "junk"}
