# FluxWorks: `make demo` generates an image through a real ComfyUI server; `make test` runs every test.
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup setup-test demo test test-fast lint clean

setup:
	bash scripts/setup_env.sh

setup-test:
	bash scripts/setup_env.sh --browser

demo: setup
	$(PY) -m devtools.demo

test: setup-test
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q tests/unit tests/parity

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf .venv .comfyui output test-artifacts .pytest_cache .ruff_cache
