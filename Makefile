# tether developer entry points. A fresh Debian 12 machine with python3 (>= 3.11), node 20, git
# and gcc needs nothing else: `make test` installs the rest.
#
#   make venv          .venv with tether editable + dev extras (stamp: re-runs when pyproject changes)
#   make deps          Debian packages the tests use (chromium, redis, nginx, Go + x/net + gorilla); apt only
#                      when something is missing
#   make autobahn-env  Autobahn wstest (Python 2.7 virtualenv) into .tools/, or kosoku as a fallback
#   make test          everything: node tests, then the whole pytest suite including slow tests
#   make test-fast     pytest without the slow tests
#   make soak          the 50k-connection soak (bench/soak.py); make soak-faults: the fault soak for 10 min
#   make demo          the video-call demo (examples/call) on http://127.0.0.1:8000; tutorial at /hello
#   make clean

# Every recipe runs as ONE bash script with -eu -o pipefail (.ONESHELL): a failing line stops it,
# and a `cd` carries over to the lines after it (use a subshell: `(cd dir && ...)`).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.ONESHELL:
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
TOOLS := .tools
VENV_STAMP := $(VENV)/.tether-dev-installed
# Asyncio debug mode in every test run (STYLE.md 15); warnings are errors via pyproject.toml.
PYTEST := PYTHONASYNCIODEBUG=1 $(VENV)/bin/pytest -p no:cacheprovider -ra
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

APT_PACKAGES := chromium redis-server nginx golang-go golang-golang-x-net-dev golang-github-gorilla-websocket-dev

# Autobahn testsuite: PyPI's 25.10.1 is Python 2 code; pins from its own requires.txt
# (see /work/shared/notes/conformance.md).
WSTEST := $(TOOLS)/wstest
WSTEST_PINS := autobahntestsuite==25.10.1 txaio==2.1.0 incremental==16.10.1 pyOpenSSL==19.1.0 \
	cryptography==3.3.2 Twisted==19.10.0 zope.interface==4.6.0 jinja2==2.11.3 markupsafe==1.1.1 \
	Werkzeug==1.0.1 klein==17.10.0 service_identity==18.1.0 unittest2==1.1.0 six==1.16.0 \
	'autobahn[accelerate,twisted]==0.10.9'

.PHONY: help venv deps autobahn-env node-deps test test-fast test-js demo clean

help:
	@sed -n '4,11s/^# \{0,1\}//p' Makefile

# ---------------------------------------------------------------------------------------------
# Environment

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "tether needs Python >= 3.11, $(PYTHON) is " + sys.version.split()[0])'
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q --upgrade pip
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -e '.[dev,bench]'  # bench: the harness test
	touch $@

deps:
	@missing=""
	for cmd in chromium:chromium redis-server:redis-server golang-go:go; do
	  command -v "$${cmd#*:}" >/dev/null || missing="$$missing $${cmd%%:*}"
	done
	for pkg in nginx golang-golang-x-net-dev golang-github-gorilla-websocket-dev; do
	  dpkg -s "$$pkg" 2>/dev/null | grep -q '^Status: install ok installed' || missing="$$missing $$pkg"
	done
	if [ -z "$$missing" ]; then echo "deps: all present"; exit 0; fi
	echo "deps: installing$$missing"
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(APT_PACKAGES)

# wstest when a Python 2.7 can be had, else kosoku (a Python 3 wheel) in the main venv.
# tests/conformance picks whichever exists, wstest first.
autobahn-env: $(VENV_STAMP)
	@if [ -x $(WSTEST)/bin/wstest ] && [ -f $(WSTEST)/.ok ]; then echo "autobahn-env: wstest ready"; exit 0; fi
	py2=""
	pyenv_py2="$$(pyenv root 2>/dev/null || echo "$$HOME/.pyenv")/versions/2.7.18/bin/python2.7"
	if [ -x "$$pyenv_py2" ]; then py2="$$pyenv_py2"; else py2="$$(command -v python2.7 || true)"; fi
	if [ -n "$$py2" ]; then
	  echo "autobahn-env: building wstest with $$py2"
	  rm -rf $(TOOLS)/venv-maker $(WSTEST)
	  $(PYTHON) -m venv $(TOOLS)/venv-maker
	  # virtualenv 20.21 is the last series that creates Python 2 environments.
	  $(TOOLS)/venv-maker/bin/pip install --disable-pip-version-check -q 'virtualenv<20.22'
	  if $(TOOLS)/venv-maker/bin/virtualenv -q -p "$$py2" $(WSTEST) \
	     && $(WSTEST)/bin/pip install --disable-pip-version-check --no-python-version-warning -q $(WSTEST_PINS) \
	     && $(WSTEST)/bin/wstest --help >/dev/null; then
	    touch $(WSTEST)/.ok
	    echo "autobahn-env: wstest ready"; exit 0
	  fi
	  echo "autobahn-env: building wstest with $$py2 FAILED (see the pip output above)" >&2
	  rm -rf $(WSTEST)
	else
	  echo "autobahn-env: no Python 2.7 found: looked for $$pyenv_py2 and for python2.7 on PATH." >&2
	  echo "  Autobahn's wstest needs Python 2.7 (Debian 12 has none; 'pyenv install 2.7.18' provides one)." >&2
	fi
	echo "autobahn-env: falling back to kosoku (PyPI, Rust) in $(VENV); conformance tests will use it" >&2
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q kosoku
	$(VENV)/bin/kosoku --help >/dev/null

