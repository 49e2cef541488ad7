"""Smoke test: benchmarks/step_throughput.py runs unchanged at toy sizes on CPU and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_throughput_tiny(tmp_path):
    out = tmp_path / "step.json"
    only = ["torch SGD fused", "AssociativeMomentum (sgd) [foreach]", "AssociativeMomentum (adam) [foreach]",
            "DeltaMomentum (elementwise) [foreach]", "DeepMomentum (identity) [foreach]", "M3 [foreach]"]
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_throughput.py"), "--tiny", "--out", str(out),
                    "--only", *only], check=True, cwd=ROOT, timeout=600,
                   env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"})
    data = json.loads(out.read_text())
    assert data["meta"]["tiny"] is True
    rows = [r for r in data["rows"] if "error" not in r]
    assert {r["optimizer"] for r in rows} >= {"copy", *only}
    for r in rows:
        assert r["ms"] > 0 and r["gb_per_s"] > 0 and r["pct_of_copy"] > 0
    assert {r["set"] for r in rows} == {"model", "many"}
