"""Sampling: log-probs equal a fresh teacher-forced pass, masks come from lengths, the sampler is exact.

    pytest tests/test_rollout.py -q
"""
from pathlib import Path

import pytest
import torch

from gspo_cli import rollout


def _prompts(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def test_sampling_logps_equal_teacher_forced_pass_with_left_padding(tiny):
    model, tok = tiny
    p_ids, p_mask = _prompts(tok, ["hi", "what is 2 + 3? answer please now", "a b c", "x"])
    assert (p_mask == 0).any(), "the batch must be left-padded for this test to mean something"
    r = rollout.generate(model, p_ids, p_mask, max_new_tokens=12, temperature=0.7, eos_id=tok.eos_token_id,
                         pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fresh = rollout.token_logps(model, p_ids, p_mask, r.ids, r.mask, temperature=0.7)
    assert (fresh - r.logp).abs().max() < 1e-4
    # each row alone (no padding at all) gives the same log-probs as inside the padded batch
    for i in range(p_ids.shape[0]):
        keep = p_mask[i].bool()
        with torch.no_grad():
            alone = rollout.token_logps(model, p_ids[i:i + 1, keep], p_mask[i:i + 1, keep], r.ids[i:i + 1],
                                        r.mask[i:i + 1], temperature=0.7)
        assert (alone - r.logp[i:i + 1]).abs().max() < 1e-4


def test_mask_by_length_keeps_the_real_eos(tiny):
    model, tok = tiny
    assert tok.pad_token_id == tok.eos_token_id, "SmolLM2 pads with its EOS id: the case this test guards"
    p_ids, p_mask = _prompts(tok, ["hello there", "hi", "what now"])
    first = rollout.generate(model, p_ids, p_mask, max_new_tokens=6, greedy=True, eos_id=-1, pad_id=0)
    eos = int(first.ids[0, 0])  # declare row 0's first greedy token to be EOS, and pad with the same id
    r = rollout.generate(model, p_ids, p_mask, max_new_tokens=6, greedy=True, eos_id=eos, pad_id=eos)
    assert r.ids[0, 0] == eos and r.finished[0] and r.mask[0].tolist() == [1.0] + [0.0] * (r.mask.shape[1] - 1)
    for i in range(1, 3):  # other rows: length = up to and including their own first EOS, else all tokens
        hits = (first.ids[i] == eos).nonzero()
        n = int(hits[0]) + 1 if len(hits) else first.ids.shape[1]
        assert r.mask[i].sum() == min(n, r.mask.shape[1])
        assert r.ids[i, :n].tolist() == first.ids[i, :n].tolist()


def test_inverse_cdf_sampler_is_exact():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2]]).repeat(20000, 1)
    draws = rollout.sample(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert freq[1] == 0, "a zero-probability token is never drawn"
    # 20k draws: the std of each frequency is <= 0.0036; 0.02 is > 5 sigma
    assert torch.allclose(freq, probs[0].double(), atol=0.02)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])
    p = logits.softmax(-1)[0]
    kept = rollout._top_p_filter(logits, top_p=float(p[0] + 1e-3)).isfinite()[0]
    assert kept.tolist() == [True, True, False, False]


def test_trim_drops_all_padding_columns():
    p_ids = torch.tensor([[0, 0, 5, 6], [0, 0, 0, 7]])
    p_mask = (p_ids > 0).long()
    ids = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0]])
    mask = torch.tensor([[1.0, 1.0, 0, 0], [1.0, 0, 0, 0]])
    a, b, c, d = rollout.trim(p_ids, p_mask, ids, mask)
    assert a.tolist() == [[5, 6], [0, 7]] and c.tolist() == [[1, 2], [3, 0]] and d.shape == (2, 2)


