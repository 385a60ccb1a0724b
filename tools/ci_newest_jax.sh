#!/usr/bin/env bash
# CI's second job: the newest JAX that pip resolves, on Python 3.12, in a fresh virtual environment:
# the pure-JAX path against the float64 oracle (attention, poison, validation, plans) and the
# Triton path lowered for CUDA (tests/lower_for_cuda.py: no GPU needed); then, on the JAX the Mosaic
# GPU prefill was run with, that kernel lowered for CUDA. Takes about 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=""
for c in python3.12 "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12; do
  if [ -z "$PY" ] && "$c" -c "" 2>/dev/null; then PY=$c; fi
done
if [ -z "$PY" ]; then
  echo "no Python 3.12 on this machine: the newest-JAX job cannot run" >&2
  exit 1
fi
# Everything this job writes (the ~1.3 GB environment, the Triton caches) goes under one temporary
# folder that is removed on exit: repeated local runs of .ci/run once filled a disk with them.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
VENV=$WORK/venv
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q jax "triton>=3.5,<3.7" pytest hypothesis pytest-xdist -e . 2>&1 | grep -v '^WARNING' || true
"$VENV/bin/python" -c "import jax, triton; print('newest JAX job: jax', jax.__version__, 'triton', triton.__version__)"
"$VENV/bin/python" -m pytest -q -n 2 -p no:cacheprovider tests/test_plan.py tests/test_validation.py tests/test_mosaic.py \
  tests/test_attention.py tests/test_poison.py -k "xla or not (interpret or jax-triton or torch)"
TRITON_CACHE_DIR=$WORK/triton-newest "$VENV/bin/python" tests/lower_for_cuda.py | "$VENV/bin/python" -c '
import json, sys
r = json.load(sys.stdin)
assert r["kernels_one_bucket"] == r["kernels_all_buckets"] == 4, r
print("lowered the Triton path for CUDA on jax", r["jax"], "-", len(r["buckets"]), "buckets,", r["kernels_all_buckets"], "kernels")'
# The Mosaic GPU prefill is chosen only on the JAX it was run with on a GPU (TESTED_JAX): lower it
# there too (its slot table and refusals ran above on the newest JAX, where its lowering is skipped).
TESTED=$("$VENV/bin/python" -c "from ragged_paged_attention.mosaic_prefill import TESTED_JAX; print('.'.join(map(str, TESTED_JAX[0])))")
"$VENV/bin/pip" install -q "jax==$TESTED" "jaxlib==$TESTED" 2>&1 | grep -v '^WARNING' || true
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -o addopts= tests/test_mosaic.py
TRITON_CACHE_DIR=$WORK/triton-tested "$VENV/bin/python" tests/lower_for_cuda.py | "$VENV/bin/python" -c '
import json, sys
r = json.load(sys.stdin)
assert r["mosaic"] == {"triton_calls": 2, "mosaic_calls": 1}, r
print("lowered an implementation=\"mosaic\" call for CUDA on jax", r["jax"])'
