"""bench/REPORT.md and PNG plots from the history: ours vs baseline per stage, projected epoch
times.

Numbers from different devices never share a table: each device (a CPU, each GPU model) gets its
own section, and Triton-interpreter numbers are marked as such.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from bench.harness import REPO, load_history

IMAGENET_TRAIN_IMAGES = 1_281_167
EPOCHS = 1600
GPU_COUNTS = (8, 64)
SCALING = (
    "Projected times assume throughput scales linearly with the number of GPUs (data parallel, "
    "gradient all-reduce overlapped with backward, every rank fed by its own DALI pipeline); "
    "multi-node runs will fall short of this by their communication overhead."
)


def _device_of(run: dict[str, Any]) -> str:
    machine = run["machine"]
    return machine.get("gpu") or f"CPU: {machine['cpu']} ({machine['cores']} cores)"


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"


def _hours(h: float) -> str:
    if h < 1:
        return f"{h * 60:,.1f} min"
    return f"{h:,.1f} h" if h < 48 else f"{h / 24:,.1f} d"


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def latest_records(runs: list[dict]) -> dict[tuple[str, str], tuple[dict, dict]]:
    """(stage, name) -> (record, run) of the newest run that measured it."""
    latest = {}
    for run in runs:
        for record in run["records"]:
            latest[(record["stage"], record["name"])] = (record, run)
    return latest


def stage_tables(latest: dict) -> list[str]:
    lines = []
    by_stage = defaultdict(list)
    for (stage, _), pair in sorted(latest.items()):
        by_stage[stage].append(pair)
    for stage, pairs in by_stage.items():
        lines += [
            f"#### {stage}",
            "",
            "| measurement | ours | baseline | ours / baseline | commit |",
            "|---|---|---|---|---|",
        ]
        for record, run in pairs:
            unit = record["unit"]
            base = record["baseline"]
            baseline = f"{_fmt(base['median'])} {unit} ({record['baseline_name']})" if base else "–"
            ratio = f"**×{record['ratio']:.2f}**" if record["ratio"] else "–"
            note = (
                " (Triton interpreter: not a speed)"
                if record["interpreter"]
                else (
                    " (a projection from counted traffic, not a measurement)"
                    if record["config"].get("projection")
                    else ""
                )
            )
            spread = f" [{_fmt(record['ours']['min'])}–{_fmt(record['ours']['max'])}]"
            lines.append(
                f"| {record['name']}{note} | {_fmt(record['ours']['median'])} {unit}{spread} | "
                f"{baseline} | {ratio} | {run['git_sha']} |"
            )
        lines.append("")
    return lines


def epoch_table(latest: dict, on_gpu: bool) -> list[str]:
    """Per training preset: the trainer, its bare model step and the reference-style trainer, and,
    from GPU records only, the projected ImageNet-1k epoch and run times."""
    train = [
        (r, run)
        for (stage, _), (r, run) in sorted(latest.items())
        if is_trainer_on_shards(stage, r)
    ]
    if not train:
        return []
    head = (
        "| config | trainer img/s per device | bare model step | trainer efficiency | "
        "reference-style trainer | epoch speedup | data stall | MFU |"
    )
    if on_gpu:
        head += (
            " epoch, 1 device | "
            + " | ".join(f"epoch, {n} devices | {EPOCHS} epochs, {n} devices" for n in GPU_COUNTS)
            + " |"
        )
    title = "#### training: trainer, bare step, reference-style" + (
        " and projected ImageNet-1k epoch time" if on_gpu else "")
    lines = (
        [title, ""]
        + ([SCALING, ""] if on_gpu else ["CPU runs: no epoch times are projected from them."])
        + ["", head, "|" + "---|" * (head.count("|") - 1)]
    )
    for record, _run in train:
        per_device = record["ours"]["median"]
        extra = record["extra"]
        bare = extra.get("bare_step_img_per_s") or bare_step(latest, record["config"]["config"])
        mfu = f"{100 * extra['mfu']:.1f}%" if extra.get("mfu") is not None else "–"
        cells = [record["config"]["config"], _fmt(per_device), _fmt(bare),
                 f"{per_device / bare:.2f}" if bare else "–", _fmt(record["baseline"]["median"]),
                 f"**×{record['ratio']:.2f}**", f"{extra['data_stall_pct']:.1f}%", mfu]
        if on_gpu:
            hours = IMAGENET_TRAIN_IMAGES / per_device / 3600
            cells.append(_hours(hours))
            for n in GPU_COUNTS:
                cells += [_hours(hours / n), _hours(hours * EPOCHS / n)]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def bare_step(latest: dict, config: str) -> float | None:
    """The bare model step of `config` (img/s), as the newest synthetic-data record of it measured
    it."""
    found = latest.get(("train", f"synthetic_images_per_s.{Path(config).stem}"))
    return found[0]["baseline"]["median"] if found else None


def is_trainer_on_shards(stage: str, record: dict) -> bool:
    """The end-to-end training records (real data against the reference-style trainer), which
    project epochs."""
    return stage == "train" and record["name"].startswith("images_per_s.")


def synthetic_table(latest: dict) -> list[str]:
    """The trainer on synthetic data against its bare model step: overhead, MFU, memory and the
    profile's file."""
    rows = []
    for (stage, name), (record, _run) in sorted(latest.items()):
        if stage != "train" or not name.startswith("synthetic_images_per_s."):
            continue
        extra = record["extra"]
        mfu = f"{100 * extra['mfu']:.1f}%" if extra.get("mfu") is not None else "–"
        memory = (
            f"{extra['peak_memory_gb']:.1f} GB" if extra.get("peak_memory_gb") is not None else "–"
        )
        rows.append(
            f"| {record['config']['config']} | {record['config']['local_batch_size']} | "
            f"{_fmt(record['ours']['median'])} | {_fmt(record['baseline']['median'])} | "
            f"**{record['ratio']:.2f}** | {mfu} | {memory} | {extra.get('profile') or '–'} |"
        )
    if not rows:
        return []
    return [
        "#### trainer on synthetic data (no decoding) against its bare model step",
        "",
        "| config | local batch | trainer img/s | bare step img/s | trainer efficiency | MFU | "
        "peak memory | profile |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def projection_table(latest: dict, gpu_runs: dict[str, list[dict]]) -> list[str]:
    """Counted traffic budgets and the H200 steps they project to, beside any GPU's measured step of
    that model."""
    rows, basis = [], ""
    for (stage, _name), (record, _run) in sorted(latest.items()):
        if stage != "model" or not record["config"].get("projection"):
            continue
        model, extra, basis = (
            record["config"]["model"],
            record["extra"],
            record["config"]["projection"],
        )
        measured = [
            f"{_fmt(r['ours']['median'])} img/s on {device}"
            for device, runs in sorted(gpu_runs.items())
            for (s, n), (r, _) in latest_records(runs).items()
            if (s, n) == ("model", f"mae_step.{model}")
        ]
        top = ", ".join(f"{op} {gb:.3g}" for op, gb in extra["top_ops_gb_per_image"].items())
        rows.append(
            f"| {model} | {record['config']['local_batch_size']} | "
            f"{extra['matmul_gflop_per_image']:.1f} | {extra['other_gb_per_image']:.3g} + "
            f"{extra['other_gb_per_step']:.3g} per step | {top} | "
            f"{100 * extra['memory_share']:.0f}% | {_fmt(record['ours']['median'])} | "
            f"{100 * extra['projected_mfu']:.1f}% | {'; '.join(measured) or '–'} |"
        )
    if not rows:
        return []
    return [
        "#### projected H200 step from counted traffic (not a measurement)",
        "",
        f"{basis}: each part at its own ceiling, an eager step's bytes (compiled blocks fuse some "
        "away). Counted op by op on this CPU under bf16 autocast.",
        "",
        "| model | local batch | matmul GFLOP/img | other ops' GB/img | most bytes (GB/img) | "
        "memory share | projected img/s | projected MFU | measured |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def shards_projection(latest: dict) -> list[str]:
    """ImageNet-1k's train build time from the builder's measured rate per core (validation
    included), and what its listing and plan hold in memory at two data set sizes."""
    lines = []
    found = latest.get(("shards", "builder_img_per_s"))
    projection = found[0]["extra"] if found else {}
    if "imagenet_build_hours" in projection:
        hours = ", ".join(
            f"{_hours(h)} on {cores} cores"
            for cores, h in projection["imagenet_build_hours"].items()
        )
        peaks = ", ".join(
            f"{name} {mb:.0f} MB" for name, mb in projection.get("peak_memory_mb", {}).items()
        )
        rate = projection["img_per_s_per_core"]
        lines += [
            f"Projected ImageNet-1k train build (1,281,167 images) at {rate:.0f} img/s per core: "
            f"{hours}, if storage delivers ~140 GB in that time. Peak builder memory: {peaks}.",
            "",
        ]
    found = latest.get(("shards", "builder_plan_images_per_mb"))
    if found:  # the builder before its shuffle was bounded, which held every file
        extra, sha = found[0]["extra"], found[1]["git_sha"]
        measured = ", ".join(f"{int(n):,} files {mb:,.0f} MB" for n, mb in extra["peak_mb"].items())
        trend = ", ".join(
            f"{int(n):,} files {gb:,.1f} GB" for n, gb in extra["projected_gb"].items()
        )
        lines += [
            f"Builder listing and plan memory at {sha}, every file held (simulated files): "
            f"{measured}, {extra['bytes_per_image']} bytes a file; by that trend {trend}.",
            "",
        ]
    found = latest.get(("shards", "builder_plan_peak_mb"))
    if found:
        extra, buffer = found[0]["extra"], found[0]["config"]["sort_buffer"]
        measured = ", ".join(
            f"{_files_and_buffer(what)} {mb:,.0f} MB" for what, mb in extra["peak_mb"].items()
        )
        trend = ", ".join(f"{int(n):,} files {mb:,} MB" for n, mb in extra["projected_mb"].items())
        lines += [
            f"Builder listing and plan memory (simulated files): {measured}. It holds one part of "
            f"the listing at a time, at most the sort buffer ({buffer:,} images, "
            f"{extra['bytes_per_held_image']} bytes each): by that trend {trend}, never above "
            f"{extra['bound_mb']:,} MB. Planning takes {extra['plan_us_per_image']} µs a file on "
            "one core.",
            "",
        ]
    found = latest.get(("shards", "builder_peak_mb"))
    if found:
        extra, config = found[0]["extra"], found[0]["config"]
        builds = ", ".join(f"{int(n):,} images {mb:,.0f} MB in {extra['build_s'][n]:,.0f} s"
                           for n, mb in extra["peak_mb"].items())
        lines += [
            f"Whole builds of small images from one tar ({config['workers']} workers), the largest "
            f"process's peak: {builds}; {extra['bytes_per_image_between']} bytes more an image "
            "between them.",
            "",
        ]
    return ["#### shard builder: projections", "", *lines] if lines else []


def _files_and_buffer(key: str) -> str:
    """"1000000 images, buffer 200000" as "1,000,000 files (buffer 200,000)"."""
    images, buffer = key.split(" images, buffer ")
    return f"{int(images):,} files (buffer {int(buffer):,})"


def history_table(runs: list[dict], on_gpu: bool) -> list[str]:
    rows = []
    for run in runs:
        for record in run["records"]:
            if is_trainer_on_shards(record["stage"], record):
                per_device = record["ours"]["median"]
                epoch = _hours(IMAGENET_TRAIN_IMAGES / per_device / 3600) if on_gpu else "–"
                rows.append(
                    f"| {run['date'][:16]} | {run['git_sha']} | {record['name']} | "
                    f"{_fmt(per_device)} | {epoch} | ×{record['ratio']:.2f} |"
                )
    if not rows:
        return []
    return [
        "#### training throughput across commits",
        "",
        "| date | commit | measurement | img/s per device | epoch, 1 device | vs reference-style |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def plot_epoch_hours(runs: list[dict], path: Path, title: str) -> Path | None:
    """Projected one-device epoch hours per commit, one line per training config."""
    series: dict[str, list[float]] = defaultdict(list)
    commits: list[str] = []
    for run in runs:
        train = [r for r in run["records"] if is_trainer_on_shards(r["stage"], r)]
        if not train:
            continue
        commits.append(run["git_sha"])
        for record in train:
            series[record["name"]].append(IMAGENET_TRAIN_IMAGES / record["ours"]["median"] / 3600)
    if not commits:
        return None
    width, height, margin = 720, 360, 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    top = max(v for values in series.values() for v in values) * 1.1
    draw.rectangle([margin, 30, width - 20, height - margin], outline="black")
    draw.text(
        (margin, 8),
        f"{title}: projected ImageNet epoch hours on 1 device (lower is better)",
        fill="black",
    )
    for i in range(5):
        y = height - margin - i * (height - margin - 30) / 4
        draw.text((4, y - 6), f"{top * i / 4:.3g}", fill="black")
    step = (width - margin - 40) / max(1, len(commits) - 1)
    for i, sha in enumerate(commits):
        draw.text((margin + i * step - 12, height - margin + 6), sha[:7], fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for (name, values), colour in zip(series.items(), colours * 4, strict=False):
        points = [(margin + i * step, height - margin - v / top * (height - margin - 30))
                  for i, v in enumerate(values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        label_x = min(max(points[-1][0] + 6, margin + 4), width - 180)
        # the preset
        draw.text((label_x, points[-1][1] - 16), name.removeprefix("images_per_s."), fill=colour)
    img.save(path)
    return path


def write_report(history: Path, out: Path) -> Path:
    runs = load_history(history)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# maeflow benchmark report",
        "",
        f"Generated by `python -m bench report` from {len(runs)} stage runs in "
        f"`{_shown(history)}`. Every ratio compares numbers measured in the same run on the same "
        "machine; medians over repeats, [min–max] beside them.",
        "",
    ]
    by_device = defaultdict(list)
    for run in runs:
        by_device[_device_of(run)].append(run)
    # every plot is drawn again below, from the records it names
    for stale in out.glob("epoch_hours_*.png"):
        stale.unlink()
    for number, (device, device_runs) in enumerate(sorted(by_device.items())):
        latest = latest_records(device_runs)
        lines += [f"## {device}", ""]
        if "CPU" in device:
            lines += [
                "CPU numbers: the tiny preset and small shapes, for tracking changes on the "
                "development machine. They say nothing about GPU speed and are never compared "
                "with GPU numbers.",
                "",
            ]
        on_gpu = "CPU" not in device
        gpu_runs = {d: r for d, r in by_device.items() if "CPU" not in d}
        lines += (
            stage_tables(latest)
            + projection_table(latest, gpu_runs)
            + shards_projection(latest)
            + synthetic_table(latest)
            + epoch_table(latest, on_gpu)
            + history_table(device_runs, on_gpu)
        )
        plot = (
            plot_epoch_hours(device_runs, out / f"epoch_hours_{number}.png", device)
            if on_gpu
            else None
        )
        if plot:
            lines += [f"![epoch hours across commits on {device}]({plot.name})", ""]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines) + "\n")
    return report
