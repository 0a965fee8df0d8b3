"""Typed training configuration: a preset file from configs/ plus `--set section.key=value` overrides.

This module holds the config types and their parsing only: every field has a one-line docstring
(`describe()` prints them), and values are checked here, before any process starts distributed work,
so a typo costs one clear line rather than a cluster job. The defaults are the presets' choices.
What a config implies lives where it is used: the batch plan and lr in `train.recipe`, the model and
DeepSpeed's config in `train.engine`, what a resume may change in `train.resume`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from model import PRESETS, KernelChoice
from pipeline.loader_base import Backend

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad preset, override or combination of values."""


@dataclass
class ModelConfig:
    name: str = "mae_vit_huge_patch14"
    """model preset, one of model.PRESETS"""
    activation_recompute: bool = False
    """recompute encoder blocks in backward: less activation memory, ~30% more encoder compute"""
    init: str = ""
    """start from these weights: a train.export file, a released MAE .pth or (fine-tuning) a maeflow run folder"""


@dataclass
class MaeModelConfig(ModelConfig):
    norm_pix_loss: bool = True
    """regress per-patch normalized pixels (the paper's best setting)"""
    mask_ratio: float = 0.75
    """fraction of patches removed from each image"""


@dataclass
class DataConfig:
    shards: str = ""
    """shard folder (with train.json) or brace pattern; --data sets it"""
    img_size: int = 224
    """side of the square crops the loader delivers; the model is built for it (divisible by the patch)"""
    backend: Backend = "dali"
    """dali (GPU 'mixed' decoding, CPU without a GPU), pil (the baseline) or synthetic (random images, no data)"""
    num_threads: int = 0
    """decoder threads (DALI) or workers (PIL) per rank; 0 = CPU cores per local rank"""
    synthetic_samples: int = 1_281_167
    """backend synthetic: samples in the virtual train split (ImageNet-1k's count)"""


@dataclass
class MaeDataConfig(DataConfig):
    viz_split: str = "val"
    """split holding the fixed reconstruction images (falls back to train if absent)"""


