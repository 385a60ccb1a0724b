"""Command line: `python -m ragged_paged_attention {demo,bench}`.

The package ships the library only; the commands run the repository's examples/serving_demo.py
and benchmarks/run.py, so they work from a source checkout (an editable install included).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

USAGE = """usage: python -m ragged_paged_attention COMMAND [options]

commands:
  demo       serve a small transformer with continuous batching, checked against dense attention
             (examples/serving_demo.py; --help for its options)
  bench      the benchmark suite (benchmarks/run.py; --help for its options)
"""

SCRIPTS = {"demo": ("examples", "serving_demo.py"), "bench": ("benchmarks", "run.py")}


def _checkout_root() -> Path | None:
    # src/ragged_paged_attention/__main__.py -> the repository root, when run from a checkout
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in SCRIPTS:
        print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    root = _checkout_root()
    folder, name = SCRIPTS[cmd]
    path = root / folder / name if root else None
    if path is None or not path.is_file():
        print(f"`{cmd}` runs {folder}/{name} of the ragged-paged-attention repository, which an installed "
              "wheel does not carry: clone the repository and run it there (pip install -e .).", file=sys.stderr)
        return 2
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"_rpa_{cmd}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
