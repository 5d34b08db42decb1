#!/usr/bin/env bash
# GPU check for a lent H100/H200 (~8 min): pg1_3b_224 bf16 training MFU against the measured
# bf16 matmul peak, and decoding speed against HF transformers on the same GPU, in one JSON
# (bench/gpu_check.py says what is measured).
#
#   bash bench/gpu_check.sh [bench.gpu_check args]    # -> $OUT/gpu_check.json and .log (OUT=/tmp)
#   bash bench/gpu_check.sh --variant tiny --quick    # the CPU dry run (tests/test_gpu_check.py)
#
# Such a machine has jax (CUDA), flax, optax, orbax, torch and transformers. What else the
# package imports on this path (requirements.txt: ml-collections, sentencepiece, pillow,
# pycocotools; their own dependencies come with jax/flax) is downloaded here beforehand:
#   pip download -d wheels --only-binary=:all: --no-deps ml-collections sentencepiece pillow pycocotools
# (add --python-version 3.X --platform manylinux2014_x86_64 when the GPU machine's python is
# not ours) and travels with the working tree: wheels/ is untracked, so the device tool copies
# it (name it in carry=["wheels"] if it is ever git-ignored). Installed from there, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
WHEELS="${WHEELS:-wheels}"
# JAX takes 75% of the GPU up front (the 3B step needs ~70 GiB at batch 4); torch gets the rest.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.75}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" TOKENIZERS_PARALLELISM=false
# Offline, into a folder put first on PYTHONPATH: works where site-packages is read-only
# or "externally managed" (PEP 668); skipped when everything imports already.
if ! "$PYTHON" -c "import ml_collections, sentencepiece, PIL, pycocotools" 2>/dev/null; then
  SITE="${TMPDIR:-/tmp}/gpu_check_site"
  if [ -d "$WHEELS" ] && "$PYTHON" -m pip install -q --no-index --no-deps --upgrade \
      --find-links "$WHEELS" --target "$SITE" ml-collections sentencepiece pillow pycocotools; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "warning: could not install ml-collections sentencepiece pillow pycocotools from" \
         "$WHEELS/; running with what is installed" >&2
  fi
fi
mkdir -p "$OUT"
"$PYTHON" -m bench.gpu_check "$@" --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
