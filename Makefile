# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
VENV ?= .venv
PYTHON ?= python3
PIP := $(VENV)/bin/pip install --disable-pip-version-check --quiet --no-compile
# MACHINE: cpu (default) or gpu (`make install MACHINE=gpu`); a venv installed for gpu stays gpu.
# onnxruntime and onnxruntime-gpu write the same package folder and insightface always pulls the CPU
# build, so the gpu install removes both and puts onnxruntime-gpu back alone; then
# `infu.face.providers.check_install` checks that exactly the machine's build is there.
MACHINE ?= $(if $(wildcard $(VENV)/.installed-gpu),gpu,cpu)
STAMP := $(VENV)/.installed-$(MACHINE)
ifneq ($(filter-out cpu gpu,$(MACHINE)),)
$(error MACHINE must be cpu or gpu, not $(MACHINE))
endif

.PHONY: install demo test test-all bench lint clean chromium

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e '.[$(MACHINE),dev]'
ifeq ($(MACHINE),gpu)
	$(VENV)/bin/pip uninstall --quiet --yes onnxruntime onnxruntime-gpu
	$(PIP) --no-deps onnxruntime-gpu
endif
	$(VENV)/bin/python -c 'from infu.face.providers import check_install; print(check_install("$(MACHINE)"))'
	# Bytecode of every installed module, compiled once in parallel (pip's --no-compile above skips its
	# slower serial pass): with PYTHONDONTWRITEBYTECODE set, as on CI, Python never caches bytecode itself
	# and every process (each Ray worker) would recompile torch & co. on import, twice the CPU. Some
	# packages ship Python 2 test files that do not compile: those errors are expected, hence `|| true`.
	$(VENV)/bin/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	rm -f $(VENV)/.installed*
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/infu run --config configs/embedded.yaml

# test: the CI suite, every test but those marked slow (whole-cluster, kill/resume and fault-injection
# runs, which test-all adds).
test: $(STAMP) chromium
	$(VENV)/bin/pytest -m "not slow"

test-all: $(STAMP) chromium
	$(VENV)/bin/pytest

# The dashboard's browser test drives Debian's chromium through Playwright (which never downloads a
# browser here). Installing it needs root (as on CI); elsewhere install it yourself or the test skips.
chromium:
	@command -v chromium > /dev/null || { test "$$(id -u)" = 0 && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium > /dev/null; } \
		|| echo "chromium is missing and could not be installed (that needs root): the browser test will skip"

bench: $(STAMP)
	for script in bench/*_bench.py; do $(VENV)/bin/python $$script || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check infu filtering captioning training datagen eval flows tests bench
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy captioning/engines datagen/swap

clean:
	rm -rf runs .pytest_cache
