#!/usr/bin/env bash
# The test suite (the README's second command runs this after setup).
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=2 JAX_PLATFORMS=cpu
python -m pytest -q -n 2 --dist loadfile "$@"
