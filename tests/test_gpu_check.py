"""scripts/gpu_check.sh runs end to end on the CPU (--device cpu --quick), so the first GPU
minutes are not spent on its own bugs (issue 23)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu_passes_every_step(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    cmd = [str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick", "--out"]
    proc = subprocess.run([*cmd, str(tmp_path)], env=env, capture_output=True, text=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert proc.returncode == 0, (proc.stdout, json.dumps(summary, indent=1)[:3000])
    steps = summary["steps"]
    assert set(steps) == {"env", "cuda_tests", "matrix", "audit", "speed"}
    matrix = steps["matrix"]
    for check in ("R2_gloo_processes_eq_R1", "R5_resume_eq_R1", "R6_ngsgd_resume_eq"):
        assert matrix[check]["ok"], check
    assert matrix["R7_pretraining"]["resume_eq"]
    for opt in ("sgd", "pretrain"):
        assert steps["audit"][opt]["cuda_syncs_in_the_step_loop"] == 0
        assert steps["audit"][opt]["round_loop_host_reads"] <= steps["audit"][opt]["rounds"]
    assert steps["speed"]["throughput"]["sgd_fp32_mb256"]["frames_per_s"] > 0
