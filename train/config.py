"""Typed training configuration: a preset file from configs/ plus `--set section.key=value`
overrides.

This module holds the sections every task's config has and their parsing: each field is a `setting`
with its default and a one-line doc (`describe()` prints them, `--print-config` shows them), and
values are checked here, before any process starts distributed work, so a typo costs one clear line
rather than a cluster job. A task's own sections live with the task (`train.mae_task`,
`train.classifier_task`), in its `RunConfig` subclass. What a config implies lives where it is used:
the batch plan and lr in `train.recipe`, DeepSpeed's config in `train.engine`, what a resume may
change in `train.resume`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from model import PRESETS
from pipeline.formats import FormatError, check_format, stamp
from pipeline.loader_base import Backend

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad preset, override or combination of values."""


def setting(default: Any, doc: str) -> Any:
    """A config field: its default and the line `describe()` prints for it."""
    return field(default=default, metadata={"doc": doc})


# The tasks maeflow ships, by the name their presets' `task` line gives, and where each one's `Task`
# lives. A task of one's own needs no line here: its script hands its `Task` to `train.launch`. What
# reads a preset or a saved config without a script at hand (a preset given to another task's
# script, `train.export` of a run) looks tasks up here.
BUILTIN_TASKS = {
    "pretrain": "train.mae_task:MaeTask",
    "finetune": "train.classifier_task:ClassifierTask",
}


def builtin_task(name: str) -> Any:
    """The `Task` class maeflow ships under `name` (its script, config type and the rest), or
    None."""
    if name not in BUILTIN_TASKS:
        return None
    module, _, attribute = BUILTIN_TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass
class ModelConfig:
    name: str = setting("mae_vit_huge_patch14", "model preset, one of model.PRESETS")
    activation_recompute: bool = setting(False,
        "recompute encoder blocks in backward: less activation memory, ~30% more encoder compute")
    init: str = setting(
        "", "start from these weights: an export, a released MAE .pth, a run folder (fine-tuning)")


@dataclass
class DataConfig:
    shards: str = setting("", "shard folder, brace pattern or s3://bucket/prefix; --data sets it")
    img_size: int = setting(
        224, "side of the square crops the loader delivers, which the model is built for")
    backend: Backend = setting(
        "dali", "dali (decoding on the GPU where there is one), pil (the baseline) or synthetic")
    num_threads: int = setting(
        0, "decoder threads (DALI) or workers (PIL) per rank; 0 = CPU cores per local rank")
    synthetic_samples: int = setting(
        1_281_167, "backend synthetic: samples in the virtual train split (ImageNet-1k's count)")
    window_shards: int = setting(
        2, "DALI: shards per pipeline; a bucket's are fetched whole to TMPDIR, 2 windows at a time")


@dataclass
class OptimConfig:
    global_batch_size: int = setting(
        4096, "images per optimizer step, all ranks: local_batch_size x grad_accum_steps x ranks")
    local_batch_size: int = setting(
        0, "images per rank per forward pass; 0 = derived from the others")
    grad_accum_steps: int = setting(
        0, "forward passes per optimizer step; 0 = derived from the others")
    max_local_batch_size: int = setting(
        0, "most images per forward pass a GPU's memory holds (0 = no limit): bounds a derived one")
    blr: float = setting(1.5e-4, "base learning rate: lr = blr x global_batch_size / 256")
    lr: float = setting(0.0, "absolute peak learning rate; 0 = from blr")
    min_lr: float = setting(0.0, "floor of the cosine schedule")
    weight_decay: float = setting(
        0.05, "AdamW decoupled weight decay, not applied to 1-D parameters (norms) and biases")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas")
    warmup_epochs: float = setting(40.0, "linear warm-up from 0, in epochs")
    epochs: int = setting(1600, "length of the schedule in epochs")
    gradient_clipping: float = setting(
        0.0, "max global grad norm; 0 = off, as in the paper (DeepSpeed's own default is 1.0)")
    optimizer: Literal["adamw", "lars"] = setting(
        "adamw", "adamw (pre-training, fine-tuning) or lars (the linear probe: momentum 0.9, trust "
        "coefficient 0.001)")