@dataclass
class OptimConfig:
    global_batch_size: int = 4096
    """images per optimizer step, all ranks together: local_batch_size x grad_accum_steps x ranks"""
    local_batch_size: int = 0
    """images per rank per forward pass; 0 = derived from the others"""
    grad_accum_steps: int = 0
    """forward passes per optimizer step; 0 = derived from the others"""
    max_local_batch_size: int = 0
    """most images per forward pass that fit in a GPU's memory (0 = no limit); bounds a derived local batch"""
    blr: float = 1.5e-4
    """base learning rate: lr = blr x global_batch_size / 256"""
    lr: float = 0.0
    """absolute peak learning rate; 0 = from blr"""
    min_lr: float = 0.0
    """floor of the cosine schedule"""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay, not applied to 1-D parameters (norms) and biases"""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    warmup_epochs: float = 40.0
    """linear warm-up from 0, in epochs"""
    epochs: int = 1600
    """length of the schedule in epochs"""
    gradient_clipping: float = 0.0
    """max global grad norm; 0 = off, as in the paper (DeepSpeed's own default is 1.0)"""
    optimizer: Literal["adamw", "lars"] = "adamw"
    """adamw (pre-training, fine-tuning) or lars (the linear probe: momentum 0.9, trust coefficient 0.001)"""


@dataclass
class RuntimeConfig:
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage 0-3 (0: replicated optimizer, fastest where the model fits)"""
    precision: Literal["bf16", "autocast_bf16", "fp32"] = "autocast_bf16"
    """bf16 (bf16 weights, fp32 master copies), autocast_bf16 (fp32 weights, bf16 matmuls) or fp32; no fp16 (NaNs)"""
    attention: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    """scaled-dot-product attention backend; auto lets torch choose"""
    compile: bool = True
    """torch.compile each transformer block for the training step (the first step compiles; eager where it fails)"""
    compile_backend: str = "inductor"
    """torch.compile's backend: inductor (fused kernels); aot_eager traces the same graphs without generating code"""
    reduce_bucket_mb: float = 25.0
    """ZeRO stage 0 on several ranks: gradient MB per all-reduce bucket, each sent during the backward pass"""
    deepspeed_config: str = ""
    """a DeepSpeed JSON merged over the derived config (bucket sizes, overlap, monitors...)"""
    seed: int = 0
    """seeds model init and data order (fixed for a run)"""
    hang_timeout_s: float = 1800.0
    """seconds without an optimizer step before a rank reports a hang and exits (x4 in slow phases; 0 = off)"""


@dataclass
class MaeRuntimeConfig(RuntimeConfig):
    mask_seed: int = 0
    """seeds the masks; a --resume with another value draws other masks from there on (a loss-spike remedy)"""
    kernels: KernelChoice = "auto"
    """masking and loss: auto (Triton where it runs, checked at start), triton (insist) or torch (references)"""


@dataclass
class CheckpointConfig:
    every_minutes: float = 30.0
    """wall-clock minutes between checkpoints; 0 = off"""
    every_steps: int = 0
    """optimizer steps between checkpoints; 0 = off"""
    keep_last: int = 3
    """complete checkpoints to keep"""
    at_end: bool = True
    """write a checkpoint when the run ends (benchmarks turn it off)"""
    milestone_every_epochs: int = 0
    """also checkpoint every N epochs and keep those apart from keep_last (0 = none)"""
    on_spike: bool = False
    """also write a milestone checkpoint when a loss spike is detected"""


@dataclass
class LogConfig:
    log_every: int = 50
    """optimizer steps between metric reductions (the only host syncs of the loop)"""
    peak_tflops: float = 0.0
    """the accelerator's dense bf16 peak for MFU, TFLOP/s (0 = model.flops' table by the device's name)"""
    tensorboard: bool = True
    """write scalars and reconstructions for TensorBoard under OUTPUT/tb/ (when it is installed)"""
    wandb_project: str = ""
    """also log them to this Weights & Biases project (empty = off; WANDB_MODE=offline keeps them in OUTPUT/wandb/)"""
    sample_ids: bool = False
    """append the key of every sample each rank reads to OUTPUT/samples/rank<r>.txt (audits, loss spikes)"""
    straggler_margin: float = 0.25
    """a rank whose own work in a window (forward, data wait) exceeds the median rank's by this fraction is slow"""
    straggler_windows: int = 3
    """logged windows in a row a rank must be the slow one before a warning names it"""
    spike_loss_factor: float = 0.5
    """a window's loss above (1 + this) x the median of the recent windows is a loss spike (0 = off)"""
    spike_grad_factor: float = 10.0
    """a window's gradient norm above this x the recent median is a spike too (0 = off)"""
    spike_history: int = 10
    """logged windows the spike detector compares with (and waits for before it judges)"""
    profile_steps: int = 0
    """profile this many optimizer steps (after 2 warm-up steps) and write OUTPUT/profile.txt (0 = off)"""


@dataclass
class MaeLogConfig(LogConfig):
    viz_every: int = 20
    """epochs between reconstruction images (one is always written at the end)"""
    viz_images: int = 4
    """images in the reconstruction grid"""


@dataclass
class EvalConfig:
    every_epochs: int = 20
    """epochs between evaluations (k-NN in pre-training, top-1/top-5 in fine-tuning), plus one at the end; 0 = off"""
    split: str = "val"
    """the held-out split"""


@dataclass
class KnnConfig(EvalConfig):
    train_samples: int = 100_000
    """train-split samples embedded as the k-NN memory (0 = all)"""
    val_samples: int = 0
    """held-out samples classified (0 = all)"""
    k: int = 20
    """neighbours voting"""
    temperature: float = 0.07
    """votes are weighted exp(cosine similarity / temperature)"""


@dataclass
class ClassifierRecipe:
    """The [finetune] section (He et al. 2021, appendix A.2 and A.3)."""

    mode: Literal["finetune", "linear_probe"] = "finetune"
    """finetune (every weight trains, pooled patch tokens) or linear_probe (frozen encoder, class token, BN + head)"""
    num_classes: int = 0
    """classes of the head; 0 = the train split's classes (its manifest)"""
    layer_decay: float = 0.75
    """layer-wise lr decay: block i of d trains at lr x layer_decay^(d - i), the embeddings at ^(d + 1); 1 = off"""
    drop_path: float = 0.1
    """stochastic depth of the last block (rising linearly from 0 at the first)"""
    label_smoothing: float = 0.1
    """target mass spread evenly over all classes"""
    mixup_alpha: float = 0.8
    """mixup's Beta(alpha, alpha) mixing weight (0 = off)"""
    cutmix_alpha: float = 1.0
    """cutmix's Beta(alpha, alpha) kept area (0 = off)"""
    mix_switch_prob: float = 0.5
    """with mixup and cutmix on: the probability a batch uses cutmix"""
    rand_augment_layers: int = 2
    """RandAugment ops per image, each applied with probability 0.5 (0 = off)"""
    rand_augment_magnitude: int = 9
    """RandAugment level of every op, of 10"""
    erase_prob: float = 0.25
    """probability an image gets a random-erasing box of noise"""
    crop_min_scale: float = 0.08
    """smallest area fraction of the random resized crop"""


TASK_SCRIPTS = {"pretrain": "train/pretrain.py", "finetune": "train/finetune.py"}
TASK_NAMES = {"pretrain": "pre-training", "finetune": "fine-tuning"}


@dataclass
class RunConfig:
    """What every task's run reads; each task's config adds its own fields (`PretrainConfig`, `FinetuneConfig`)."""

    TASK: ClassVar[str] = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: str = "runs/mae"
    """folder for checkpoints, metrics.jsonl, config.json and viz/"""
    max_steps: int = 0
    """stop after this many optimizer steps in total (0 = run the whole schedule)"""

    def to_dict(self) -> dict[str, Any]:
        """Every field, and the task the config is for (what config_from_dict reads back)."""
        return {"task": self.TASK, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def checks(self) -> list[tuple[bool, str]]:
        """(holds, what to say otherwise) for the fields only this task has."""
        return []


@dataclass
class PretrainConfig(RunConfig):
    """MAE pre-training (train/pretrain.py)."""

    TASK: ClassVar[str] = "pretrain"
    model: MaeModelConfig = field(default_factory=MaeModelConfig)
    data: MaeDataConfig = field(default_factory=MaeDataConfig)
    runtime: MaeRuntimeConfig = field(default_factory=MaeRuntimeConfig)
    log: MaeLogConfig = field(default_factory=MaeLogConfig)
    eval: KnnConfig = field(default_factory=KnnConfig)

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (0 <= self.model.mask_ratio < 1, f"model.mask_ratio must be in [0, 1), got {self.model.mask_ratio}"),
            (self.log.viz_images >= 1, "log.viz_images must be >= 1"),
            (self.log.viz_every >= 1, "log.log_every and log.viz_every must be >= 1"),
            (min(self.eval.train_samples, self.eval.val_samples) >= 0 and self.eval.k >= 1
             and self.eval.temperature > 0, "eval.train_samples and eval.val_samples must be >= 0, eval.k >= 1 and "
                                            "eval.temperature > 0"),
        ]


@dataclass
class FinetuneConfig(RunConfig):
    """Fine-tuning and the linear probe (train/finetune.py)."""

    TASK: ClassVar[str] = "finetune"
    finetune: ClassifierRecipe = field(default_factory=ClassifierRecipe)

    def checks(self) -> list[tuple[bool, str]]:
        ft = self.finetune
        return [(ft.num_classes >= 0 and ft.layer_decay > 0 and 0 <= ft.drop_path < 1 and 0 <= ft.label_smoothing < 1
                 and min(ft.mixup_alpha, ft.cutmix_alpha) >= 0 and 0 <= ft.mix_switch_prob <= 1
                 and 0 <= ft.erase_prob <= 1 and ft.rand_augment_layers >= 0
                 and 0 <= ft.rand_augment_magnitude <= 10 and 0 < ft.crop_min_scale <= 1,
                 "finetune: num_classes >= 0, layer_decay > 0, drop_path and label_smoothing in [0, 1), mixup_alpha "
                 "and cutmix_alpha >= 0, mix_switch_prob and erase_prob in [0, 1], rand_augment_layers >= 0, "
                 "rand_augment_magnitude in [0, 10], crop_min_scale in (0, 1]")]


CONFIG_TYPES: dict[str, type[RunConfig]] = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}


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
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(_other_task_hint(cfg, dotted)
                              or f"unknown config section {part!r} in {dotted!r}; sections: {_names(cfg)}")
        target = getattr(target, part)
    fields = {f.name: f for f in dataclasses.fields(target)}
    if name not in fields or dataclasses.is_dataclass(getattr(target, name)):
        raise ConfigError(_other_task_hint(cfg, dotted)
                          or f"unknown config key {dotted!r}; keys here: {', '.join(fields)}")
    hints = typing.get_type_hints(type(target))
    setattr(target, name, _coerce(value, hints[name], dotted))


