# Two commands set everything up on a fresh Debian/Ubuntu machine:
#   make demo   installs, seeds demo studies, starts the portal at http://127.0.0.1:5000
#   make test   installs what the tests need and runs them all
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Real peers the tests talk to (docs/architecture.md, "Real components").
APT_PACKAGES := redis-server orthanc orthanc-dicomweb dcmtk chromium postgresql pgbouncer gcc unzip 7zip \
	nginx orthanc-postgresql fonts-droid-fallback fonts-nanum fonts-dejavu-core
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps demo serve test check lint bench cluster clean i18n catalogs

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" \
	    || missing="$$missing $$p"; done; \
	command -v node >/dev/null || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  echo "Installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# Debian starts a system nginx on port 80 when it installs it; the cluster runs its own
	@# (loopback, temp config), so the system one is stopped and disabled (docs/cluster.md).
	@# Containers run without systemd (systemctl then fails): use the init script there.
	@if [ -d /run/systemd/system ] && systemctl is-enabled --quiet nginx 2>/dev/null; then \
	  $(SUDO) systemctl disable --now nginx || true; \
	elif [ -s /run/nginx.pid ] && [ -x /etc/init.d/nginx ]; then \
	  $(SUDO) /etc/init.d/nginx stop || true; $(SUDO) update-rc.d nginx disable || true; fi

demo: install catalogs
	$(BIN)/flask --app app demo
	@echo "Portal: http://127.0.0.1:5000 - sign in as a demo user (Ctrl-C stops everything)"
	$(BIN)/flask --app app demo-idp & idp=$$!; \
	$(BIN)/flask --app app hl7 serve & hl7=$$!; \
	trap 'kill $$idp $$hl7 2>/dev/null' EXIT INT TERM; \
	$(BIN)/gunicorn -c python:portal.gunicorn_config app:app

serve: install catalogs
	$(BIN)/gunicorn -c python:portal.gunicorn_config app:app

tests/support/oidc-provider/node_modules/.package-lock.json: tests/support/oidc-provider/package-lock.json
	cd tests/support/oidc-provider && npm ci --no-audit --no-fund --loglevel=error

test: system-deps install catalogs tests/support/oidc-provider/node_modules/.package-lock.json check
	$(BIN)/python -m pytest

# Languages (docs/i18n.md): `make i18n` extracts every marked string into messages.pot and
# merges it into each language's messages.po (translations kept); `catalogs` compiles the .mo
# files (never committed) and the test-only pseudo-locales.
# The reasons of the domain errors people meet on pages (error.html translates them; the JSON
# API answers them in English, docs/i18n.md).
I18N_REASONS := -k Invalid -k NotFound -k Conflict -k TooLarge -k Unprocessable -k Unavailable \
	-k ShareError -k UserError -k SignInFailed -k LaunchError -k LaunchRefused -k LinkLocked \
	-k LinkUnavailable -k NoSuchLink -k PinRequired -k WrongPin -k UploadLinkError \
	-k UploadRefused -k ReconcileError -k SearchError -k ExportTooLarge -k StillChecking \
	-k IdentityMismatch -k NoSuchInboxStudy -k ReportError -k StorageFull
i18n: install
	$(BIN)/pybabel extract -F babel.cfg --sort-output -k _l -k lazy_gettext -k N_ $(I18N_REASONS) \
	  -o portal/translations/messages.pot --project referrer-portal .
	$(BIN)/pybabel update -i portal/translations/messages.pot -d portal/translations \
	  -l de --no-fuzzy-matching --init-missing
	$(BIN)/pybabel update -i portal/translations/messages.pot -d portal/translations \
	  -l fr --no-fuzzy-matching --init-missing
	$(BIN)/pybabel update -i portal/translations/messages.pot -d portal/translations \
	  -l es --no-fuzzy-matching --init-missing
	$(MAKE) catalogs

catalogs: install
	$(BIN)/python -m portal.i18n compile

# Checks that keep the code as designed, before any test runs: types (mypy strict), the
# layer rules (import-linter contracts in pyproject.toml) and lint.
check: install
	$(BIN)/mypy portal demo app.py
	$(BIN)/lint-imports --no-logo
	$(BIN)/ruff check portal demo tests benchmarks app.py

lint: install
	$(BIN)/ruff check portal demo tests benchmarks app.py

bench: system-deps install
	@command -v wrk >/dev/null || ($(SUDO) apt-get install -y -qq wrk || true)
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/render.py
	$(BIN)/python benchmarks/console_search.py

# The reference cluster (docs/cluster.md): PostgreSQL, Redis, Orthanc on PostgreSQL, two
# portal nodes and nginx (TLS, HTTP/2) on 127.0.0.1; prints the address, Ctrl-C stops it.
cluster: system-deps install
	$(BIN)/python -m tests.support.cluster

clean:
	rm -rf $(VENV) build *.egg-info
