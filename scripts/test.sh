#!/usr/bin/env bash
# Install edgefleet with its test extra into .venv and run lint, types, the import layers and the
# whole test suite.
# The README's second command. Safe to re-run; CI (.ci/run) calls it in a clean clone.
set -euo pipefail
cd "$(dirname "$0")/.."

# System services the tests talk to: a Mosquitto binary (the tests start their own broker per
# session) and Chromium for the dashboard's browser tests. Installed from Debian's packages.
need=()
command -v mosquitto >/dev/null 2>&1 || need+=(mosquitto)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need[*]} from Debian packages"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "warning: missing ${need[*]}; the tests that need them skip (or fail under CI=true)" >&2
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
