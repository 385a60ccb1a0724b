"""Time source trees against each other in alternating processes on one GPU: A / B / A / B ...

    python tools/alternate.py prepare main o-swizzle            (here, with git: trees under _alt/)
    python tools/alternate.py run --out DIR _alt/main _alt/o-swizzle _alt/main _alt/o-swizzle \\
        -- -k 'prefill_b8_2k|prefill_b1_16k' --impl mosaic        (the GPU machine; after --: run.py's)
    python tools/alternate.py table DIR/*.json                     (anywhere)

Timings move several per cent between processes (benchmarks/NOTES.md v9: main ran up to 8 % apart
from itself), so one process per tree says little: alternating the trees and comparing each run
with the mean of its neighbours of the other tree does. `prepare` writes each git revision's src/
into _alt/<rev>/src (untracked: delete it after); `run` runs benchmarks/run.py --quick once per tree
in the order given, with that tree's src first on PYTHONPATH, each to DIR/<i>_<tree>.json; `table`
prints time_us per row and run, and each run of the second tree against the mean of its
neighbouring runs of the first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare(revs: list[str], dest: Path) -> list[Path]:
    out = []
    for rev in revs:
        tree = dest / rev.replace("/", "_")
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        out.append(tree)
    return out


def run(trees: list[Path], out: Path, bench_args: list[str], timeout: float) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, tree in enumerate(trees):
        path = out / f"{i}_{tree.name}.json"
        path_dirs = [str(ROOT / ".site"), str(tree.resolve() / "src"), str(ROOT)]
        path_dirs += [d for d in os.environ.get("PYTHONPATH", "").split(os.pathsep) if d]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path_dirs))
        cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", *bench_args, "--out", str(path)]
        try:  # a run cut by its time limit keeps the rows it finished (run.py saves after each)
            subprocess.run(cmd, env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            print(f"{tree.name}: cut after {timeout:.0f} s", file=sys.stderr)
        written.append(path)
    return written


def table(paths: list[Path]) -> str:
    """Rows x runs of time_us (per implementation), and each run of the second tree named against
    the mean of its neighbouring runs of the first."""
    runs = []
    for p in sorted(paths, key=lambda p: int(p.name.split("_", 1)[0])):
        doc = json.loads(p.read_text()) if p.exists() else {"results": []}
        times = {(r["workload"], r["implementation"]): r.get("time_us") for r in doc.get("results", [])}
        runs.append((p.stem.split("_", 1)[1], times))
    names = list(dict.fromkeys(n for n, _ in runs))
    keys = list(dict.fromkeys(k for _, t in runs for k in t))
    lines = [f"{'row':<36} {'impl':<8} " + " ".join(f"{n[:12]:>12}" for n, _ in runs)
             + ("   second/first (per run of the second)" if len(names) == 2 else "")]
    for key in keys:
        vals = [t.get(key) for _, t in runs]
        cells = " ".join(f"{v:12.1f}" if v else f"{'-':>12}" for v in vals)
        ratios = []
        if len(names) == 2:
            for i, (n, _) in enumerate(runs):
                if n != names[1] or not vals[i]:
                    continue
                near = [vals[j] for j in (i - 1, i + 1) if 0 <= j < len(runs) and runs[j][0] == names[0] and vals[j]]
                if near:
                    ratios.append(f"{vals[i] / (sum(near) / len(near)):.3f}")
        lines.append(f"{key[0][:36]:<36} {key[1][:8]:<8} {cells}   {' '.join(ratios)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/alternate.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare", help="git revisions' src/ into _alt/<rev>/src")
    a.add_argument("revs", nargs="+")
    a.add_argument("--dest", type=Path, default=ROOT / "_alt")
    r = sub.add_parser("run", help="benchmarks/run.py --quick once per tree, in the order given")
    r.add_argument("trees", nargs="+", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--timeout", type=float, default=150, help="seconds per run (default 150)")
    t = sub.add_parser("table", help="the runs' times side by side")
    t.add_argument("paths", nargs="+", type=Path)
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.cmd == "prepare":
        print("\n".join(str(t) for t in prepare(args.revs, args.dest)))
    elif args.cmd == "run":
        print(table(run(args.trees, args.out, rest, args.timeout)))
    else:
        print(table(args.paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
