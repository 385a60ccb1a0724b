#!/usr/bin/env bash
# The GPU machine's one script, from the repository root, with $OUT set:
#
#   OUT=/some/dir tools/gpu_run.sh STEP[@GPU] ...      e.g.  tests-a@1 tests-b@2 memcheck@3 bench@0
#
# Steps given together run at the same time, each on the GPU after its "@" (default 0), each
# logging to $OUT/<step>.log; a failing step never stops another. Then $OUT/summary.txt holds the
# machine, the versions and one line per step (exit code, seconds, last line of its log).
#   tests-a, tests-b  the test suite's GPU backends (jax-triton, jax-mosaic, torch-cuda, xla on GPU), two halves
#   tests-bigmem      the > 2^31-element cache tests, alone on their GPU
#   memcheck-torch, memcheck-jax   compute-sanitizer memcheck over the garbage-metadata and poison tests
#   memcheck-mosaic   the same for the Mosaic prefill alone, over its own shapes too (fp8, MHA, head_dim 256,
#                     64-key units): what a change to that kernel must pass (sessions 12-13, ~60 s)
#   memcheck-xla      the same for the pure-JAX path on the GPU and its cache writes (XLA scatters: one
#                     scatter fusion read out of bounds in session 5, benchmarks/NOTES.md v5). Session 6:
#                     the cache writes pass; compute-sanitizer segfaults at the first attention test (NOTES v6)
#   autotune          tools/autotune.py --write \$AUTOTUNE_ARGS; the table goes to $OUT/tuning/ (never the user
#                     table another step on this machine reads)
#   compile           tools/compile_check.py (the full set) -> compile.json
#   bench             benchmarks/run.py $BENCH_ARGS --out $OUT/bench.json (+ .png)
#   startup           benchmarks/run.py --startup -k none --out $OUT/startup.json
#   startup-mosaic    the same for implementation="mosaic" (its two largest buckets) with JAX's persistent
#                     compilation cache on in both processes: what a restarted server pays for the Mosaic kernels
#   trace             tools/mosaic_trace.py (the Mosaic prefill's per-block timeline) -> trace.json
#   llama             tools/serve_llama3.sh $LLAMA_GPUS (uses GPUs from the one given)
#   sharded           the sharding tests on every visible GPU
#   tests-k           the GPU test files, only tests matching \$TEST_K
#   alternate         tools/alternate.py run over \$ALT_TREES (source trees from `tools/alternate.py prepare`,
#                     in the order to run, e.g. "_alt/main _alt/x _alt/main _alt/x"), benchmarks/run.py
#                     -k "\$ALT_K" \$ALT_ARGS (default --impl mosaic), each run cut at \$ALT_TIMEOUT s (150);
#                     the runs go to $OUT/alt/, their table ends the log (alternate.py prints it)
#   ptx               the Mosaic prefill's PTX and ptxas report for row \$PTX_ROW (default prefill_b8_2k) of
#                     each tree in \$PTX_TREES (default ".", the checked-out one) -> $OUT/ptx/<tree>/;
#                     read them here with tools/sass_loops.py
# Environment: BENCH_ARGS, AUTOTUNE_ARGS, PYTEST_ARGS, TEST_K, ALT_TREES, ALT_K, ALT_ARGS, ALT_TIMEOUT, PTX_TREES,
# PTX_ROW, STEP_TIMEOUT (seconds per step, default 540), LLAMA_GPUS. The *_ARGS are expanded unquoted in the
# step's shell line: quote a -k pattern inside them, BENCH_ARGS="--quick -k 'a|b'" (an unquoted | became a
# pipe: session 14); TEST_K, ALT_K and PTX_ROW are quoted by the step.
set -u -o pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for logs and results}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
    2>&1 | grep -v -e '^WARNING' -e 'pip version' || true
fi
export PYTHONPATH=$PWD/.site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset TRITON_INTERPRET
: "${STEP_TIMEOUT:=540}" "${PYTEST_ARGS:=}" "${BENCH_ARGS:=}" "${AUTOTUNE_ARGS:=}" "${TEST_K:=}"
: "${ALT_TREES:=}" "${ALT_K:=}" "${ALT_ARGS:=--impl mosaic}" "${ALT_TIMEOUT:=150}" "${PTX_TREES:=.}" "${PTX_ROW:=prefill_b8_2k}"
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)

{
  echo "=== $(date -u +%FT%TZ)  steps: $*"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  python3 -c 'import importlib.metadata as m
for d in ("jax", "jaxlib", "jax-cuda13-plugin", "triton", "torch", "flash-attn3-jax"):
    try: print(f"  {d:<18} {m.version(d)}")
    except m.PackageNotFoundError: print(f"  {d:<18} -")'
} >"$OUT/summary.txt" 2>&1

