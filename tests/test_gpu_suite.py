"""bench/gpu_suite.sh as CI runs it: its dry run on the CPU takes the same stages in the same order
with the same outputs, so that a typo, a missing import or a wrong path fails here and not on a
GPU."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

STAGES = [
    "preflight",
    "train",
    "kernels",
    "model",
    "tests",
    "pipeline",
    "finetune",
    "train_shards",
    "report",
]


@pytest.mark.slow
@pytest.mark.suite_dry_run
def test_the_dry_run_takes_every_stage_and_returns_a_few_small_files(tmp_path):
    """Every stage in the order that puts the records that matter most first; $OUT kept (an earlier
    attempt's file survives), every stage's output in one log, the history file with the records and
    the profile, the report."""
    out = tmp_path / "suite"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier attempt's figure")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "bench/gpu_suite.sh", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "suite.txt").read_text().splitlines()
    stage_lines = summary[2:2 + len(STAGES)]
    assert [line.split()[0] for line in stage_lines] == STAGES
    assert all(line.endswith("ok") for line in stage_lines), summary
    assert (out / "earlier.txt").read_text() == "an earlier attempt's figure"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).stat().st_size < 16 * 2**20 for f in files)
    (history,) = [f for f in files if f.endswith(".json")]
    runs = json.loads((out / history).read_text())["runs"]
    records = [r["name"] for run in runs for r in run["records"]]
    assert records.index("synthetic_images_per_s.tiny") < records.index("images_per_s.tiny")
    assert (
        "synthetic_images_per_s.finetune_tiny" in records
        and "data_path_dali_vs_pil_timm" in records
    )
    assert any(f.endswith(".profile.tiny.txt") for f in files) and "REPORT.md" in files
    log = (out / "suite.log").read_text()
    assert [line.split()[1] for line in log.splitlines() if line.startswith("===== ")] == STAGES
    # a dry run lands nothing in the project
    assert not list((REPO / "bench" / "history").glob(f"*{history}"))


def test_a_stage_cut_at_its_budget_keeps_every_record_it_had_measured(tmp_path, capsys):
    """bench writes each record the moment it is measured: a stage killed after its first record
    keeps it."""
    from bench.__main__ import main as bench_main

    out = tmp_path / "history"
    mirror = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # The model stage on the CPU: its first record comes after a few seconds, the rest take longer.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench",
            "model",
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--mirror",
            str(mirror),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline()
    proc.kill()
    proc.wait()
    assert first.startswith("model ") and "encoder_visible_vs_mask_tokens" in first
    for folder in (out, mirror):
        (history,) = folder.glob("*.json")
        names = [
            r["name"] for run in json.loads(history.read_text())["runs"] for r in run["records"]
        ]
        # The stage makes 3 records; killed after its first, it holds that one (and at most the
        # next, just done).
        assert (
            names[0] == "encoder_visible_vs_mask_tokens.mae_vit_tiny_patch16" and len(names) < 3
        ), names
    assert bench_main(["report", "--history", str(out), "--out", str(tmp_path / "report")]) == 0


def test_a_failing_stage_fails_the_suite_and_the_others_still_run(tmp_path):
    out = tmp_path / "suite"
    env = {**os.environ, "OUT": str(out), "PYTHON": "/bin/false"}
    done = subprocess.run(
        ["bash", "bench/gpu_suite.sh", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    summary = (out / "suite.txt").read_text()
    assert all(f"{stage}" in summary for stage in STAGES) and summary.count(
        "FAILED (exit 1)"
    ) == len(STAGES)
