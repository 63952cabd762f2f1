"""The GPU check's dry run: the same script on the CPU (tests through the Triton interpreter, two
cases a step, benchmarks at a tiny scale), so its plumbing is proven before a GPU ever runs it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The dry run's own limit: its budget (600 s) and the closing table; unloaded, it needs a few minutes.
LIMIT_S = 660
TEST_STEPS = ("knn", "cubin", "philox", "kd_loss", "align_loss", "compile")
BENCH_STEPS = ("kd_llm", "knn_d2", "knn_wide", "kd_classes", "align_loss", "interpolate", "kd_peers_llm", "kd_peers",
               "align_peers", "interpolate_peers", "knn_d64")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_dry_run_passes_within_its_limit(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its test steps itself
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=LIMIT_S)
    summary = (tmp_path / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stderr[-2000:]
    assert "PLUMBING" not in summary
    lines = summary.splitlines()
    assert lines[0].startswith("smoke: python") and "torch" in lines[0] and "driver" in lines[0]
    for step in TEST_STEPS:  # each ran (or was cut by the budget, with a line saying so)
        assert any(line.startswith((f"tests {step}:", f"SKIP tests {step}:")) for line in lines), step
    for step in BENCH_STEPS:
        assert any(line.startswith((f"bench {step}:", f"SKIP bench {step}:")) for line in lines), step
    assert "benchmark cases each step selects on a GPU" in summary
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    measured = [r for r in records if "group" in r]
    assert measured and all(r["scale"] > 0 and r["clock"] for r in measured)
    assert not [r for r in records if "failed" in r]
    assert "op and shape" in (tmp_path / "table.txt").read_text()