@dataclass
class RuntimeConfig:
    zero_stage: Literal[0, 1, 2, 3] = setting(
        0, "DeepSpeed ZeRO stage 0-3 (0: replicated optimizer, fastest where the model fits)")
    precision: Literal["bf16", "autocast_bf16", "fp32"] = setting(
        "autocast_bf16", "bf16 (bf16 weights, fp32 master copies), autocast_bf16 (fp32 weights, "
        "bf16 matmuls) or fp32; no fp16 (NaNs)")
    attention: Literal["auto", "flash", "cudnn", "efficient", "math"] = setting(
        "auto", "scaled-dot-product attention backend; auto lets torch choose")
    compile: bool = setting(
        True, "torch.compile each transformer block for the training step (eager where it fails)")
    compile_backend: str = setting(
        "inductor", "torch.compile's backend: inductor (fused kernels); aot_eager traces the same "
        "graphs without generating code")
    reduce_bucket_mb: float = setting(
        25.0, "ZeRO stage 0: gradient MB per all-reduce bucket, each sent during the backward pass")
    deepspeed_config: str = setting(
        "", "a DeepSpeed JSON merged over the derived config (bucket sizes, overlap, monitors...)")
    seed: int = setting(0, "seeds model init and data order (fixed for a run)")
    hang_timeout_s: float = setting(
        1800.0, "seconds with no optimizer step before a rank reports a hang (x4 in slow phases)")


@dataclass
class CheckpointConfig:
    every_minutes: float = setting(30.0, "wall-clock minutes between checkpoints; 0 = off")
    every_steps: int = setting(0, "optimizer steps between checkpoints; 0 = off")
    keep_last: int = setting(3, "complete checkpoints to keep")
    at_end: bool = setting(True, "write a checkpoint when the run ends (benchmarks turn it off)")
    milestone_every_epochs: int = setting(
        0, "also checkpoint every N epochs and keep those apart from keep_last (0 = none)")
    on_spike: bool = setting(
        False, "also write a milestone checkpoint when a loss spike is detected")


@dataclass
class LogConfig:
    log_every: int = setting(
        50, "optimizer steps between metric reductions (the only host syncs of the loop)")
    peak_tflops: float = setting(
        0.0, "the accelerator's dense bf16 peak for MFU, TFLOP/s (0 = model.flops' table)")
    tensorboard: bool = setting(True,
        "write scalars and reconstructions for TensorBoard under OUTPUT/tb/ (when it is installed)")
    wandb_project: str = setting(
        "", "also log them to this Weights & Biases project (empty = off; WANDB_MODE=offline keeps "
        "them in OUTPUT/wandb/)")
    sample_ids: bool = setting(
        False, "append the key of every sample each rank reads to OUTPUT/samples/rank<r>.txt")
    straggler_margin: float = setting(
        0.25, "a rank whose own work in a window (forward, data wait) exceeds the median rank's by "
        "this fraction is slow")
    straggler_windows: int = setting(
        3, "logged windows in a row a rank must be the slow one before a warning names it")
    spike_loss_factor: float = setting(
        0.5, "a window's loss above (1 + this) x the median of the recent windows is a loss spike "
        "(0 = off)")
    spike_grad_factor: float = setting(
        10.0, "a window's gradient norm above this x the recent median is a spike too (0 = off)")
    spike_history: int = setting(
        10, "logged windows the spike detector compares with (and waits for before it judges)")
    profile_steps: int = setting(
        0, "profile this many optimizer steps (after 2 warm-up steps) into OUTPUT/profile.txt")


@dataclass
class EvalConfig:
    every_epochs: int = setting(
        20, "epochs between evaluations (k-NN in pre-training, top-1/top-5 in fine-tuning), plus "
        "one at the end; 0 = off")
    split: str = setting("val", "the held-out split")


@dataclass
class RunConfig:
    """What every task's run reads; each task's config adds its own fields (`PretrainConfig`,
    `FinetuneConfig`)."""

    TASK: ClassVar[str] = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: str = setting("runs/mae", "folder for checkpoints, metrics.jsonl, config.json and viz/")
    max_steps: int = setting(
        0, "stop after this many optimizer steps in total (0 = run the whole schedule)")

    def to_dict(self) -> dict[str, Any]:
        """Every field, the task the config is for and the format (what config_from_dict reads
        back)."""
        return stamp("config", {"task": self.TASK, **dataclasses.asdict(self)})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def checks(self) -> list[tuple[bool, str]]:
        """(holds, what to say otherwise) for the fields only this task has."""
        return []


def _coerce(value: Any, kind: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        coerced = _coerce(value, type(choices[0]), key)
        if coerced not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return coerced
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        args = typing.get_args(kind)
        if len(items) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(items, args, strict=True))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}") from None


