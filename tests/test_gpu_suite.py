"""bench/gpu_suite.sh as CI runs it: its dry run on the CPU takes the same stages in the same order with the same
outputs, so that a typo, a missing import or a wrong path fails here and not on a GPU."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

from tests.helpers import REPO

STAGES = ["tests", "kernels", "model", "train", "pipeline", "finetune", "report"]


@pytest.mark.slow
def test_the_dry_run_takes_every_stage_and_returns_a_few_small_files(tmp_path):
    out = tmp_path / "suite"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "suite.txt").read_text().splitlines()
    stage_lines = summary[2:2 + len(STAGES)]
    assert [line.split()[0] for line in stage_lines] == STAGES
    assert all(line.endswith("ok") for line in stage_lines), summary
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).stat().st_size < 16 * 2**20 for f in files)
    (history,) = [f for f in files if f.endswith(".json")]
    records = [r["name"] for run in json.loads((out / history).read_text())["runs"] for r in run["records"]]
    assert "synthetic_images_per_s.tiny" in records and "images_per_s.tiny" in records
    assert "synthetic_images_per_s.finetune_tiny" in records and "data_path_dali_vs_pil_timm" in records
    assert any(f.endswith(".profile.tiny.txt") for f in files) and "REPORT.md" in files
    with tarfile.open(out / "logs.tar.gz") as logs:
        assert sorted(m.name for m in logs.getmembers() if m.isfile()) == [f"logs/{s}.log" for s in sorted(STAGES)]
    assert not list((REPO / "bench" / "history").glob(f"*{history}"))  # a dry run lands nothing in the project


def test_a_failing_stage_fails_the_suite_and_the_others_still_run(tmp_path):
    out = tmp_path / "suite"
    env = {**os.environ, "OUT": str(out), "PYTHON": "/bin/false"}
    done = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    summary = (out / "suite.txt").read_text()
    assert all(f"{stage}" in summary for stage in STAGES) and summary.count("FAILED (exit 1)") == len(STAGES)
