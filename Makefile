# sdrt: `make demo` runs the main job on the embedded default; `make test` runs the test suite.
# Both create or reuse .venv. On these machines `pip install torch==2.13.0` takes the CPU build from local
# disk; elsewhere set TORCH_PIP_ARGS to point pip at a CPU wheel index (a bare `torch` pulls a CUDA build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.sdrt-installed

.PHONY: venv test demo base-install-check sd15-export sdxl-export chromium clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# the real CLIP BPE vocabulary ships in this wheel; --no-deps: its deps pull torchvision
	$(PY) -m pip install -q --no-deps clip-anytorch
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q

demo: venv
	$(PY) -m sdrt demo

# The playground's browser test drives Debian's Chromium (Playwright is pointed at it; Playwright's own browser
# download is not used). Installs it when missing; needs root (CI runs as root).
chromium:
	command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }

# `pip install .` without torch must run `sdrt generate` (the runtime is torch-free).
base-install-check: venv
	$(PY) tools/base_install_check.py

# The full-size SD1.5 architecture (random weights): export time, peak memory and parity.
sd15-export: venv
	$(PY) benchmarks/export_sd15.py

# The full-size SDXL base architecture (random weights): the same (peak RSS measured 11.7 GiB; needs ~28 GB
# of disk).
sdxl-export: venv
	$(PY) benchmarks/export_sdxl.py

clean:
	rm -rf $(VENV) .venv-base build .pytest_cache
