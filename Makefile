# medtune — make demo (the whole pipeline on the sample) · make test (full test tier) · make test-quick
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
# Installed only when no torch is importable. On this machine it resolves to the CPU wheel on disk;
# elsewhere a CPU-only user sets TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu.
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
JOBS ?= 2

.PHONY: install demo test test-quick bench clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(if $(shell $(PYTHON) -c 'import torch' 2>/dev/null && echo y),--system-site-packages) $(VENV)
	@$(PY) -c 'import torch' 2>/dev/null && echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
	  || $(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[all]"
	@touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m medtune.demo

test: install
	$(PY) -m pytest -n $(JOBS) --durations=15

test-quick: install
	$(PY) -m pytest -n $(JOBS) -m "not slow" -q

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf runs/demo .pytest_cache