def _other_task_hint(cfg: RunConfig, dotted: str) -> str | None:
    """The line for a key that only another task's config has (model.mask_ratio given to fine-tuning)."""
    for task, kind in CONFIG_TYPES.items():
        if task != cfg.TASK and dotted in flat_fields(kind()):
            return (f"{dotted} is a setting of {TASK_NAMES[task]} ({TASK_SCRIPTS[task]}); "
                    f"{TASK_SCRIPTS[cfg.TASK]} has no such field")
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
    """A preset file (or a run's config.json), or the name of one in the repository's configs/ (wherever the
    command runs from)."""
    path = Path(preset)
    if not path.is_file() and (PRESET_DIR / f"{preset}.toml").is_file():
        path = PRESET_DIR / f"{preset}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml"))) or "none here"
        raise ConfigError(f"config preset {preset} not found: give a preset file or a name in configs/ ({known})")
    return path


def load_config(preset: str | Path | None, overrides: list[str] = (), task: str | None = None) -> RunConfig:
    """Defaults <- preset file (TOML) <- `key=value` overrides, then validated. `task` ("pretrain", "finetune"):
    the script's task, which a preset's own `task` key must name; None: the preset's (pre-training without one)."""
    table: dict[str, Any] = {}
    if preset:
        path = find_preset(preset)
        try:  # a preset (TOML), or a run's config.json passed back (the same sections, as JSON)
            table = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: {err}") from None
        declared = table.pop("task", None)
        if declared not in (None, *CONFIG_TYPES):
            raise ConfigError(f"{path}: task must be one of {', '.join(CONFIG_TYPES)}, got {declared!r}")
        if task and declared and declared != task:
            raise ConfigError(f"{path} is a {TASK_NAMES[declared]} preset: run it with {TASK_SCRIPTS[declared]}, "
                              f"not {TASK_SCRIPTS[task]}")
        task = task or declared
    cfg = CONFIG_TYPES[task or "pretrain"]()
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
    checks = [
        (cfg.model.name in PRESETS, f"model.name {cfg.model.name!r} is not one of {', '.join(PRESETS)}"),
        (cfg.data.img_size % PRESETS.get(cfg.model.name, {}).get("patch_size", 1) == 0,
         f"data.img_size {cfg.data.img_size} is not divisible by the patch size of {cfg.model.name}"),
        (cfg.optim.global_batch_size > 0, "optim.global_batch_size must be positive"),
        (min(cfg.optim.local_batch_size, cfg.optim.grad_accum_steps, cfg.optim.max_local_batch_size) >= 0,
         "optim.local_batch_size, optim.grad_accum_steps and optim.max_local_batch_size must be >= 0"),
        (cfg.optim.epochs > 0 and 0 <= cfg.optim.warmup_epochs < cfg.optim.epochs,
         "optim.warmup_epochs must be in [0, epochs)"),
        (cfg.optim.blr > 0 or cfg.optim.lr > 0, "set optim.blr or optim.lr"),
        (min(cfg.optim.blr, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay) >= 0,
         "optim.blr, optim.lr, optim.min_lr and optim.weight_decay must be >= 0"),
        (all(0 <= beta < 1 for beta in cfg.optim.betas), f"optim.betas must be in [0, 1), got {cfg.optim.betas}"),
        (cfg.data.img_size > 0, f"data.img_size must be positive, got {cfg.data.img_size}"),
        (cfg.data.synthetic_samples > 0, "data.synthetic_samples must be positive"),
        (cfg.data.num_threads >= 0, f"data.num_threads must be >= 0 (0 = the cores per local rank), got "
                                    f"{cfg.data.num_threads}"),
        (cfg.checkpoint.every_minutes >= 0 and cfg.checkpoint.every_steps >= 0,
         "checkpoint.every_minutes and checkpoint.every_steps must be >= 0 (0 = off)"),
        (cfg.log.profile_steps >= 0, "log.profile_steps must be >= 0"),
        (cfg.log.peak_tflops >= 0, "log.peak_tflops must be >= 0 (0 = from the device's name)"),
        (cfg.runtime.reduce_bucket_mb > 0, f"runtime.reduce_bucket_mb must be positive, got "
                                           f"{cfg.runtime.reduce_bucket_mb}"),
        (cfg.runtime.hang_timeout_s >= 0, "runtime.hang_timeout_s must be >= 0 (0 = no watchdog)"),
        (cfg.log.straggler_margin > 0 and cfg.log.straggler_windows >= 1,
         "log.straggler_margin must be positive and log.straggler_windows >= 1"),
        (min(cfg.log.spike_loss_factor, cfg.log.spike_grad_factor) >= 0 and cfg.log.spike_history >= 2,
         "log.spike_loss_factor and log.spike_grad_factor must be >= 0 and log.spike_history >= 2"),
        (cfg.optim.gradient_clipping >= 0, "optim.gradient_clipping must be >= 0"),
        (cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1"),
        (cfg.checkpoint.milestone_every_epochs >= 0, "checkpoint.milestone_every_epochs must be >= 0"),
        (cfg.eval.every_epochs >= 0, "eval.every_epochs must be >= 0"),
        (cfg.log.log_every >= 1, "log.log_every and log.viz_every must be >= 1"),
        (cfg.max_steps >= 0, "max_steps must be >= 0"),
        (not cfg.model.init or Path(cfg.model.init).exists(), f"model.init {cfg.model.init}: no such file or folder"),
        (not cfg.runtime.deepspeed_config or Path(cfg.runtime.deepspeed_config).is_file(),
         f"runtime.deepspeed_config {cfg.runtime.deepspeed_config}: no such file"),
        (not (cfg.runtime.compile and cfg.runtime.zero_stage == 3),
         "runtime.compile does not work with ZeRO-3 (its parameter gathering hooks break the graphs): set "
         "runtime.compile=false"),
        (not cfg.runtime.compile or cfg.runtime.compile_backend in compile_backends(),
         f"runtime.compile_backend {cfg.runtime.compile_backend!r} is not one of torch.compile's backends: "
         f"{', '.join(compile_backends())}"),
        *cfg.checks(),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def compile_backends() -> list[str]:
    """torch.compile's backends here, registered ones included (imports the compiler: call only with compile on)."""
    import torch._dynamo

    return torch._dynamo.list_backends(exclude_tags=())


def describe(cfg: Any, prefix: str = "") -> list[str]:
    """`key = value  # docstring` lines for every field of a config (the docs above, at run time)."""
    docs = _field_docs(type(cfg))
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe(value, f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name} = {value!r}  # {docs.get(f.name, '')}")
    return lines


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring, a subclass's own and those it inherits."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, after in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)):
                docs[node.target.id] = str(after.value.value)
    return docs


def flat_fields(cfg: RunConfig) -> dict[str, Any]:
    """{"section.key": value} for every field."""
    return _flatten(dataclasses.asdict(cfg))


def config_from_dict(saved: dict[str, Any], task: str | None = None) -> RunConfig:
    """A resolved config as a run saved it (config.json, or the provenance of an exported file). One written before
    configs named their task holds every task's fields: it is read as `task`'s (pre-training by default), and the
    fields that task has not are dropped."""
    saved = dict(saved)
    written_by = saved.pop("task", None)
    cfg = CONFIG_TYPES[written_by or task or "pretrain"]()
    known = flat_fields(cfg)
    for key, value in _flatten(saved).items():
        if written_by or key in known:
            _set(cfg, key, value)
    return cfg  # validated when the run started; files it named (model.init) may since have moved


def config_from_json(path: Path, task: str | None = None) -> RunConfig:
    """The resolved config a run saved as config.json (`task`: how to read one written before configs named it)."""
    try:
        return config_from_dict(json.loads(Path(path).read_text()), task)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ConfigError(f"{path} is not a saved maeflow config ({err})") from None