def _set(cfg: RunConfig, dotted: str, value: Any) -> None:
    *path, name = dotted.split(".")
    target = cfg
    for part in path:
        if not dataclasses.is_dataclass(target) or part not in _names(target).split(", "):
            unknown = f"unknown config section {part!r} in {dotted!r}; sections: {_names(cfg)}"
            raise ConfigError(_other_task_hint(cfg, dotted) or unknown)
        target = getattr(target, part)
    fields = {f.name: f for f in dataclasses.fields(target)}
    if name not in fields or dataclasses.is_dataclass(getattr(target, name)):
        raise ConfigError(_other_task_hint(cfg, dotted)
                          or f"unknown config key {dotted!r}; keys here: {', '.join(fields)}")
    hints = typing.get_type_hints(type(target))
    setattr(target, name, _coerce(value, hints[name], dotted))


def _other_task_hint(cfg: RunConfig, dotted: str) -> str | None:
    """The line for a key that only another task's config has (model.mask_ratio given to
    fine-tuning)."""
    for name in BUILTIN_TASKS:
        other = builtin_task(name)
        if name != cfg.TASK and dotted in flat_fields(other.config_type()):
            mine = builtin_task(cfg.TASK)
            return (f"{dotted} is a setting of {other.name} ({other.script}); "
                    f"{mine.script if mine else f'task {cfg.TASK}'} has no such field")
    return None


def _names(cfg: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cfg))


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def find_preset(preset: str | Path) -> Path:
    """A preset file (or a run's config.json), or the name of one in the repository's configs/
    (wherever the command runs from)."""
    path = Path(preset)
    if not path.is_file() and (PRESET_DIR / f"{preset}.toml").is_file():
        path = PRESET_DIR / f"{preset}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml"))) or "none here"
        raise ConfigError(
            f"config preset {preset} not found: give a preset file or a name in configs/ ({known})"
        )
    return path


