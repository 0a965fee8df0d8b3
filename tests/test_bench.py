"""The benchmark harness: records, history files and the report. Not the speed."""

import json
import time

import pytest
import torch
from PIL import Image

from bench.__main__ import main as bench_main
from bench.harness import History, Record, Stat, rate, stat_of, time_repeats
from bench.report import write_report


def test_rate_is_work_over_time_with_min_from_the_slowest_repeat():
    assert rate(10, [1.0, 2.0, 4.0]) == Stat(median=5.0, min=2.5, max=10.0, repeats=3)
    assert stat_of([3.0, 1.0, 2.0]) == Stat(2.0, 1.0, 3.0, 3)
    calls = []
    seconds = time_repeats(lambda: calls.append(time.sleep(0.02)), repeats=4, warmup=2)
    assert len(calls) == 6 and len(seconds) == 4  # the warm-up runs are not timed
    # each repeat timed around one call, not all of them
    assert all(0.02 <= s < 1.0 for s in seconds), seconds


def test_history_appends_well_formed_records(tmp_path):
    history = History(tmp_path, "cpu", quick=True)
    record = Record(
        "model", "x", "img/s", Stat(30, 20, 40, 3), Stat(10, 9, 11, 3), "base", {"batch": 4}
    )
    history.append([record])
    history.append([record])
    assert history.path.name.endswith("-cpu.json") and history.path.name[:4].isdigit()
    runs = json.loads(history.path.read_text())["runs"]
    assert len(runs) == 2
    assert set(runs[0]) >= {"date", "git_sha", "quick", "machine", "records"}
    assert set(runs[0]["machine"]) >= {"cpu", "cores", "versions"}
    saved = runs[0]["records"][0]
    assert saved["ratio"] == 3.0 and saved["ours"] == {
        "median": 30,
        "min": 20,
        "max": 40,
        "repeats": 3,
    }


