"""Command line: `python -m ragged_paged_attention {demo,bench,autotune}`."""

from __future__ import annotations

import sys

USAGE = """usage: python -m ragged_paged_attention COMMAND [options]

commands:
  demo       serve a small transformer with continuous batching, checked against dense attention
  bench      run the benchmark suite of ../shared/BENCHMARKS.md (GPU), write JSON + PNG
  autotune   measure launch configurations on this GPU and refresh the tuning table
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as run
    elif cmd == "bench":
        from .bench import main as run
    elif cmd == "autotune":
        from .autotune import main as run
    else:
        print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
