"""tools/alternate.py: source trees from git revisions, one benchmark process per tree, and the
table that compares each run of the second tree with its neighbouring runs of the first."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import alternate  # noqa: E402


def _result(path: Path, times: dict):
    path.write_text(json.dumps({"results": [{"workload": w, "implementation": "mosaic", "time_us": t}
                                            for w, t in times.items()]}))


def test_prepare_writes_each_revisions_sources(tmp_path):
    [tree] = alternate.prepare(["HEAD"], tmp_path)
    assert tree == tmp_path / "HEAD"
    assert (tree / "src" / "ragged_paged_attention" / "mosaic_prefill.py").is_file()


def test_table_compares_each_run_with_its_neighbours(tmp_path):
    _result(tmp_path / "0_main.json", {"row_a": 100.0, "row_b": 50.0})
    _result(tmp_path / "1_new.json", {"row_a": 90.0, "row_b": 55.0})
    _result(tmp_path / "2_main.json", {"row_a": 80.0})              # row_b cut by the time limit
    _result(tmp_path / "3_new.json", {"row_a": 72.0, "row_b": 50.0})
    paths = [tmp_path / f for f in ("3_new.json", "0_main.json", "2_main.json", "1_new.json")]  # any order
    lines = alternate.table(paths).splitlines()
    assert lines[0].split()[2:6] == ["main", "new", "main", "new"]
    row_a = next(line for line in lines if line.startswith("row_a"))
    assert row_a.split()[-2:] == ["1.000", "0.900"]   # 90 / mean(100, 80); 72 / 80
    row_b = next(line for line in lines if line.startswith("row_b"))
    assert row_b.split()[2:6] == ["50.0", "55.0", "-", "50.0"] and row_b.split()[-1] == "1.100"   # 55 / 50


def test_run_times_each_tree_in_its_own_process(tmp_path):
    [tree] = alternate.prepare(["HEAD"], tmp_path / "alt")
    # One row (a server-shaped variant: the exact row's two variants took twice as long on CPU)
    [path] = alternate.run([tree], tmp_path / "out", ["-k", "decode_b8_ctx4k@T256xS64", "--impl", "xla"],
                           timeout=300)
    doc = json.loads(path.read_text())
    assert path.name == "0_HEAD.json" and doc["results"][0]["workload"].startswith("decode_b8_ctx4k")
