#!/usr/bin/env bash
# Install everything the tests need (Debian packages, .venv and
# tests/interop/idp), then lint, type-check and run the whole suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k refresher`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/system-packages.sh
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test,uvloop]'
# The interoperability IdP (oidc-provider), pinned by package-lock.json.
npm ci --prefix tests/interop/idp --no-audit --no-fund --loglevel=error

.venv/bin/ruff check sidecar tests bench
.venv/bin/ruff format --check sidecar tests bench
.venv/bin/mypy

status=0
rm -f .coverage .coverage.*
.venv/bin/python -m coverage run -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    # pytest's "no tests collected": with a suite this size that means a
    # broken layout or a bad -k filter, never success.
    echo "error: pytest collected no tests" >&2
    exit 1
fi
if [ "$status" -eq 0 ]; then
    .venv/bin/python -m coverage combine --quiet
    .venv/bin/python -m coverage report --fail-under=85 | tail -n 25 \
        || status=$?
fi
exit "$status"
