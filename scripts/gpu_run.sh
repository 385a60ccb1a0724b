#!/usr/bin/env bash
# The one script to run on the GPU machine, from the repository root, with $OUT set:
#
#   OUT=/some/dir scripts/gpu_run.sh [tests] [compile] [memcheck] [demo] [bench]   (no argument: all five)
#
# Steps, in this order, each logged to $OUT/<step>.log, a failure never stopping the next:
#   tests     python3 -m pytest tests (TRITON_INTERPRET unset, so the GPU backends run) -> pytest.log, junit.xml
#   compile   python3 -m ragged_paged_attention.triton.compile_check --json $OUT/compile.json
#   memcheck  compute-sanitizer memcheck over scripts/memcheck_cases.py -> memcheck.log
#   demo      python3 -m ragged_paged_attention demo (the serving demo, Triton path) -> demo.log
#   bench     python3 -m ragged_paged_attention.bench --out $OUT -> bench.log, <gpu>.json, <gpu>.png
# then summary.txt: the versions, one line per step (exit code, seconds, headline). At most 8 files
# are left in $OUT (the device returns no more): logs beyond those are folded into summary.txt.
#
# A device call runs at most 600 s: run the tests and the benchmark in separate calls
# (e.g. `scripts/gpu_run.sh tests compile memcheck`, then `scripts/gpu_run.sh bench`).
# Environment knobs:
#   PYTEST_ARGS       extra pytest arguments (e.g. "-n 8 -x -k decode")
#   TEST_PATHS        what pytest collects (default "tests"; e.g. "tests/test_attention.py")
#   BIGMEM            0 skips the serial run of the bigmem tests after the others (default 1)
#   BENCH_ARGS        extra benchmark arguments (e.g. "--quick", "--impls triton,xla", "--workloads a,b")
#   BENCH_DEADLINE    seconds the benchmark may take before it skips what is left (default 480)
#   MEMCHECK_TIMEOUT  seconds for the memcheck step (default 420)
set -u -o pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for logs and results}"
mkdir -p "$OUT"

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests compile memcheck demo bench)
for s in "${STEPS[@]}"; do
  case $s in tests|compile|memcheck|demo|bench) ;; *) echo "unknown step '$s' (tests compile memcheck demo bench)"; exit 2 ;; esac
done

SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

# --- environment ----------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
    2>&1 | grep -v -e '^WARNING' -e 'pip version' || true
fi
export PYTHONPATH=$PWD/.site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
unset TRITON_INTERPRET

{
  echo "=== $(date -u +%FT%TZ)  steps: ${STEPS[*]}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv 2>&1 || echo "nvidia-smi failed"
  python3 - <<'EOF' 2>&1
import importlib.metadata as m, platform, sys
print("python", platform.python_version(), sys.executable)
for d in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "triton", "jax-triton", "torch", "ejkernel",
          "pytest", "pytest-timeout", "matplotlib", "tqdm"):
    try:
        print(f"  {d:<20} {m.version(d)}")
    except m.PackageNotFoundError:
        print(f"  {d:<20} -")
try:
    import jax
    print("  jax devices:", jax.devices())
except Exception as e:
    print("  jax devices: FAILED", e)
EOF
} | tee -a "$SUMMARY"

RESULTS=()
run_step() {  # name logfile command...
  local name=$1 log=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name: $*" | tee "$log"
  "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  RESULTS+=("$name|$rc|$((SECONDS - t0))|$log")
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
}

