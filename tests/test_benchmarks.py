"""Smoke tests of benchmarks/overhead.py and gemm_floor.py: they run and write the expected JSON keys (no timing is
asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_smoke(tmp_path):
    out = tmp_path / "overhead.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--model", "mlp-small", "--repeats", "1",
         "--warmup", "1", "--batch", "4", "--json", str(out)],
        check=True, cwd=ROOT, capture_output=True, timeout=600,
    )
    data = json.loads(out.read_text())
    assert {"torch", "threads", "rows", "cost_split"} <= set(data)
    rows = data["rows"]  # one per GEMM bound (ballgrad.gemm_bound), measured first
    assert [r["gemm_bound"] for r in rows] == ["measured", "a-priori"]
    for row in rows:
        assert row["model"] == "mlp-small"
        for key in ("plain_s", "ball_s", "ratio", "ratio_min", "ratio_max", "peak_bytes_plain", "peak_bytes_ball",
                    "memory_ratio", "repeats", "dtype", "batch", "param_rad"):
            assert key in row
    (split,) = data["cost_split"]
    assert split["model"] == "mlp-small"
    assert set(split["fractions"]) == {"mid_kernels", "radius_kernels", "python_dispatch", "outside_rules"}
    for key in ("mid_kernels_s", "radius_kernels_s", "python_dispatch_s", "outside_rules_s", "top_ops"):
        assert key in split


def test_gemm_floor_smoke(tmp_path):
    out = tmp_path / "floor.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gemm_floor.py"), "--model", "mlp-small", "--repeats", "1",
         "--json", str(out)],
        check=True, cwd=ROOT, capture_output=True, timeout=600,
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "mlp-small"
    assert row["gemms"] == 5  # two forward addmm, three backward mm (no grad for the input)
    assert set(row["gemm_ms"]) == {"float32", "float64", "bfloat16"}
    assert row["measured_floor"] > row["a_priori_floor"] > 0
