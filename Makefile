# `make demo` sets everything up (a .venv at the project root, reused when
# present) and runs the demo recipe; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
FACTORY := $(VENV)/bin/factory
export RAY_AUTH_MODE := disabled

# torch builds that come with a working torchvision (open_clip needs it).
ifeq ($(shell uname -m),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: demo semaug test test-fast bench install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	# lucidrains StyleGAN2 (adapter test): --no-deps, its metadata pulls in aim and a web stack
	$(PY) -m pip install -q --no-deps stylegan2_pytorch==1.9.0
	touch $@

demo: install
	$(FACTORY) validate recipes/demo.yaml > /dev/null
	$(FACTORY) plan recipes/demo.yaml
	$(FACTORY) run recipes/demo.yaml --out out/demo
	$(FACTORY) inspect out/demo
	$(FACTORY) gallery out/demo --n 64
	$(FACTORY) run recipes/semaug-mini.yaml --out out/semaug-mini
	$(FACTORY) inspect out/semaug-mini
	$(FACTORY) gallery out/semaug-mini --n 32

semaug: install
	$(FACTORY) run recipes/semaug.yaml --out out/semaug
	$(FACTORY) inspect out/semaug

test: install
	$(VENV)/bin/pytest

test-fast: install
	$(VENV)/bin/pytest -m "not slow"

bench: install
	$(PY) benchmarks/overhead.py --n 5000

clean:
	rm -rf out runs .pytest_cache
