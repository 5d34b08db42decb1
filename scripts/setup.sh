#!/usr/bin/env bash
# Creates .venv and installs the package with its test dependencies (pinned by constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt -r requirements-test.txt
python -m pip install -q --no-deps -e .
