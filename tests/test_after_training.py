"""After training: `gspo eval` (greedy, pass@k, maj@k), `gspo export` to a plain Hugging Face model dir, the user's
own data (task=jsonl) with math-verify / exact / their own reward.

    pytest tests/test_after_training.py -q
"""
import json
from math import comb

import pytest
import torch

from conftest import LEARNS, ROOT, TINY, gspo
from gspo_cli import evaluation, models, rollout, tasks
from gspo_cli.config import TaskConfig

DATA = ROOT / "tests" / "data" / "gsm_small.jsonl"
QUIET = [*TINY, "logger.wandb.mode=disabled"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny runs that really trained (a reward the random model earns): full fine-tuning and LoRA."""
    d = tmp_path_factory.mktemp("trained")
    runs = {}
    for name, extra in (("full", []), ("lora", ["model.lora.r=4"])):
        runs[name] = d / name
        out = gspo("train", *QUIET, *LEARNS, *extra, "trainer.steps=2", f"hydra.run.dir={runs[name]}", cwd=d)
        assert out.returncode == 0, out.stderr[-2000:]
    return runs


def test_pass_at_k_is_chen_et_al_eq_1():
    # n = 4 samples, c = 1 correct: pass@1 = 1/4, pass@2 = 1 − C(3,2)/C(4,2) = 1/2, pass@4 = 1
    assert [evaluation.pass_at_k(4, 1, k) for k in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert evaluation.pass_at_k(5, 0, 3) == 0.0 and evaluation.pass_at_k(5, 5, 1) == 1.0
    assert evaluation.majority_correct(["3", "4", "4", None], [1, 0, 0, 0]) == 0.0
    assert evaluation.majority_correct(["3", None, "3", "4"], [1, 0, 1, 0]) == 1.0


@pytest.mark.slow
def test_eval_of_a_trained_run_reports_greedy_pass_at_k_and_maj_at_k(trained, tmp_path):
    out = gspo("eval", str(trained["full"]), "eval.samples=4", "eval.k=[1,2,4]", "task.eval_size=6", LEARNS[0],
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((trained["full"] / "checkpoints" / "step_000002" / "eval.json").read_text())
    counts = report["samples_correct"]
    assert len(counts) == report["prompts"] == 6 and 0 < sum(counts) < 24, "a mix of right and wrong samples"
    by_hand = {k: sum(1 - comb(4 - c, k) / comb(4, k) if 4 - c >= k else 1.0 for c in counts) / 6 for k in (1, 2, 4)}
    for k, want in by_hand.items():
        assert report[f"eval/pass@{k}"] == pytest.approx(want)
    assert report["eval/pass@1"] == pytest.approx(sum(counts) / 24)
    assert 0 <= report["eval/maj@4"] <= report["eval/pass@4"]
    assert report["eval/accuracy"] == pytest.approx(sum(report["greedy_correct"]) / 6)
    assert "eval/pass@4" in out.stdout and "step 2" in report["source"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_export_loads_with_plain_transformers_and_gives_the_same_log_probs(trained, tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gspo_cli import checkpoint
    from gspo_cli.config import ModelConfig

    out = gspo("export", str(trained[kind]), f"out={tmp_path / 'hf'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.chat_template and not any("value_head" in n or "lora" in n for n, _ in plain.named_parameters())
    state = checkpoint.load(trained[kind])
    mcfg = ModelConfig(name="tiny", source="tiny")
    mcfg.lora.r = 4 if kind == "lora" else 0
    ours = models.load_policy(mcfg, tok, torch.device("cpu"), seed=0)
    models.load_trainable_state(ours, state["model"])
    enc = tok(["2 + 2 =", "what is 3 - 1?"], return_tensors="pt", padding=True)
    ids = torch.randint(0, len(tok), (2, 6), generator=torch.Generator().manual_seed(0))
    args = (enc.input_ids, enc.attention_mask, ids, torch.ones(2, 6))
    with torch.no_grad():
        want, got = rollout.token_logps(ours, *args), rollout.token_logps(plain, *args)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    base = models.load_policy(ModelConfig(name="tiny", source="tiny"), tok, torch.device("cpu"), seed=0)
    with torch.no_grad():
        assert (rollout.token_logps(base, *args) - want).abs().max() > 1e-4, "the export holds the trained weights"


def test_jsonl_task_with_math_verify_and_exact():
    cfg = TaskConfig(name="jsonl", dataset="jsonl", path=str(DATA), prompt_key="problem", answer_key="solution",
                     eval_size=3, verifier="math")
    task = tasks.build_task(cfg, 0)
    assert len(task.eval_entries) == 3 and len(task.train) == 27
    assert not {e["question"] for e in task.eval_entries} & {task.train[i]["question"] for i in range(27)}
    entry = {"question": "q", "answer": "16"}
    assert task.score(entry, "Adding them up gives \\boxed{16.0}")["correct"] == 1.0      # math-verify: 16.0 == 16
    assert task.score(entry, "<answer>15</answer>")["correct"] == 0.0
    exact = tasks.build_task(TaskConfig(**{**vars(cfg), "verifier": "exact"}), 0)
    assert exact.score(entry, "\\boxed{16.0}")["correct"] == 0.0 and exact.score(entry, "so 16")["correct"] == 1.0


def test_parquet_and_json_files_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(ln) for ln in DATA.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.parquet", "d.json"):
        cfg = TaskConfig(name="jsonl", dataset="jsonl", path=str(tmp_path / name), prompt_key="problem",
                         answer_key="solution", eval_size=3)
        task = tasks.build_task(cfg, 0)
        assert task.eval_entries[-1] == {"question": rows[-1]["problem"], "answer": rows[-1]["solution"]}


@pytest.mark.slow
def test_jsonl_task_trains_with_a_user_reward(tmp_path):
    run = tmp_path / "run"
    out = gspo("train", *QUIET, "task=jsonl", f"task.path={DATA}", "task.prompt_key=problem",
               "task.answer_key=solution", LEARNS[0], "trainer.steps=1", f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    sample = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"] in DATA.read_text() and sample["reward"] == float(len(sample["completion"]) % 2 == 0)


@pytest.mark.parametrize("args,start", [
    (["eval", "{tmp}"], "error: gspo eval '{tmp}': not a run dir with a checkpoint"),
    (["eval", "model=tiny", "eval.samples=0"], "error: eval.samples=0 is invalid: expected an integer >= 1"),
    (["eval", "model=tiny", "eval.samples=2", "eval.k=[4]"], "error: eval.k=[4] is invalid: expected a list of "
                                                              "integers in [1, eval.samples=2]"),
    (["export", "{tmp}"], "error: gspo export '{tmp}': not a run dir with a checkpoint"),
    (["export", "{tmp}", "dtype=fp8"], "error: dtype='fp8' is invalid: expected 'float32' or 'bfloat16'"),
    (["train", *QUIET, "task=jsonl"], "error: task.path='' is invalid: expected a file of prompts and answers"),
    (["train", *QUIET, "task=jsonl", f"task.path={DATA}"], "error: task.path='" + str(DATA) + "' rows have no "
                                                            "'question' field"),
    pytest.param(["train", *QUIET, "task=jsonl", "task.path=hf:no-such-org/no-such-set"],
                 "error: task.path='hf:no-such-org/no-such-set' could not be loaded", marks=pytest.mark.slow),
])
def test_bad_input_after_training_is_one_line(tmp_path, args, start):
    out = gspo(*[a.format(tmp=tmp_path) for a in args], cwd=tmp_path)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-2000:]
    assert errors[0].startswith(start.format(tmp=tmp_path)) and "Traceback" not in out.stderr


@pytest.mark.slow
def test_push_to_hub_offline_is_one_line_and_keeps_the_export(trained, tmp_path):
    out = gspo("export", str(trained["full"]), f"out={tmp_path / 'hf'}", "push_to_hub=someone/tiny", cwd=tmp_path)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert errors[0].startswith("error: push_to_hub='someone/tiny' failed (")
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_tokenizer_without_a_chat_template_is_one_line(trained, tmp_path):
    assert gspo("export", str(trained["full"]), f"out={tmp_path / 'hf'}", cwd=tmp_path).returncode == 0
    (tmp_path / "hf" / "chat_template.jinja").unlink()
    out = gspo("eval", "model=tiny", "model.source=hub", f"model.path={tmp_path / 'hf'}", "task.eval_size=2",
               cwd=tmp_path)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-2000:]
    assert errors[0].startswith("error: task=arithmetic: the model's tokenizer cannot template its prompts")
