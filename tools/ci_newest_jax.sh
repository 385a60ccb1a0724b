#!/usr/bin/env bash
# CI's second job: the newest JAX that pip resolves, on Python 3.12, in a fresh virtual environment:
# the pure-JAX path against the float64 oracle (attention, poison, validation, plans) and the
# Triton path lowered for CUDA (tests/lower_for_cuda.py: no GPU needed). Takes about 2 minutes.
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
VENV=$(mktemp -d)/venv
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q jax "triton>=3.5,<3.7" pytest hypothesis pytest-xdist -e . 2>&1 | grep -v '^WARNING' || true
"$VENV/bin/python" -c "import jax, triton; print('newest JAX job: jax', jax.__version__, 'triton', triton.__version__)"
"$VENV/bin/python" -m pytest -q -n 2 -p no:cacheprovider tests/test_plan.py tests/test_validation.py \
  tests/test_attention.py tests/test_poison.py -k "xla or not (interpret or jax-triton or torch)"
TRITON_CACHE_DIR=$(mktemp -d) "$VENV/bin/python" tests/lower_for_cuda.py | "$VENV/bin/python" -c '
import json, sys
r = json.load(sys.stdin)
assert r["kernels_one_bucket"] == r["kernels_all_buckets"] == 4, r
print("lowered the Triton path for CUDA on jax", r["jax"], "-", len(r["buckets"]), "buckets,", r["kernels_all_buckets"], "kernels")'