def test_a_real_stage_writes_records_with_ratios_from_the_same_run(tmp_path, capsys):
    assert bench_main(["model", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    records = json.loads(path.read_text())["runs"][0]["records"]
    assert {r["name"] for r in records} == {
        "encoder_visible_vs_mask_tokens.mae_vit_tiny_patch16",
        "mae_step.mae_vit_tiny_patch16",
        "projected_h200_step.mae_vit_tiny_patch16",
    }
    measured = [r for r in records if not r["config"].get("projection")]
    assert len(measured) == 2
    for r in measured:
        assert r["ours"]["min"] <= r["ours"]["median"] <= r["ours"]["max"]
        assert r["ratio"] == pytest.approx(r["ours"]["median"] / r["baseline"]["median"])
    assert "history:" in capsys.readouterr().out


def fixture_run(date, sha, machine, records):
    return {
        "date": date,
        "git_sha": sha,
        "dirty": False,
        "quick": False,
        "machine": machine,
        "records": records,
    }


def train_record(img_per_s, base, mfu, config="vit_h14_1600ep"):
    return {
        "stage": "train",
        "name": f"images_per_s.{config}",
        "unit": "img/s",
        "ours": {"median": img_per_s, "min": img_per_s, "max": img_per_s, "repeats": 3},
        "baseline": {"median": base, "min": base, "max": base, "repeats": 3},
        "baseline_name": "reference-style",
        "config": {"config": f"configs/{config}.toml"},
        "interpreter": False,
        "extra": {"data_stall_pct": 1.0, "mfu": mfu, "bare_step_img_per_s": 1.25 * img_per_s},
        "ratio": img_per_s / base,
    }


def test_report_builds_from_a_fixture_history_and_keeps_devices_apart(tmp_path):
    gpu = {"cpu": "x", "cores": 16, "gpu": "NVIDIA H100 80GB HBM3", "device": "gpu"}
    cpu = {"cpu": "AMD EPYC", "cores": 2, "device": "cpu"}
    kernel = {
        "stage": "kernels",
        "name": "visible_tokens.tiny_interpreter",
        "unit": "GB/s",
        "ours": {"median": 0.001, "min": 0.001, "max": 0.001, "repeats": 3},
        "baseline": {"median": 0.4, "min": 0.4, "max": 0.4, "repeats": 3},
        "baseline_name": "eager",
        "config": {},
        "interpreter": True,
        "extra": {},
        "ratio": 0.0025,
    }
    history = tmp_path / "history"
    history.mkdir()
    (history / "2026-11-01-aaaaaaa-gpu-h100.json").write_text(
        json.dumps(
            {
                "format": 1,
                "runs": [
                    fixture_run(
                        "2026-11-01T10:00:00+00:00",
                        "aaaaaaa",
                        gpu,
                        [train_record(800.0, 400.0, 0.41)],
                    )
                ],
            }
        )
    )
    (history / "2026-11-02-bbbbbbb-gpu-h100.json").write_text(
        json.dumps(
            {
                "format": 1,
                "runs": [
                    fixture_run(
                        "2026-11-02T10:00:00+00:00",
                        "bbbbbbb",
                        gpu,
                        [train_record(1000.0, 400.0, 0.52)],
                    )
                ],
            }
        )
    )
    (history / "2026-11-02-bbbbbbb-cpu.json").write_text(
        json.dumps(
            {
                "format": 1,
                "runs": [
                    fixture_run(
                        "2026-11-02T11:00:00+00:00",
                        "bbbbbbb",
                        cpu,
                        [kernel, train_record(400.0, 250.0, None, "tiny")],
                    )
                ],
            }
        )
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "epoch_hours_3.png").write_bytes(
        b"a plot of records no longer in the history"
    )
    report = write_report(history, tmp_path / "out").read_text()
    gpu_part, cpu_part = (
        report.split("\n## NVIDIA H100")[1],
        report.split("\n## CPU: AMD EPYC")[1].split("\n## ")[0],
    )
    # Newest GPU run: 1000 img/s -> 1,281,167 / 1000 s = 21.4 min per epoch on one GPU, 2.5x the
    # baseline, 0.8 of its bare step.
    assert (
        "| configs/vit_h14_1600ep.toml | 1,000 | 1,250 | 0.80 | 400 | **×2.50** | 1.0% | 52.0% | "
        "21.4 min |"
        in gpu_part
    )
    assert "**×2.50**" in gpu_part and "linearly with the number of GPUs" in gpu_part
    assert (
        "| 2026-11-01T10:00 | aaaaaaa |" in gpu_part
        and "| 2026-11-02T10:00 | bbbbbbb |" in gpu_part
    )
    assert "Triton interpreter: not a speed" in cpu_part and "vit_h14" not in cpu_part
    # CPU runs are reported, never projected to cluster epoch times.
    assert "| configs/tiny.toml | 400 | 500 | 0.80 | 250 | **×1.60** | 1.0% | – |" in cpu_part
    assert (
        "no epoch times are projected" in cpu_part
        and " min |" not in cpu_part
        and " h |" not in cpu_part
    )
    assert "visible_tokens" not in gpu_part
    # the stale plot gone, the GPU's drawn again
    plots = sorted((tmp_path / "out").glob("epoch_hours_*.png"))
    assert len(plots) == 1 and Image.open(plots[0]).size == (720, 360)


def test_a_report_from_a_history_that_is_not_there_is_refused_and_keeps_the_report(
    tmp_path, capsys
):
    (tmp_path / "REPORT.md").write_text("the real report\n")
    (tmp_path / "empty").mkdir()
    for history in (tmp_path / "nowhere", tmp_path / "empty"):
        with pytest.raises(SystemExit) as refused:
            bench_main(["report", "--history", str(history), "--out", str(tmp_path)])
        assert refused.value.code == 2 and "the report is left as it is" in capsys.readouterr().err
    assert (tmp_path / "REPORT.md").read_text() == "the real report\n"


def test_the_traffic_count_takes_the_bytes_of_real_ops_and_neither_views_nor_matmuls():
    from bench.traffic import OtherBytes, mae_budget
    from tests.helpers import tiny_preset_model

    x = torch.randn(8, 16)
    with OtherBytes() as counter:
        x.view(16, 8).t()  # views move nothing
        torch.add(x, x)  # reads two, writes one
        x @ x.T  # a matmul: counted in FLOPs
    assert dict(counter.by_op) == {"add": 3 * x.numel() * 4}
    # The tiny MAE: a step's fixed part holds at least the bf16 copy of every matmul weight (fp32
    # read, bf16 written), made once per step whatever the batch; each image adds its activations.
    budget = mae_budget("mae_vit_tiny_patch16", 64, 16)
    weights = sum(
        m.weight.numel() for m in tiny_preset_model().modules() if isinstance(m, torch.nn.Linear)
    )
    assert budget.other_bytes_per_step >= 6 * weights
    assert budget.other_bytes_per_image > 0 and 0 < budget.memory_share < 1
