# `make test` sets up a fresh machine and runs the test suite; `make app` runs the Gradio app.
PYTHON ?= python3
export OMP_NUM_THREADS ?= 1

.PHONY: install browser test lint app bench

install:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -e .

browser:  # Debian's Chromium for the browser test (Playwright drives it; never `playwright install`)
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: install browser
	$(PYTHON) -m pytest -q

lint:  # pycodestyle + pyflakes via ruff (settings in pyproject.toml); tests/test_code_quality.py runs it too
	ruff check .

app: install
	$(PYTHON) app.py

bench:
	$(PYTHON) benchmarks/bench_kv_cache.py
	$(PYTHON) benchmarks/bench_app.py