for step in "${STEPS[@]}"; do
  case $step in
  tests)
    timeout_opt=()
    python3 -c "import pytest_timeout" 2>/dev/null && timeout_opt=(--timeout 900)
    # shellcheck disable=SC2086
    # Big-memory tests (marked bigmem: the > 2^31-element cache) run alone afterwards: with several
    # xdist workers sharing the card they ran out of memory (benchmarks/results/gpu_tests.md).
    # -v: one line per test as it finishes, so a run cut short by the call's time limit still says
    # which tests passed.
    # shellcheck disable=SC2086
    run_step tests "$OUT/pytest.log" python3 -m pytest ${TEST_PATHS:-tests} -v -rfE ${timeout_opt[@]+"${timeout_opt[@]}"} \
      -p no:cacheprovider -m "not bigmem" --junitxml "$OUT/junit.xml" ${PYTEST_ARGS:-}
    if [ "${BIGMEM:-1}" != 0 ]; then
      # shellcheck disable=SC2086
      run_step tests-bigmem "$OUT/pytest.log.bigmem" python3 -m pytest ${TEST_PATHS:-tests} -v -rfE \
        ${timeout_opt[@]+"${timeout_opt[@]}"} -p no:cacheprovider -m bigmem
    fi
    ;;
  compile)
    if python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('ragged_paged_attention.triton.compile_check') is None)" 2>/dev/null; then
      run_step compile "$OUT/compile.log" python3 -m ragged_paged_attention.triton.compile_check --json "$OUT/compile.json"
    else
      RESULTS+=("compile|skipped|0|no module ragged_paged_attention.triton.compile_check")
    fi
    ;;
  memcheck)
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1 || true)
    if [ -z "$cs" ]; then
      echo "compute-sanitizer not found" | tee "$OUT/memcheck.log"
      RESULTS+=("memcheck|skipped|0|compute-sanitizer not found")
    else
      run_step memcheck "$OUT/memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${MEMCHECK_TIMEOUT:-420}" \
        "$cs" --tool memcheck --leak-check no --error-exitcode 3 python3 scripts/memcheck_cases.py
    fi
    ;;
  demo)
    run_step demo "$OUT/demo.log" timeout 300 python3 -m ragged_paged_attention demo
    ;;
  bench)
    deadline=${BENCH_DEADLINE:-480}
    # SIGINT first: the benchmark writes what it measured before it exits.
    # shellcheck disable=SC2086
    run_step bench "$OUT/bench.log" timeout -s INT -k 30 $((deadline + 60)) \
      python3 -m ragged_paged_attention.bench --out "$OUT" --deadline "$deadline" ${BENCH_ARGS:-}
    ;;
  esac
done

# --- summary ----------------------------------------------------------------------------------
headline() {  # one line of what a step's log says
  case $1 in
  tests|tests-bigmem) grep -E '^(=+ )?[0-9]+ (passed|failed)|[0-9]+ (passed|failed|error)' "$2" | tail -n 1 ;;
  compile) tail -n 3 "$2" | grep -v '^===' | tail -n 1 ;;
  memcheck) { grep -E 'ERROR SUMMARY|all cases ok|SOME CASES FAILED' "$2" || tail -n 1 "$2"; } | tr '\n' ' ' ;;
  bench) grep -E '^targets met|^wrote ' "$2" | tr '\n' ' ' ;;
  demo) grep -E 'all tokens match|throughput, generated' "$2" | tr -s ' ' | tr '\n' ' ' ;;
  esac
}
say ""
say "=== summary"
for r in "${RESULTS[@]}"; do
  IFS='|' read -r name rc secs log <<<"$r"
  if [ -f "$log" ]; then
    say "$(printf '%-9s exit %-7s %5ss  %s' "$name" "$rc" "$secs" "$(headline "$name" "$log" 2>/dev/null)")"
  else
    say "$(printf '%-9s %-12s %s' "$name" "$rc" "$log")"
  fi
done

# The device returns at most 8 files: fold the compile log, and anything else extra, into summary.txt.
keep_re='^(pytest\.log|junit\.xml|compile\.json|memcheck\.log|demo\.log|bench\.log|summary\.txt|.*\.json|.*\.png)$'
for f in "$OUT"/*; do
  b=$(basename "$f")
  if [ -f "$f" ] && { [ "$b" = compile.log ] || ! [[ $b =~ $keep_re ]]; }; then
    { echo; echo "=== $b (folded in)"; tail -c 200000 "$f"; } >>"$SUMMARY"
    rm -f "$f"
  fi
done
n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
if [ "$n" -gt 8 ]; then
  for f in $(ls -t "$OUT"/*.log 2>/dev/null | tail -n $((n - 8))); do
    { echo; echo "=== $(basename "$f") (folded in)"; tail -c 200000 "$f"; } >>"$SUMMARY"
    rm -f "$f"
  done
fi
ls -la "$OUT"
failed=0
for r in "${RESULTS[@]}"; do
  IFS='|' read -r name rc _ <<<"$r"
  [[ $rc =~ ^[0-9]+$ ]] && [ "$rc" -ne 0 ] && failed=1
done
exit $failed
