# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel for tests and the demo; on a GPU box install a CUDA build of torch instead (README).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
TINY := build/tiny

.PHONY: install test lint demo demo-cli browser-deps bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The browser test needs Debian's chromium and the playwright package (never playwright's own browser download).
browser-deps: $(STAMP)
	PY=$(PY) scripts/install_browser_deps.sh

test: $(STAMP) lint browser-deps
	$(PY) -m pytest -q

$(TINY)/config.json: $(STAMP)
	$(VENV)/bin/chroma-agent make-tiny $(TINY)

# The WebRTC playground on a tiny model the project builds: open the printed URL, allow the microphone, talk.
demo: $(STAMP)
	$(VENV)/bin/chroma-agent playground --model tiny

# The same pipeline once from the command line: synthetic question in, build/demo/reply.wav out.
demo-cli: $(TINY)/config.json
	$(VENV)/bin/chroma-agent demo --model $(TINY) --out build/demo

bench: $(STAMP)
	$(PY) bench/bench_generate.py

clean:
	rm -rf build .pytest_cache