# -v -rf: each test's outcome is logged as it ends, so a worker that dies (a CUDA fault kills every
# later test in its process, and xdist can then stop with an INTERNALERROR before its summary)
# still leaves which test failed first; faulthandler dumps the stacks of a test hung past 300 s.
PYTEST_GPU="-v -rf -o faulthandler_timeout=300"
GPU_FILES="tests/test_attention.py tests/test_poison.py tests/test_torch.py tests/test_kv_cache.py tests/test_jit.py tests/test_validation.py tests/test_properties.py tests/test_mosaic.py"
# compute-sanitizer memcheck around one pytest run (the memcheck steps add the allocator setting and the tests)
MEMCHECK="$SANITIZER --tool memcheck --error-exitcode 3 --print-limit 20 python3 -m pytest -q -o addopts= -p no:cacheprovider"
step_cmd() {  # the command line of one step
  case $1 in
    tests-a) echo "python3 -m pytest $PYTEST_GPU -n 6 -m 'not bigmem' tests/test_attention.py $PYTEST_ARGS" ;;
    tests-b) echo "python3 -m pytest $PYTEST_GPU -n 6 -m 'not bigmem' ${GPU_FILES#tests/test_attention.py } $PYTEST_ARGS" ;;
    tests-bigmem) echo "python3 -m pytest -q -m bigmem tests/test_attention.py" ;;
    memcheck-torch) echo "JAX_PLATFORMS=cpu PYTORCH_NO_CUDA_MEMORY_CACHING=1 $MEMCHECK tests/test_poison.py \
      -k 'torch-cuda and (garbage or nan and (mixed_small or window_mid))'" ;;
    memcheck-jax) echo "XLA_PYTHON_CLIENT_ALLOCATOR=platform $MEMCHECK tests/test_poison.py \
      -k '(jax-triton or jax-mosaic) and (garbage or nan and (mixed_small or window_mid))'" ;;
    memcheck-mosaic) echo "XLA_PYTHON_CLIENT_ALLOCATOR=platform $MEMCHECK tests/test_poison.py \
      -k 'jax-mosaic and (garbage or nan and (mixed_small or window_mid or fp8_kv_prefill or head_dim_256 or mha_prefill))'" ;;
    memcheck-xla) echo "XLA_PYTHON_CLIENT_ALLOCATOR=platform $MEMCHECK tests/test_kv_cache.py tests/test_poison.py \
      -k 'xla and (not test_poison or garbage or nan and (mixed_small or window_mid))'" ;;
    autotune) echo "RPA_TUNING_DIR=$OUT/tuning python3 tools/autotune.py --write $AUTOTUNE_ARGS" ;;
    compile) echo "python3 tools/compile_check.py --jobs 16 --json $OUT/compile.json" ;;
    bench) echo "python3 benchmarks/run.py $BENCH_ARGS --out $OUT/bench.json" ;;
    startup) echo "python3 benchmarks/run.py --startup -k none --out $OUT/startup.json" ;;
    startup-mosaic) echo "python3 benchmarks/run.py --startup --persistent-cache --impl mosaic -k none \
      --out $OUT/startup_mosaic.json" ;;
    trace) echo "python3 tools/mosaic_trace.py --json $OUT/trace.json" ;;
    llama) echo "OUT=$OUT tools/serve_llama3.sh ${LLAMA_GPUS:-1}" ;;
    tests-k) echo "python3 -m pytest $PYTEST_GPU -n 6 -m 'not bigmem' $GPU_FILES -k '$TEST_K' $PYTEST_ARGS" ;;
    sharded) echo "python3 -m pytest -q -o addopts= tests/test_sharding.py" ;;
    alternate) echo "python3 tools/alternate.py run --timeout $ALT_TIMEOUT --out $OUT/alt $ALT_TREES -- \
      -k '$ALT_K' $ALT_ARGS" ;;
    ptx) echo "for t in $PTX_TREES; do d=$OUT/ptx/\$(basename \$(realpath \$t)); mkdir -p \$d; \
      (cd \$t && MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=\$d PYTHONPATH=\$PWD/src:\$PYTHONPATH \
      python3 $PWD/benchmarks/run.py --quick -k '$PTX_ROW\$' --impl mosaic --out \$d/run.json) >\$d/log.txt 2>&1; \
      find \$d -name '*.mlir-passes.log' -delete; echo \$t: \$(ls \$d | grep -c '\.ptx\$') PTX files; done" ;;
    *) return 1 ;;
  esac
}

pids=() names=() t0=$SECONDS
for spec in "$@"; do
  name=${spec%@*} gpu=0
  [[ $spec == *@* ]] && gpu=${spec#*@}
  cmd=$(step_cmd "$name") || { echo "unknown step $name" >>"$OUT/summary.txt"; continue; }
  [[ $name == sharded || $name == llama ]] || export_gpu="CUDA_VISIBLE_DEVICES=$gpu"
  [[ $name == sharded || $name == llama ]] && export_gpu=""
  ( echo "=== $name on GPU $gpu: $cmd"; s=$SECONDS
    env $export_gpu timeout "$STEP_TIMEOUT" bash -c "$cmd"; rc=$?
    echo "=== $name: exit $rc after $((SECONDS - s)) s" ) >"$OUT/$name.log" 2>&1 &
  pids+=($!) names+=("$name")
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  echo "${names[$i]}: $(tail -n 2 "$OUT/${names[$i]}.log" | tr '\n' ' ' | cut -c1-300)" >>"$OUT/summary.txt"
done
echo "=== all steps done after $((SECONDS - t0)) s" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
