# Argus: the two commands a newcomer needs are `make demo` and `make test` (see README.md).
# Both create .venv, install the pinned requirements, and run under the service helper, which
# uses the PostgreSQL/Redis/MQTT/NATS answering at the configured URLs or starts private ones.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SERVICES := $(PY) -m devtools.services run --
export ARGUS_WEB_PORT ?= 8000

.PHONY: install lock browser demo test test-inner lint check bench chunk-bench alert-bench history-bench provision-bench fleet-bench http-bench faults services-up services-down clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' || \
		{ echo "Argus needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) -V 2>&1). Run: make PYTHON=python3.11 ..."; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || \
		{ echo "$(PYTHON) has no venv module: install it (Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --require-hashes -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

## make lock: requirements.txt (runtime, the image) and requirements-dev.txt (make install, CI) from
## pyproject.toml's pins, every package with its hashes, for Python 3.11 on Linux (uv pip compile).
UV_COMPILE := $(VENV)/bin/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 \
	--python-platform x86_64-unknown-linux-gnu --custom-compile-command "make lock"
lock: install
	$(UV_COMPILE) -o requirements.txt
	$(UV_COMPILE) --extra dev --constraint requirements.txt -o requirements-dev.txt

## make browser: Debian's Chromium and its ChromeDriver for the dashboard's browser test (apt, as
## root; nothing is downloaded at test time).
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

## make demo: migrate, seed, run the whole platform against simulated devices, print what happened.
demo: install
	DEBUG=1 $(SERVICES) $(PY) manage.py demo

## make test: lint, type-check, Django checks, then the whole test suite against the real services.
test: install browser
	ARGUS_TESTING=1 $(SERVICES) $(MAKE) --no-print-directory test-inner

test-inner: lint check
	$(PY) -m pytest

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

check:
	DJANGO_SETTINGS_MODULE=argus.settings_test $(PY) manage.py check
	DJANGO_SETTINGS_MODULE=argus.settings_test $(PY) manage.py makemigrations --check --dry-run

## make bench: end-to-end benchmark (BENCH_RATE msgs/s, 0 = flat out; BENCH_SECONDS).
bench: install
	DEBUG=1 $(SERVICES) $(PY) manage.py bench

## make chunk-bench: chunked-gateway benchmark (BENCH_TX_RATE transactions/s, BENCH_SECONDS).
chunk-bench: install
	DEBUG=1 $(SERVICES) $(PY) -m devtools.chunk_bench

## make alert-bench: breaching reading committed -> alert open, under BENCH_RATE (5000) msgs/s for BENCH_SECONDS (60).
alert-bench: install
	DEBUG=1 $(SERVICES) $(PY) -m devtools.alert_bench

## make history-bench: the read selectors on a 50 M-reading telemetry_history (HISTORY_BENCH_ROWS; filled once, then reused).
history-bench: install
	DEBUG=1 $(SERVICES) $(PY) -m devtools.history_bench

## make provision-bench: manage.py provision on a file of PROVISION_BENCH_DEVICES (10,000) devices: created, unchanged, updated.
provision-bench: install
	DEBUG=1 $(SERVICES) $(PY) -m devtools.provision_bench

## make fleet-bench: FLEET_DEVICES (10,000) devices, one mTLS connection and certificate each, publishing every
## FLEET_INTERVAL (10) s for FLEET_SECONDS (120); FLEET_STORM=1 restarts the broker meanwhile (devtools/fleet_bench.py).
fleet-bench: install
	DEBUG=1 $(SERVICES) $(PY) manage.py fleet_bench

## make http-bench: POST /api/v1/telemetry through gunicorn with API keys, single readings and batches (BENCH_SECONDS per phase, 30).
http-bench: install
	DEBUG=1 $(SERVICES) $(PY) -m devtools.http_bench

## make faults: the fault suite (FAULTS=name,name picks some); updates the table in docs/validation.md.
faults: install
	DEBUG=1 $(SERVICES) $(PY) manage.py faults --write-docs

services-up: install
	$(PY) -m devtools.services up

services-down: install
	$(PY) -m devtools.services down

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
