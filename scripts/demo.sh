#!/usr/bin/env bash
# Install edgefleet (no torch, no GPU stack) into .venv and run the fleet demo on embedded defaults:
# embedded MQTT broker, controller on SQLite, local package directory, a small real model.
# The README's first command.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[all]'
exec .venv/bin/edgefleet demo "$@"
