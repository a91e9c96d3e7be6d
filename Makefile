# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel for tests and the demo; on a GPU box install a CUDA build of torch instead (README).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
# Where `make demo` listens: HOST=0.0.0.0 for every interface (the microphone then still needs localhost or https:
# reach it from another machine through an SSH tunnel, see README).
# Only `make demo HOST=... PORT=...` sets them: some shells export HOST as the machine's name.
ifneq ($(origin HOST),command line)
HOST := 127.0.0.1
endif
ifneq ($(origin PORT),command line)
PORT := 8080
endif

.PHONY: install test lint demo demo-cli browser-deps bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The browser tests need a Chromium (found on PATH or $CHROMIUM) and the playwright package (never playwright's own
# browser download); the docs' examples need curl and jq. apt-get installs what is missing (log: build/apt.log).
browser-deps: $(STAMP)
	PY=$(PY) scripts/install_browser_deps.sh

test: $(STAMP) lint browser-deps
	$(PY) -m pytest -q

# The WebRTC playground on a tiny model the project builds (once, in ~/.cache/chroma-agent/tiny): open the printed
# URL, allow the microphone, talk. `make demo HOST=0.0.0.0 PORT=9000` listens elsewhere.
demo: $(STAMP)
	$(VENV)/bin/chroma-agent playground --model tiny --host $(HOST) --port $(PORT)

# The same pipeline once from the command line: synthetic question in, build/demo/reply.wav out.
demo-cli: $(STAMP)
	$(VENV)/bin/chroma-agent demo --model tiny --out-dir build/demo

bench: $(STAMP)
	$(PY) bench/bench_generate.py

clean:
	rm -rf build .pytest_cache
