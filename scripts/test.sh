#!/usr/bin/env bash
# The README's test command: set up .venv (with the test tools) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
exec .venv/bin/python -m pytest "$@"