def load_config(preset: str | Path | None, overrides: list[str] = (),
                task: Any = None) -> RunConfig:
    """Defaults <- preset file (TOML) <- `key=value` overrides, then validated. `task`: the script's
    `Task`, whose config type it is and whose name a preset's own `task` line must give; None: the
    task the preset names (one of maeflow's, pre-training without a line)."""
    table: dict[str, Any] = {}
    declared = None
    if preset:
        path = find_preset(preset)
        try:  # a preset (TOML), or a run's config.json passed back (the same sections, as JSON)
            text = path.read_text()
            table = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: {err}") from None
        table.pop("format", None)  # a run's config.json: checked where a run's folder is read
        declared = table.pop("task", None)
        if task is not None and declared and declared != task.config_type.TASK:
            other = builtin_task(declared)
            what, where = (other.name, other.script) if other else (declared, "its own script")
            raise ConfigError(f"{path} is a {what} preset: run it with {where}, not {task.script}")
    if task is None:
        task = builtin_task(declared or "pretrain")
        if task is None:
            raise ConfigError(
                f"{preset}: task {declared!r} is none of maeflow's ({', '.join(BUILTIN_TASKS)}): "
                "run it with its own script"
            )
    cfg = task.config_type()
    for key, value in _flatten(table).items():
        _set(cfg, key, value)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        _set(cfg, key.strip(), value.strip())
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    model, data, optim, runtime, log, ckpt = (cfg.model, cfg.data, cfg.optim, cfg.runtime, cfg.log,
                                              cfg.checkpoint)
    patch = PRESETS.get(model.name, {}).get("patch_size", 1)
    checks = [
        (model.name in PRESETS, f"model.name {model.name!r} is not one of {', '.join(PRESETS)}"),
        (data.img_size % patch == 0,
         f"data.img_size {data.img_size} is not divisible by the patch size of {model.name}"),
        (optim.global_batch_size > 0, "optim.global_batch_size must be positive"),
        (min(optim.local_batch_size, optim.grad_accum_steps, optim.max_local_batch_size) >= 0,
         "optim.local_batch_size, grad_accum_steps and max_local_batch_size must be >= 0"),
        (optim.epochs > 0 and 0 <= optim.warmup_epochs < optim.epochs,
         "optim.warmup_epochs must be in [0, epochs)"),
        (optim.blr > 0 or optim.lr > 0, "set optim.blr or optim.lr"),
        (min(optim.blr, optim.lr, optim.min_lr, optim.weight_decay) >= 0,
         "optim.blr, optim.lr, optim.min_lr and optim.weight_decay must be >= 0"),
        (all(0 <= b < 1 for b in optim.betas), f"optim.betas must be in [0, 1), got {optim.betas}"),
        (data.img_size > 0, f"data.img_size must be positive, got {data.img_size}"),
        (data.synthetic_samples > 0, "data.synthetic_samples must be positive"),
        (data.window_shards >= 1, f"data.window_shards must be >= 1, got {data.window_shards}"),
        (data.num_threads >= 0,
         f"data.num_threads must be >= 0 (0 = the cores per local rank), got {data.num_threads}"),
        (ckpt.every_minutes >= 0 and ckpt.every_steps >= 0,
         "checkpoint.every_minutes and checkpoint.every_steps must be >= 0 (0 = off)"),
        (log.profile_steps >= 0, "log.profile_steps must be >= 0"),
        (log.peak_tflops >= 0, "log.peak_tflops must be >= 0 (0 = from the device's name)"),
        (runtime.reduce_bucket_mb > 0,
         f"runtime.reduce_bucket_mb must be positive, got {runtime.reduce_bucket_mb}"),
        (runtime.hang_timeout_s >= 0, "runtime.hang_timeout_s must be >= 0 (0 = no watchdog)"),
        (log.straggler_margin > 0 and log.straggler_windows >= 1,
         "log.straggler_margin must be positive and log.straggler_windows >= 1"),
        (min(log.spike_loss_factor, log.spike_grad_factor) >= 0 and log.spike_history >= 2,
         "log.spike_loss_factor and spike_grad_factor must be >= 0 and log.spike_history >= 2"),
        (optim.gradient_clipping >= 0, "optim.gradient_clipping must be >= 0"),
        (ckpt.keep_last >= 1, "checkpoint.keep_last must be >= 1"),
        (ckpt.milestone_every_epochs >= 0, "checkpoint.milestone_every_epochs must be >= 0"),
        (cfg.eval.every_epochs >= 0, "eval.every_epochs must be >= 0"),
        (log.log_every >= 1, "log.log_every must be >= 1"),
        (cfg.max_steps >= 0, "max_steps must be >= 0"),
        (not model.init or Path(model.init).exists(),
         f"model.init {model.init}: no such file or folder"),
        (not runtime.deepspeed_config or Path(runtime.deepspeed_config).is_file(),
         f"runtime.deepspeed_config {runtime.deepspeed_config}: no such file"),
        (not (runtime.compile and runtime.zero_stage == 3),
         "runtime.compile does not work with ZeRO-3 (its parameter gathering hooks break the "
         "graphs): set runtime.compile=false"),
        (not runtime.compile or runtime.compile_backend in compile_backends(),
         f"runtime.compile_backend {runtime.compile_backend!r} is not one of torch.compile's "
         f"backends: {', '.join(compile_backends())}"),
        *cfg.checks(),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def compile_backends() -> list[str]:
    """torch.compile's backends here, registered ones included (imports the compiler: call only with
    compile on)."""
    import torch._dynamo

    return torch._dynamo.list_backends(exclude_tags=())


def describe(cfg: Any, prefix: str = "") -> list[str]:
    """`key = value  # doc` lines for every field of a config."""
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe(value, f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name} = {value!r}  # {f.metadata.get('doc', '')}")
    return lines


def flat_fields(cfg: RunConfig) -> dict[str, Any]:
    """{"section.key": value} for every field."""
    return _flatten(dataclasses.asdict(cfg))


def config_from_dict(
    saved: dict[str, Any], config_type: type[RunConfig] | None = None
) -> RunConfig:
    """A resolved config as a run saved it (config.json, or the provenance of an exported file), as
    `config_type` (default: the type of the task it names, one of maeflow's). ConfigError when it is
    another task's."""
    check_format("config", saved, "a saved config")
    saved = {key: value for key, value in saved.items() if key != "format"}
    written_by = saved.pop("task")
    if config_type is None:
        task = builtin_task(written_by)
        if task is None:
            raise ConfigError(
                f"a config of task {written_by!r}, none of maeflow's ({', '.join(BUILTIN_TASKS)})"
            )
        config_type = task.config_type
    if written_by != config_type.TASK:
        raise ConfigError(f"a config of task {written_by!r}, not {config_type.TASK!r}")
    cfg = config_type()
    for key, value in _flatten(saved).items():
        _set(cfg, key, value)
    return cfg  # validated when the run started; files it named (model.init) may since have moved


def config_from_json(path: Path, config_type: type[RunConfig] | None = None) -> RunConfig:
    """The resolved config a run saved as config.json."""
    try:
        return config_from_dict(json.loads(Path(path).read_text()), config_type)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, FormatError) as err:
        raise ConfigError(f"{path} is not a config this maeflow saved ({err})") from None
