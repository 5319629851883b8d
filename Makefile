# The two commands a newcomer needs: `make demo` and `make test`. Each builds its own venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test test-fast browser lint format bench clean

venv: $(STAMP)

# torch is installed first and pinned by constraints.txt, so no later step can pull a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(PY) -m jobs.demo
	$(PY) -m serve.demo

test: venv lint browser
	$(PY) -m pytest $(PYTEST_ARGS)

# Everyday tier: no Ray, no slow training (under 2 minutes); `make test` (what CI runs) runs everything.
test-fast: venv
	$(PY) -m pytest -m "not ray and not slow" $(PYTEST_ARGS)

# The web page's test drives a real headless Chromium: Debian's chromium and its matching chromedriver,
# installed once (CI runs as root on a fresh machine), skipped when already there.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	fi

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: venv
	$(PY) -m benchmarks.decode
	$(PY) -m benchmarks.data
	$(PY) -m benchmarks.train
	$(PY) -m benchmarks.serve_load

clean:
	rm -rf $(VENV) runs mlruns mlflow.db demo_out .pytest_cache
