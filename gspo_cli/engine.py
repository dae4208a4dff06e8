"""`rollout.engine=vllm`: vLLM (Kwon et al. 2023, arXiv 2309.06180) samples the rollouts, colocated with the
trainer in the same process (one engine per rank), and gets the policy's weights in memory after every update.

The engine starts from the policy's config with dummy weights (`load_format="dummy"`: nothing is written to disk)
and is synced at once. Prompts go in as token ids, so the trainer and the engine see the same ids; it returns
the sampled tokens, their log-probs under the sampling distribution (EOS included) and finish reasons, in the
same `Rollout` the `hf` loop returns. The trainer recomputes π_old (`rollout.old_logp=auto`), because an
engine's kernels are not the trainer's.
"""
from __future__ import annotations

import os
import time

import torch

from . import models
from .config import VLLM_INSTALL, Config, ConfigError
from .rollout import Rollout

GPU_ONLY = ("gpu_memory_utilization", "tensor_parallel_size", "enable_sleep_mode")


class VllmEngine:
    def __init__(self, cfg: Config, policy, device: torch.device, seed: int):
        # In-process engine: no spawned worker (no __main__ guard needed), tensors passed by reference on sync.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM logs every engine step at INFO, and a chat-template warm-up traceback (no tokenizer: we pass ids)
        # at WARNING; errors still show. VLLM_LOGGING_LEVEL=INFO brings them back.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        threads = torch.get_num_threads()
        try:
            from vllm import LLM
        except ImportError as e:
            raise ConfigError(f"rollout.engine=vllm needs vLLM, which does not import here ({str(e)[:80]}): "
                              f"{VLLM_INSTALL}") from None
        v, r = cfg.rollout.vllm, cfg.rollout
        self.sleep = v.enable_sleep_mode and device.type == "cuda"
        self.asleep = False
        base = policy.get_base_model() if models.is_lora(policy) else policy
        # The architecture only (weights come by sync), in a folder named by the config, so that a compiled
        # engine's cache (keyed by the model's path) is found again by the next run.
        arch_dir = models.cached_dir("vllm-arch", base.config.to_json_string(), base.config.save_pretrained)
        dtype = v.dtype if v.dtype != "auto" else ("bfloat16" if cfg.trainer.precision == "bf16" else "float32")
        eager = v.enforce_eager if v.enforce_eager is not None else device.type != "cuda"
        if device.type != "cuda" and not eager:
            # vLLM's saved ahead-of-time artifact does not load back on CPU ('function' object has no attribute
            # 'finalize_loading') and the model is compiled again; inductor's own cache is found.
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        kw = dict(model=arch_dir, dtype=dtype, seed=seed, load_format="dummy", skip_tokenizer_init=True,
                  logprobs_mode="processed_logprobs", enforce_eager=eager,
                  max_model_len=min(base.config.max_position_embeddings, r.max_new_tokens + v.max_prompt_tokens))
        if device.type == "cuda":
            if v.block_size is not None:
                kw.update(block_size=v.block_size)
            kw.update(gpu_memory_utilization=v.gpu_memory_utilization, tensor_parallel_size=v.tensor_parallel_size,
                      enable_sleep_mode=v.enable_sleep_mode)
        else:
            if v.block_size is not None and v.block_size % 32:
                raise ConfigError(f"rollout.vllm.block_size={v.block_size} is invalid on {device.type}: expected a "
                                  "multiple of 32 (vLLM's CPU attention)")
            # The default KV cache asks for 92 % of RAM. Block 32, the smallest the CPU attention takes: the prefix
            # cache shares whole blocks only, and at the default 128 a prompt's G samples each ran its prefill.
            kw.update(kv_cache_memory_bytes=int(v.kv_cache_gb * 2**30), block_size=v.block_size or 32)
            ignored = [k for k in GPU_ONLY if getattr(v, k) != getattr(type(v)(), k)]
            if ignored:
                print(f"rollout.vllm: {', '.join(ignored)} ignored on {device.type} (GPU-only engine settings)")
        set_threads = torch.set_num_threads
        self.llm = LLM(**kw)
        # vLLM's CPU worker binds torch's thread count for the whole process and then replaces
        # torch.set_num_threads with a no-op; the trainer owns the threads, so both are put back.
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        self.sync(policy)

    def close(self) -> None:
        """Shut the engine down while the process groups it joined still exist (under DDP, the trainer's world):
        vLLM otherwise tears down its groups at exit, after the trainer has destroyed theirs, and fails there."""
        self.llm.llm_engine.engine_core.shutdown()

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    @torch.no_grad()
    def sync(self, policy) -> float:
        """Load the policy's current weights (LoRA merged, no value head) into the engine, in memory -> seconds.
        vLLM's `reload_weights` through `collective_rpc` takes a checkpoint-format iterator; the tied LM head comes
        with `state_dict()` (named_parameters() would leave it stale)."""
        t0 = time.perf_counter()
        self._wake()
        state = models.hf_state_dict(policy)
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=iter(state.items()),
                                                              is_checkpoint_format=True))
        self.llm.reset_prefix_cache()  # cached prefixes hold the old weights' keys and values
        return time.perf_counter() - t0

    def generate(self, prompt_ids, prompt_mask, n: int, *, max_new_tokens: int, temperature: float, top_p: float,
                 greedy: bool, eos_id: int, pad_id: int, seed: int) -> Rollout:
        """n samples per prompt (prompt-major, as `repeat_interleave(n)`); prompts (p, P) left-padded -> Rollout
        with B = p·n rows. entropy is each sampled token's surprisal −log π(y_t), a one-sample unbiased estimate
        of the entropy (the engine returns no full distribution)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._wake()
        prompts = [TokensPrompt(prompt_token_ids=row[m.bool()].tolist())
                   for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        params = SamplingParams(n=n, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                                max_tokens=max_new_tokens, logprobs=0, stop_token_ids=[eos_id], detokenize=False,
                                seed=seed)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        self.cached_tokens = [o.num_cached_tokens for o in outs]  # per prompt: its tokens a sample took from the cache
        rows = [c for out in outs for c in out.outputs]
        if self.sleep:  # free the KV cache and offload the weights for the update
            self.llm.sleep(level=1)
            self.asleep = True
        B, T = len(rows), max(len(c.token_ids) for c in rows)
        ids = torch.full((B, T), pad_id, dtype=torch.long)                                  # (B, T)
        mask, logp = torch.zeros(B, T), torch.zeros(B, T)                                   # (B, T) x2
        for i, c in enumerate(rows):
            L = len(c.token_ids)
            ids[i, :L] = torch.tensor(c.token_ids)
            mask[i, :L] = 1.0
            logp[i, :L] = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
        finished = torch.tensor([c.finish_reason == "stop" for c in rows])                  # (B,)
        dev = prompt_ids.device
        return Rollout(prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0), ids.to(dev),
                       mask.to(dev), logp.to(dev), (-logp * mask).to(dev), finished.to(dev))