@pytest.mark.slow
def test_embedded_smollm2_loads_and_matches_its_sampling_logps():
    """The real GGUF model: dequantized, trainable, a real chat prompt, sampling log-probs == a fresh pass."""
    from gspo_cli import models, tasks
    from gspo_cli.config import ModelConfig, TaskConfig

    cfg = ModelConfig()
    tok = models.load_tokenizer(cfg)
    model = models.load_policy(cfg, tok, torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert not getattr(model, "is_quantized", False) and all(p.requires_grad for p in model.parameters())
    task = tasks.build_task(TaskConfig(dataset="chain_sum", params=dict(min_terms=2, max_terms=2, min_digits=1,
                                                                        max_digits=1), eval_size=2), 0)
    p_ids, p_mask = tasks.encode(tok, task, task.eval_entries[:2] + [{"question": "Hi", "answer": "1"}], "cpu")
    text = tok.decode(p_ids[0][p_mask[0].bool()])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    r = rollout.generate(model, p_ids, p_mask, max_new_tokens=6, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fresh = rollout.token_logps(model, p_ids, p_mask, r.ids, r.mask)
    assert (fresh - r.logp).abs().max() < 1e-4


def test_a_cache_folder_whose_writer_fails_leaves_nothing_behind(tmp_path, monkeypatch):
    """models.cached_dir: a writer that raises leaves no folder (finished or temporary) in the cache, so the next
    call writes it again; a finished folder is never rewritten."""
    from gspo_cli import models

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def broken(d):
        (d / "half").write_text("x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        models.cached_dir("thing", "key", broken)
    assert list((tmp_path / "gspo-cli").iterdir()) == []
    calls = []
    out = models.cached_dir("thing", "key", lambda d: calls.append((d / "done").write_text("ok")))
    assert models.cached_dir("thing", "key", lambda d: calls.append(1)) == out and len(calls) == 1
    assert [p.name for p in (tmp_path / "gspo-cli").iterdir()] == [Path(out).name]
    assert (Path(out) / "done").read_text() == "ok"


def test_smollm2_tokenizer_is_converted_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """The GGUF's tokenizer is converted once into the user's cache (XDG_CACHE_HOME) and read from there after: the
    same ids, text, chat template and special tokens as a fresh conversion."""
    from transformers import AutoTokenizer

    from gspo_cli import models
    from gspo_cli.config import ModelConfig

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = ModelConfig(name="tiny", source="tiny")
    models.load_tokenizer(cfg)                                               # converts, writes the cache
    (cached,) = (tmp_path / "gspo-cli").iterdir()                            # one folder, no temporary left
    assert cached.name.startswith("smollm2-tokenizer-")
    stamps = cached.stat().st_mtime_ns, cached.parent.stat().st_mtime_ns     # a conversion adds and drops a folder
    tok = models.load_tokenizer(cfg)                                         # reads it, converts nothing
    assert (cached.stat().st_mtime_ns, cached.parent.stat().st_mtime_ns) == stamps
    d, f = models.smollm2_gguf()
    ref = AutoTokenizer.from_pretrained(d, gguf_file=f)
    msgs = [{"role": "user", "content": "What is 7 + 5? Answer in <answer></answer> tags.  ünïcödé\n\ttabs"}]
    text = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == text
    assert tok(text).input_ids == ref(text).input_ids and tok.get_vocab() == ref.get_vocab()
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (2, 1, 2)
    ids = list(range(0, len(ref), 97))
    assert tok.decode(ids) == ref.decode(ids)


def _embedded_tokens(model, fn) -> tuple[object, int]:
    """fn()'s result and how many token positions went through the model's input embedding."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        return fn(), sum(seen)
    finally:
        hook.remove()


def test_a_shared_prompt_runs_once_per_group_with_the_full_passs_log_probs_and_gradients(tiny):
    """trainer.share_prompt: the two prompts (one left-padded) of 2 x 4 responses are embedded once each, two
    short responses of different prompts run in one packed row, and the log-probs and the gradient of a loss on them equal
    the full pass's (each row with its own prompt copy and its padding)."""
    import copy

    from conftest import tiny_rollout

    model, tok = tiny
    model = copy.deepcopy(model)
    roll = tiny_rollout(model, tok, G=4, max_new_tokens=8)
    ids, mask = roll.ids.clone(), roll.mask.clone()
    # two shorter responses, right-padded as an EOS leaves them: rows 1 and 6 (3 + 4 inputs after their first
    # token), of different prompts, fit one packed row of T - 1 = 7 that holds both prompts' keys
    mask[1, 4:], mask[6, 5:] = 0.0, 0.0
    ids[mask == 0] = tok.pad_token_id
    args = (roll.prompt_ids, roll.prompt_mask, ids, mask)
    assert (roll.prompt_mask == 0).any(), "a left-padded prompt"
    B, P, T = roll.ids.shape[0], roll.prompt_ids.shape[1], roll.ids.shape[1]
    out = {}
    for share in (False, True):
        model.zero_grad()
        logp, n = _embedded_tokens(model, lambda: rollout.token_logps(model, *args, share_prompt=share))
        (logp * torch.linspace(-1, 1, B)[:, None]).sum().backward()
        out[share] = logp.detach(), [q.grad.clone() for q in model.parameters()], n
    assert T == 8 and roll.mask.all(), "every sampled response runs to max_new_tokens (no EOS)"
    assert out[False][2] == B * (P + T) and out[True][2] == 2 * P + (B - 1) * (T - 1)
    assert (out[True][0] - out[False][0]).abs().max() < 1e-5
    assert (out[True][0] - roll.logp * mask).abs().max() < 1e-4          # and the sampler's
    for shared, full in zip(out[True][1], out[False][1]):
        assert torch.allclose(shared, full, rtol=1e-4, atol=1e-6 * full.abs().max().item())


def test_gradient_checkpointing_takes_the_full_pass(tiny):
    """transformers turns the KV cache off under gradient checkpointing, so the shared prompt cannot run there."""
    import copy

    from conftest import tiny_rollout

    model, tok = tiny
    model = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    roll = tiny_rollout(model, tok, G=4, max_new_tokens=8)
    logp, n = _embedded_tokens(model, lambda: rollout.token_logps(model, roll.prompt_ids, roll.prompt_mask, roll.ids,
                                                                  roll.mask))
    logp.sum().backward()
    assert n == roll.ids.shape[0] * (roll.prompt_ids.shape[1] + roll.ids.shape[1])
    assert all(q.grad is not None for q in model.parameters() if q.requires_grad)
