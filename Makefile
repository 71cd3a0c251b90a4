# The README's commands. Each works on a fresh machine by itself: it creates or updates .venv first.
PYTHON := .venv/bin/python

.PHONY: install test test-fast demo demo-seg lock

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

# Re-resolve the newest versions the requirements allow in a scratch environment and pin them in
# requirements/constraints.txt; then run `make test` and commit the file if it passes.
lock:
	rm -rf .venv-lock
	CONSTRAINTS=none VENV=$(CURDIR)/.venv-lock bash tools/setup_env.sh
	bash tools/freeze_env.sh .venv-lock > requirements/constraints.txt
	rm -rf .venv-lock
