# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup model kernels browser demo test test-fast typecheck bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[all,test]'
	@touch $(STAMP)

setup: $(STAMP)

model: setup
	@$(VENV)/bin/together fetch --model smollm2-135m >/dev/null

# the torch backend's CPU kernels, compiled once per machine (~1 min; backends/torch/kernels), before any peer
# starts: a peer would otherwise build them inside its start-up
kernels: setup
	@$(PY) -c "from backends.torch import kernels; kernels.q4(); kernels.layer()"

# the web page's test drives a real headless Chromium (Debian's package)
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

demo: model kernels
	$(VENV)/bin/together demo

# mesh/ and apps/ fully typed (--disallow-untyped-defs, see pyproject), backends/ plain mypy
typecheck: setup
	$(PY) -m mypy mesh apps backends

test: model kernels browser typecheck
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

test-fast: model kernels
	$(PY) -m pytest -q -m "not slow"

bench: model
	$(PY) perf/bench_core.py

clean:
	rm -rf $(VENV) build *.egg-info
