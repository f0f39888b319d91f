# Everything a fresh Debian 12 machine needs is installed from here; nothing by hand.
SHELL := /bin/bash
# Debian's python3 is what the gateway runs on when installed (packaging/install-gateway.sh, the cloud-init of
# terraform/), so the venv, the tests and `make bench` use it too when it is there. It is built with PGO and LTO; an
# unoptimized interpreter earlier on PATH (pyenv's, say) answered an idle ping about 100 µs later
# (docs/architecture.md). PYTHON=... picks another.
PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := wireguard-go wireguard-tools coturn iperf3 nftables iproute2 iputils-ping procps iptables
# Deployment tests: cloud-init's schema check, systemd-analyze, shellcheck, and a Debian python3 with venv that the
# installed gateway runs on.
DEB_PACKAGES += cloud-init systemd python3-venv util-linux shellcheck
# The optional C extension of the data-plane hot path (dataplane/_native.c): compiler, Python and libcrypto headers.
DEB_PACKAGES += gcc libc6-dev python3-dev libssl-dev
# npm comes with nodejs on machines that use NodeSource's build; Debian's own nodejs needs its npm package.
NODE_PACKAGES := nodejs npm
PYTEST_ARGS ?=

.PHONY: setup deb venv js tools dist test lint typecheck demo bench clean fuzz mutate

setup: deb venv js tools

# Installs only what is missing, so a second run is quick and needs no network.
deb:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@command -v npm >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(NODE_PACKAGES) >/dev/null; }
	@# coturn's package starts a system turnserver; our tests start their own on chosen ports.
	@-systemctl disable --now coturn >/dev/null 2>&1 || true

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py dataplane/_native.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# checkov pins its own dependencies, so it lives in a venv of its own.
TOOLS_VENV := .venv-tools
CHECKOV_VERSION := 3.3.30

TOOLS_STAMP := $(TOOLS_VENV)/.installed-checkov-$(CHECKOV_VERSION)

tools: $(TOOLS_STAMP)

$(TOOLS_STAMP):
	@test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install -q --upgrade pip
	$(TOOLS_VENV)/bin/python -m pip install -q 'checkov==$(CHECKOV_VERSION)'
	@touch $@

# The wheel the install script and the Terraform module install (dist/firezone_gateway_py-<version>-py3-none-any.whl).
dist: venv
	@# A pure wheel: the C extension is left out so that one wheel installs on any CPU and Python (pure-Python hot path).
	FIREZONE_BUILD_NATIVE=0 $(PY) -m build --wheel --no-isolation --outdir dist .
	cd dist && sha256sum *.whl

js: lab/js/node_modules/.installed

lab/js/node_modules/.installed: lab/js/package.json
	cd lab/js && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy protocol dataplane agent lab tests fuzz tools

test: setup lint typecheck
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

demo: setup
	$(PY) -m lab.demo

# Data-plane benchmarks in network namespaces; wireguard-go is measured in the same run as the reference.
# Some rows only, shorter: make bench BENCH_ARGS="--only wgo-wgo,gateway --quick" (python -m lab.bench --help).
BENCH_ARGS ?=
bench: setup
	$(PY) -m lab.bench $(BENCH_ARGS)

# Coverage-guided fuzzing (atheris) of every parser that reads network or portal input, FUZZ_SECONDS per target.
# The corpus grows in build/fuzz-corpus; a crash is saved to build/fuzz-crashes and stops the run.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= $(shell $(PY) -c 'from fuzz import TARGETS; print(*TARGETS)' 2>/dev/null)
fuzz: venv
	@mkdir -p build/fuzz-crashes
	@for t in $(FUZZ_TARGETS); do \
	  echo "fuzzing $$t for $(FUZZ_SECONDS) s"; mkdir -p build/fuzz-corpus/$$t; \
	  $(PY) -m fuzz $$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    -artifact_prefix=build/fuzz-crashes/$$t- build/fuzz-corpus/$$t 2>&1 | grep -E "^(stat::|Done|==|INFO: A corpus)|Error|Traceback" ; \
	  test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

# Mutation testing of the sans-IO cores, module by module, smallest first; prints the score per module. Slow (hours
# for everything on 2 cores): MUTATE_ARGS="dataplane/p2p_control.py" narrows it, --report-only reprints the table.
MUTATE_ARGS ?=
mutate: venv
	$(PY) tools/mutation_report.py $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS_VENV) dist lab/js/node_modules .mypy_cache .ruff_cache .pytest_cache .hypothesis

# Fault scenarios (tests/scenarios): every one, the slow ones too; `make test` runs the representative subset.
.PHONY: scenarios soak
scenarios: setup
	FIREZONE_SCENARIOS=all $(PY) -m pytest -q -s -ra tests/scenarios $(PYTEST_ARGS)

# A fixed-length run against the real gateway with client churn, pings, relay flaps and one portal restart, sampling
# the gateway's RSS, descriptors, connections and drops every 10 s (lab/loadgen.py).
SOAK_MINUTES ?= 10
SOAK_ARGS ?=
soak: setup
	$(PY) -m lab.loadgen soak --minutes $(SOAK_MINUTES) $(SOAK_ARGS)