# ---------------------------------------------------------------------------------------------
# Tests. Node's runner goes first and pytest last: a run is judged by its last summary line.

test: venv deps autobahn-env node-deps test-js
	$(PYTEST)

test-fast: venv deps autobahn-env node-deps test-js
	$(PYTEST) -m "not slow"

# TypeScript compiler and the AsyncAPI parser that check `tether schema` output (tests/ts).
node-deps: tests/ts/node_modules/.installed

tests/ts/node_modules/.installed: tests/ts/package-lock.json
	(cd tests/ts && npm ci --no-audit --no-fund --loglevel=error)
	touch $@

test-js:
	@if [ -d tests/js ]; then node --test tests/js/; else echo "test-js: no tests/js, skipped"; fi

# ---------------------------------------------------------------------------------------------
# Demo

# Only what the demo runs on: tether and uvloop in .venv (not the dev and bench extras).
# HOST=0.0.0.0 PORT=9000 make demo serves elsewhere; ICE_SERVERS='[{"urls": "stun:..."}]' adds STUN/TURN.
DEMO_STAMP := $(VENV)/.tether-demo-installed

$(DEMO_STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "tether needs Python >= 3.11, $(PYTHON) is " + sys.version.split()[0])'
	if [ ! -x $(VENV)/bin/pip ]; then
	  if ! $(PYTHON) -c 'import ensurepip' 2>/dev/null; then  # Debian keeps venv's pip bootstrap apart
	    echo "demo: $(PYTHON) cannot create a virtualenv; installing python3-venv"
	    $(SUDO) apt-get update -q
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q python3-venv
	  fi
	  $(PYTHON) -m venv $(VENV)
	fi
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -e '.[uvloop]'
	touch $@

demo: $(DEMO_STAMP)
	$(VENV)/bin/python -m examples.call.server

# ---------------------------------------------------------------------------------------------
# Benchmarks (owned by the benchmark engineer: `make bench` goes here)
#   make bench         full suite (~40 min): every peer, 3 interleaved runs, writes docs/benchmarks.md
#                      and docs/benchmarks.png; raw JSON in bench/results/. BENCH_ARGS="--peers a,b" etc.
#   make bench-quick   a few seconds per peer, report in bench/results/quick/
#   make bench-selftest  the load generator's own CPU per round trip against a trivial server, the
#                      generator it replaced alongside (SELFTEST_ARGS="-configs=50x1 -duration=5s" etc.)
#   make bench-gencost the old generator vs the new against the same peers, same run (BENCH_ARGS too)
#   make bench-micro   in-process ns/message of decode + dispatch + encode (bench/micro.py; MICRO_ARGS=--quick)
#   make soak          50,000 connections held 5 min by one server process (issue 16), tether then Node ws
#                      and Go x/net (~20 min, saturates both cores): the "50,000 connections held" section
#                      of docs/benchmarks.md and docs/soak.png (bench/soak.py; SOAK_ARGS="--peers tether" etc.)

BENCH_STAMP := $(VENV)/.tether-bench-installed
.PHONY: bench bench-quick bench-selftest bench-gencost bench-micro bench-workers soak soak-faults

$(BENCH_STAMP): $(VENV_STAMP)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -e '.[dev,bench]'
	touch $@

bench: $(BENCH_STAMP)
	command -v go >/dev/null || $(MAKE) deps
	ulimit -n "$$(ulimit -Hn)"
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

bench-quick: $(BENCH_STAMP)
	command -v go >/dev/null || $(MAKE) deps
	$(VENV)/bin/python bench/run.py --quick --out bench/results/quick $(BENCH_ARGS)

bench-selftest: $(VENV_STAMP)
	command -v go >/dev/null || $(MAKE) deps
	$(VENV)/bin/python bench/run.py --selftest $(SELFTEST_ARGS)

bench-gencost: $(BENCH_STAMP)
	command -v go >/dev/null || $(MAKE) deps
	$(VENV)/bin/python bench/run.py --gen-cost $(BENCH_ARGS)

bench-micro: $(VENV_STAMP)
	$(VENV)/bin/python bench/micro.py $(MICRO_ARGS)

# Broadcast to 10,000 receivers: 1 process (memory broker, then Redis) vs 2 workers on Redis
# (~3 min): the WORKERS section of docs/benchmarks.md and docs/workers.png (WORKERS_ARGS="--runs 5").
bench-workers: $(BENCH_STAMP)
	command -v go >/dev/null && command -v redis-server >/dev/null || $(MAKE) deps
	ulimit -n "$$(ulimit -Hn)"
	$(VENV)/bin/python bench/workers.py $(WORKERS_ARGS)

soak: $(BENCH_STAMP)
	command -v go >/dev/null || $(MAKE) deps
	$(VENV)/bin/python bench/soak.py $(SOAK_ARGS)

# The fault soak (tests/test_soak_faults.py) for 10 minutes of hostile traffic per broker
# (make test runs it for 60 s); a progress line every 10 s.
soak-faults: venv deps
	TETHER_SOAK_SECONDS=$${TETHER_SOAK_SECONDS:-600} $(PYTEST) -s tests/test_soak_faults.py


# ---------------------------------------------------------------------------------------------

clean:
	rm -rf $(VENV) $(TOOLS) reports build .pytest_cache .mypy_cache tests/ts/node_modules
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name '*.egg-info' -type d -prune -exec rm -rf {} +
