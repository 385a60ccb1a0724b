#!/usr/bin/env bash
# Llama-3-8B-shaped serving (examples/serving_demo.py --preset llama3-8b) on 1, 2 and 4 GPUs:
#
#   [OUT=dir] tools/serve_llama3.sh [GPU counts...]      (default: 1 2 4, as many as the machine has)
#
# For each count n: one process over an n-GPU mesh (--tp n) and, for n > 1, n processes of one
# GPU each joined by jax.distributed (--processes n); every run serves both request mixes
# (decode-heavy, prefill-heavy) with one compiled step. Expect 1.5-2 minutes per run (start-up and
# compilation are most of it), so about 4 minutes per GPU count; RUN_TIMEOUT (default 300 s) caps
# each run; DEMO_ARGS adds demo options to every run (e.g. "--steps 400", "--implementation mosaic"
# for the opt-in Mosaic GPU prefill, or a smaller model for a
# dry run on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=4).
#
# Writes to $OUT (a temporary folder if unset), at most 7 files: llama3_<n>gpu_<mode>.log per run,
# llama3.json (every run's numbers; rows of earlier invocations with the same OUT are kept
# unless rerun) and llama3_table.txt, which is also printed.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then  # the wheels tools/gpu_run.sh installs, when present
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
    2>&1 | grep -v -e '^WARNING' -e 'pip version' || true
fi
export PYTHONPATH=$PWD/.site:$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

have=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
COUNTS=("$@")
[ ${#COUNTS[@]} -eq 0 ] && COUNTS=(1 2 4)
TMP=$(mktemp -d)
status=0
run() {  # name, demo arguments...
  local name=$1 t0=$SECONDS rc
  shift
  # shellcheck disable=SC2086
  set -- --preset llama3-8b --no-progress "$@" ${DEMO_ARGS:-}
  echo "=== $name: python3 -m ragged_paged_attention demo $*"
  timeout -k 20 "${RUN_TIMEOUT:-300}" python3 -m ragged_paged_attention demo "$@" --json "$TMP/$name.json" \
    >"$OUT/llama3_$name.log" 2>&1
  rc=$?
  grep -E '^  (traffic|time per step|throughput|attention share|device time|all tokens)' "$OUT/llama3_$name.log" \
    | sed 's/^/    /'
  echo "=== $name: exit $rc after $((SECONDS - t0)) s (log: $OUT/llama3_$name.log)"
  [ $rc -ne 0 ] && { status=1; tail -n 20 "$OUT/llama3_$name.log"; }
}
for n in "${COUNTS[@]}"; do
  if [ "$have" -gt 0 ] && [ "$n" -gt "$have" ]; then
    echo "=== skipping $n GPUs: this machine has $have"
    continue
  fi
  run "${n}gpu_mesh" --tp "$n"
  [ "$n" -gt 1 ] && run "${n}gpu_procs" --processes "$n"
done

python3 - "$OUT" "$TMP" <<'EOF' | tee "$OUT/llama3_table.txt"
import glob, json, os, sys
out, tmp = sys.argv[1:]
path = os.path.join(out, "llama3.json")
rows = json.load(open(path)) if os.path.exists(path) else []
new = [r for f in sorted(glob.glob(os.path.join(tmp, "*.json"))) for r in json.load(open(f))]
key = lambda r: (r["tp"], r["processes"], r["traffic"])
rows = sorted([r for r in rows if key(r) not in {key(n) for n in new}] + new, key=key)
json.dump(rows, open(path, "w"), indent=1)
head = ("GPUs", "procs", "traffic", "steps", "ms/step", "device ms", "gen tok/s", "all tok/s", "attention",
        "KV write", "all-reduce", "matmul", "dense check")
table = [head]
for r in rows:
    b = r.get("device_breakdown") or {}
    pct = lambda k: f"{100 * b[k]:.0f}%" if k in b else "-"
    share = "-" if r.get("attention_share") is None else f"{100 * r['attention_share']:.0f}%"
    table.append((r["tp"], r["processes"], r["traffic"], r["steps"], f"{r['step_ms']:.1f}",
                  f"{r['device_ms_per_step']:.1f}" if "device_ms_per_step" in r else "-",
                  f"{r['generated_tok_s']:.0f}", f"{r['all_tok_s']:.0f}",
                  share + ("" if r["share_method"] == "profiler" else " (re-run)"),
                  pct("KV write"), pct("all-reduce"), pct("matmul"),
                  ("ok" if r["tokens_match"] else "MISMATCH") + f" ({r['checked_tokens']} tok)"))
widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
print(f"llama3-8b preset ({rows[0]['model'] if rows else '-'}), random weights, bucketed fixed shapes")
print("ms/step: wall time per step (host scheduling included); device ms: kernel time per step per GPU and")
print("the shares of it (jax.profiler over steps 32-47 of each run); throughput leaves the profiled steps out")
for row in table:
    print("  ".join(str(c).rjust(w) if i not in (2,) else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
EOF
rm -rf "$TMP"
echo "results in $OUT"
exit $status
