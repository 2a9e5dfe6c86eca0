# `make test` sets up a fresh machine and runs the test suite; `make app` runs the Gradio app.
PYTHON ?= python3
export OMP_NUM_THREADS ?= 1

# OpenAI's dVAE classes for the parity test, without their declared dependencies (they pull a torchvision that
# fails to import beside this torch); what they import (attrs, requests) is in requirements.in.
OPENAI_DALLE = DALL-E==0.1

.PHONY: install browser test test-latest lock lint app bench

install:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -e .
	$(PYTHON) -m pip install -q --no-deps $(OPENAI_DALLE)

browser:  # Debian's Chromium for the browser test (Playwright drives it; never `playwright install`)
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: install browser
	$(PYTHON) -m pytest -q

lock:  # requirements.in (direct pins) -> requirements.txt (every package pinned), with pip-tools
	$(PYTHON) -m pip install -q pip-tools==7.6.2
	CUSTOM_COMPILE_COMMAND="make lock" $(PYTHON) -m piptools compile -q --strip-extras --no-emit-index-url \
		--no-emit-find-links --output-file requirements.txt requirements.in

# The drift check: the newest releases pyproject.toml allows, in a throwaway virtual environment, on a fast subset
# (tests marked `latest`). torch stays at the CPU build on disk (the newest allowed one is a multi-GB CUDA build).
LATEST_VENV ?= /tmp/dalle-hf-latest-venv
test-latest: browser
	rm -rf $(LATEST_VENV) && $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	echo "torch==2.13.0" > $(LATEST_VENV)/hold-torch.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST_VENV)/hold-torch.txt \
		".[app,quantization,test]" attrs requests
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps $(OPENAI_DALLE)
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -iE "^(torch|transformers|diffusers|accelerate|huggingface.hub|gradio|gradio.client|tokenizers|safetensors|bitsandbytes|pillow|numpy)=="
	$(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -m latest
	rm -rf $(LATEST_VENV)

lint:  # pycodestyle + pyflakes via ruff (settings in pyproject.toml); tests/test_code_quality.py runs it too
	ruff check .

app: install
	$(PYTHON) app.py

bench:
	$(PYTHON) benchmarks/bench_kv_cache.py
	$(PYTHON) benchmarks/bench_app.py
