"""The benchmark scripts still run (smoke, CPU, tiny sizes): the GPU
benchmark must work when a GPU session finally runs it."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_benchmark_script_smoke_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_resnet34.py"),
                          "--device", "cpu", "--sizes", "1040", "1100", "--tile", "1024",
                          "--reps", "1", "--uint8-from", "1100", "--cone", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["size"] for r in rows] == [1040, 1100]
    assert isinstance(rows[0]["whole"], dict) and isinstance(rows[0]["stream"], dict)
    assert isinstance(rows[0]["cone"], dict)
    assert rows[1]["uint8"] and rows[1]["whole"] is None and rows[1]["stream"]["s"] > 0
    # executed multiply-adds over a whole-image step: one extra forward with
    # halo caching, (much) more without
    for r in rows:
        assert 1.0 < r["stream_macs"] < 1.4 and r["cone_macs"] > r["stream_macs"] + 0.05, r
    assert "|   1040² | fp32  | 1024 |" in res.stdout
    # the memory model's peak beside the measured one (a GPU's): above the
    # stem output and its gradient alone
    assert all(r["model_gb"] > 2 * 256 * 65 * 65 * 4 / 1e9 for r in rows), rows


def test_recompute_script():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "recompute.py"),
                          "--sizes", "2048", "--tiles", "1920"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "|   2048² | 1920 |   2x2   |   1.353x |    1.804x |     1.000x |      1.333x |" \
        in res.stdout
