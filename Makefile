# One command to set up and run the main job, one to set up and run the tests.
# Both create the virtual environment they need (.venv) and are idempotent. The set-up installs
# every extra but `gpu` (`.[all,test]`, torch pinned by .ci/constraints.txt); see README "Install".
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint proto proto-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c .ci/constraints.txt -e '.[all,test]'
	touch $(STAMP)

# The main job: the end-to-end demo on the embedded default bundle (output in ./dprdm-demo).
demo: setup
	$(VENV)/bin/dprdm demo --out dprdm-demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy privacy

proto: setup
	$(PY) tools/gen_proto.py

proto-check: setup
	$(PY) tools/gen_proto.py >/dev/null && git diff --exit-code -- proto \
		|| { echo "generated gRPC code is stale: run 'make proto'"; exit 1; }

test: setup lint proto-check
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) build *.egg-info
