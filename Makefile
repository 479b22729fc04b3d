# tensorgpu — make targets
#
#   make run     set up, then generate text with the bundled tiny-neox model (.venv/bin/tensorgpu)
#   make test    set up, then run pytest over tests/   (make test PYTEST_ARGS="-k foo")
#   make bench   set up, then run the pytest-benchmark suites in benchmarks/
#   make setup   only the set-up: .venv, editable install, GPU driver check
#   make clean / make distclean
#
# Set-up is shared and stamp-based: .venv/.installed is rebuilt only when
# setup.cfg, setup.py or pyproject.toml change; it puts the `tensorgpu` command in .venv/bin.
# If wgpu finds no (non-OpenGL) adapter and apt-get is usable, Mesa's lavapipe (software Vulkan)
# is installed.

PYTHON      ?= python3
VENV        ?= .venv
VPY         := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
PYTEST_ARGS ?=
PROMPT      ?= In the beginning God created
MAX_TOKENS  ?= 48

SHELL := /bin/bash

# wgpu (through Vulkan/Mesa) complains when XDG_RUNTIME_DIR is unset.
ifeq ($(strip $(XDG_RUNTIME_DIR)),)
XDG_RUNTIME_DIR := $(shell d="$${TMPDIR:-/tmp}/tensorgpu-xdg-$$(id -u)"; mkdir -p "$$d" && chmod 700 "$$d" && echo "$$d")
endif
export XDG_RUNTIME_DIR

.PHONY: all setup driver run test bench clean distclean

all: test

setup: $(STAMP) driver

$(VPY):
	@if ! $(PYTHON) -m venv $(VENV); then \
	  rm -rf $(VENV); \
	  echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2; \
	  exit 1; \
	fi

$(STAMP): $(VPY) setup.cfg setup.py pyproject.toml
	$(VPY) -m pip install --disable-pip-version-check --progress-bar off -e ".[test]"
	@touch $@

# Make sure wgpu sees a GPU adapter; on a GPU-less Debian box install lavapipe.
driver: $(STAMP)
	@if $(VPY) .ci/has_adapter.py; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo "warning: no GPU adapter and no root to apt-get install mesa-vulkan-drivers" >&2; exit 0; fi; \
	  echo "No wgpu adapter found: installing mesa-vulkan-drivers (lavapipe software Vulkan)"; \
	  $$SUDO apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends mesa-vulkan-drivers || exit 1; \
	  $(VPY) .ci/has_adapter.py || echo "warning: still no non-OpenGL wgpu adapter after installing lavapipe" >&2; \
	else \
	  echo "warning: no wgpu adapter found and apt-get is unavailable; GPU tests will fail" >&2; \
	fi

run: setup
	$(VENV)/bin/tensorgpu generate --prompt "$(PROMPT)" --max-tokens $(MAX_TOKENS)

# pytest exits 5 when it collects no tests; treat that as success.
test: setup
	@rc=0; $(VPY) -m pytest -q -x $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

bench: setup
	@if [ ! -d benchmarks ]; then echo "no benchmarks/ folder yet"; exit 0; fi; rc=0; $(VPY) -m pytest benchmarks/ --benchmark-only $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no benchmarks collected"; rc=0; fi; exit $$rc

clean:
	rm -rf build/ dist/ *.egg-info .pytest_cache .benchmarks .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
