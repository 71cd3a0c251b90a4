# The README's commands. Each works on a fresh machine by itself: it creates or updates .venv first.
PYTHON := .venv/bin/python

.PHONY: install test test-fast demo demo-seg

install:
	bash tools/setup_env.sh

test: install
	$(PYTHON) -m pytest tests -v --durations=25

test-fast: install
	$(PYTHON) -m pytest tests -m "not slow"

demo: install
	$(PYTHON) tools/run_demo.py det

demo-seg: install
	$(PYTHON) tools/run_demo.py seg
