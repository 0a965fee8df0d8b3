"""MAE pre-training with DeepSpeed ZeRO.

    deepspeed --num_gpus 8 train/pretrain.py --config configs/vit_h14_1600ep.toml --data /data/shards \
        --output runs/vit_h [--max-steps N] [--log-every K] [--resume] [--set optim.local_batch_size=64 ...]

One step: DALI batch -> MAE forward (fused Triton masking and loss) -> engine.backward/step, with
the learning rate set from `step / steps_per_epoch` (progress in epochs) before every optimizer step. The loop
never waits on the GPU except every `log_every` steps, when losses are reduced across ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from enum import IntEnum
from pathlib import Path
from typing import TextIO, TypeVar

if __package__ in (None, ""):  # run as a script by a launcher: import from the repo, not from train/ itself,
    # whose module names (distributed, evaluate) would shadow packages of the same names.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from model import load_reference_weights
from model.flops import mae_train_flops, peak_flops
from pipeline import build_loader
from pipeline.atomic import atomic_write_text
from pipeline.augment import PRETRAIN
from pipeline.loader import sample_counts
from train.cadence import CheckpointCadence, EveryEpochs, EverySteps
from train.checkpoint import (
    ResumeError,
    TrainState,
    check_shared_folder,
    describe_norms,
    latest_tag,
    load_checkpoint,
    optimizer_state_norms,
    resume_tag,
    save_checkpoint,
)
from train.config import ConfigError, TrainConfig, describe, load_config
from train.dashboard import Board
from train.distributed import JoinError, join_process_group
from train.engine import attention_backend, build_model, compile_blocks, deepspeed_config
from train.health import HUNG_EXIT_STATUS, SLOW_PHASE_FACTOR, RankTimes, SpikeDetector, Watchdog, dump_stacks_on
from train.knn import KnnMonitor
from train.profiling import step_profiler, write_profile
from train.recipe import build_optimizer, lr_at, optimizer_steps_per_epoch, peak_lr, plan_batch
from train.resume import ResumePlan, plan_resume
from train.run_folder import FolderInUse, existing_run, lock_folder
from train.viz import fixed_images, fixed_noise, reconstruction_grid, save_reconstruction

T = TypeVar("T")


class RunEnd(IntEnum):
    """How a run ends; the value is the exit status every rank returns (README, "Exit codes").
    A Python traceback (status 1) is a bug in maeflow; train/slurm.sbatch requeues STOPPED."""

    FINISHED = 0  # the schedule or --max-steps is done
    REFUSED = 2  # a bad argument, config, data path or checkpoint: nothing was trained, the folder is unchanged
    STOPPED = 3  # a signal stopped the run after a checkpoint: resume it
    DIVERGED = 4  # a non-finite loss; the last good checkpoint is intact
    FAILED = 5  # an error while training (damaged data, a full disk, a lost rank): fix what it names, then resume
    HUNG = HUNG_EXIT_STATUS  # 6: the watchdog saw no progress (stacks in OUTPUT/hangs/): resume it


class StopRequest:
    """Set by SIGTERM/SIGINT; the loop finishes its step, checkpoints and ends with RunEnd.STOPPED."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal_name = signal.Signals(signum).name


class MetricWindow:
    """Device-side sums between log steps, so the loop itself never synchronizes."""

    NO_BAD_STEP = 2**62

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.first_bad_step = torch.full((), self.NO_BAD_STEP, device=device, dtype=torch.int64)
        self.grad_norm: torch.Tensor | None = None  # where maeflow computes it: at the last scheduled log step
        self.forward_passes = 0
        self.steps = 0
        self.started = time.perf_counter()
        self.wait_at_start = 0.0

    def add(self, loss: torch.Tensor, step: int) -> None:
        self.loss_sum += loss.detach().double()
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step = torch.where(bad, torch.clamp(self.first_bad_step, max=step), self.first_bad_step)
        self.forward_passes += 1

    def reduce(self) -> tuple[float, int | None]:
        """(mean loss over all ranks, first non-finite step or None). A host sync and two all-reduces."""
        loss = self.loss_sum.clone()
        bad = self.first_bad_step.clone()
        dist.all_reduce(loss)
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        mean = loss.item() / max(1, self.forward_passes * dist.get_world_size())
        bad_step = int(bad.item())
        return mean, None if bad_step == self.NO_BAD_STEP else bad_step

    def restart(self, loader_wait_s: float) -> None:
        self.loss_sum.zero_()
        self.grad_norm = None
        self.forward_passes = self.steps = 0
        self.started = time.perf_counter()
        self.wait_at_start = loader_wait_s


# What refuses a run before it trains: every rank raises it, and main() answers RunEnd.REFUSED.
REFUSALS = (ConfigError, ResumeError, JoinError, FolderInUse, FileNotFoundError, ValueError)


class Trainer:
    """One run: set-up, the epoch loop, logging, checkpoints. Every rank builds one.

    Set-up order: join the group; take the output folder; check the resume (reading only); only then change
    the folder; then build the model, the loader and the engine, and load the checkpoint.
    """

    def __init__(self, cfg: TrainConfig, resume: str | None) -> None:
        deepspeed.utils.logger.setLevel(logging.WARNING)
        # Collectives time out after the longest a healthy rank may be silent; the watchdog reports sooner.
        collective_timeout_s = cfg.runtime.hang_timeout_s * (SLOW_PHASE_FACTOR + 1)
        self.device = join_process_group(collective_timeout_s)
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        # CPU side-channel for votes and per-rank figures: no GPU sync.
        self.control = dist.new_group(backend="gloo", **({"timeout": timedelta(seconds=collective_timeout_s)}
                                                         if collective_timeout_s else {}))
        self.output = Path(cfg.output)
        self.state = TrainState(world_size=self.world)
        self.watchdog = Watchdog(cfg.runtime.hang_timeout_s, self.output, self.rank, lambda: self.state.step)
        self.peers = self._gather_peers()
        self.ckpt_dir = self.output / "checkpoints"
        self.folder_lock = self.on_every_rank(lambda: lock_folder(self.output) if self.is_main else None)
        check_shared_folder(self.output, self.control)
        self.plan = plan_batch(cfg.optim, self.world)
        train_samples = sum(sample_counts(cfg.data.shards, "train", cfg.data.backend, cfg.data.synthetic_samples))
        self.steps_per_epoch = optimizer_steps_per_epoch(train_samples, self.plan)
        self.peak_lr = peak_lr(cfg.optim, self.plan.global_batch_size)
        self.resume = self.on_every_rank(lambda: plan_resume(self.output, resume, cfg, self.world)) if resume else None
        self.ds_config = deepspeed_config(cfg, self.plan)
        if self.resume and self.resume.universal:
            self.ds_config["checkpoint"] = {**self.ds_config.get("checkpoint", {}), "load_universal": True}
        self._prepare_folder()

        torch.manual_seed(cfg.runtime.seed)  # identical initial weights on every rank
        self.model = self.build_model(initialise=not (self.resume and self.resume.tag))
        # bf16 weights take bf16 images; under autocast the images stay fp32, as in the reference code.
        self.dtype = torch.bfloat16 if cfg.runtime.precision == "bf16" else torch.float32
        self.loader = build_loader(
            cfg.data.shards, split="train", local_batch_size=self.plan.local_batch_size, img_size=cfg.data.img_size,
            train=True, rank=self.rank, world_size=self.world, seed=cfg.runtime.seed,
            device=self.loader_device, backend=cfg.data.backend,
            num_threads=cfg.data.num_threads or None, dtype=self.dtype, synthetic_samples=cfg.data.synthetic_samples,
            augment=self.augmentation, verbose=self.is_main)
        if cfg.runtime.compile:
            compile_blocks(self.model)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.build_optimizer(), config=self.ds_config)
        # ZeRO stage 0 with a torch optimizer DeepSpeed only wraps (not its bf16 master copies): every rank holds
        # the whole optimizer state and the whole gradients, and DeepSpeed computes no gradient norm.
        self.replicated = cfg.runtime.zero_stage == 0 and cfg.runtime.precision != "bf16"
        # Mask noise has its own generator so that resuming restores exactly the masks to come.
        self.noise_gen = torch.Generator(device=self.device).manual_seed(self._noise_seed(step=0))
        self.saved_step = self.evaluated_step = -1
        if self.resume and self.resume.tag:
            self._load(self.resume)

        self.first_step = self.state.step
        total_steps = self.steps_per_epoch * cfg.optim.epochs
        self.stop_at = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
        self.logging = EverySteps(cfg.log.log_every)
        self.checkpoints = CheckpointCadence(cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes)
        self.milestones = EveryEpochs(cfg.checkpoint.milestone_every_epochs)
        self.evaluations = EveryEpochs(cfg.eval.every_epochs)
        self.reconstructions = EveryEpochs(cfg.log.viz_every)
        self.flops_per_image = self.train_flops_per_image()
        self.peak_flops = peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        self.sample_log = self._open_sample_log() if cfg.log.sample_ids else None
        self.board = Board(self.output / "tb", cfg.log.tensorboard and self.is_main)
        self.synthetic = cfg.data.backend == "synthetic"
        self.knn = self._knn_monitor() if cfg.eval.every_epochs and not self.synthetic else None
        self.lr = 0.0  # the schedule's lr of the current step (each group trains at it x its lr_scale)
        self.stop = StopRequest()
        self.stack_file = dump_stacks_on(signal.SIGUSR1, self.output, self.rank)
        self.rank_times = RankTimes(self.device, self.control, [host for host, _ in self.peers],
                                    cfg.log.straggler_margin, cfg.log.straggler_windows)
        self.spikes = SpikeDetector(cfg.log.spike_loss_factor, cfg.log.spike_grad_factor, cfg.log.spike_history)
        self.window = MetricWindow(self.device)
        self.profiler = None
        if cfg.log.profile_steps:
            write = write_profile(self.output) if self.is_main else lambda table: None
            self.profiler = step_profiler(cfg.log.profile_steps, self.device, write)
            self.profiler.start()
        # A terminal gets a progress bar; a log file (SLURM's) a plain line per logged window instead.
        self.plain_lines = self.is_main and not sys.stderr.isatty()
        self.bar = tqdm(total=self.stop_at, initial=self.state.step, unit="step", dynamic_ncols=True,
                        disable=not self.is_main or self.plain_lines)

    # ---------------------------------------------------------------- what pre-training and fine-tuning differ in

    augmentation = PRETRAIN  # what the training loader does to each image
    makes_reconstructions = True

    def build_model(self, initialise: bool) -> torch.nn.Module:
        """The model to train; `initialise`: load model.init (not when a checkpoint will be loaded)."""
        model = build_model(self.cfg)
        init = self.cfg.model.init
        if init and initialise:
            if Path(init).is_dir():
                raise ConfigError(f"model.init {init} is a folder: pre-training starts from a weight file (write "
                                  "one from a run with `python -m train.export`)")
            self.say(f"initialised from {init}: {load_reference_weights(model, init)}")
        return model

    def build_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model, self.cfg.optim, self.peak_lr)

    def train_flops_per_image(self) -> int:
        return mae_train_flops(self.model, self.cfg.model.mask_ratio)

    @property
    def loader_device(self) -> str:
        """Where this rank's loaders decode and deliver: "gpu" (DALI's mixed decoding) on a CUDA rank, else "cpu"."""
        return "gpu" if self.device.type == "cuda" else "cpu"

    @property
    def evaluates(self) -> bool:
        """Whether the run evaluates the model at its evaluation epochs and at its end."""
        return self.knn is not None

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, batch: int) -> torch.Tensor:
        """The loss of one local batch (`batch` of the epoch): MAE's, on masks from the run's own noise."""
        noise = torch.rand(images.shape[0], self.model.num_patches, device=self.device, generator=self.noise_gen)
        loss, _, _ = self.engine(images, mask_ratio=self.cfg.model.mask_ratio, noise=noise)
        return loss

    # ---------------------------------------------------------------- set-up

    def on_every_rank(self, work: Callable[[], T]) -> T:
        """`work` on every rank; if it is refused on any rank, it is refused on all (no rank left at a barrier)."""
        try:
            result, error = work(), None
        except REFUSALS as err:
            result, error = None, err
        errors: list[str | None] = [None] * self.world
        dist.all_gather_object(errors, None if error is None else str(error), group=self.control)
        if error is not None:
            raise error
        failed = next(((rank, message) for rank, message in enumerate(errors) if message), None)
        if failed:
            raise ResumeError(f"rank {failed[0]}: {failed[1]}")
        return result

    def _gather_peers(self) -> list[tuple[str, int]]:
        """(host, pid) of every rank, to name the one a failed collective lost."""
        peers: list[tuple[str, int]] = [("", 0)] * self.world
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()), group=self.control)
        return peers

    def lost_peers(self) -> str:
        """Which ranks are gone, as far as this host can tell (a process on another host cannot be asked)."""
        here = socket.gethostname()
        gone, elsewhere = [], []
        for rank, (host, pid) in enumerate(self.peers):
            if rank == self.rank:
                continue
            if host != here:
                elsewhere.append(f"{rank} ({host})")
            elif not _alive(pid):
                gone.append(f"rank {rank} (host {host}, pid {pid}) is no longer running")
        if gone:
            return "; ".join(gone)
        return f"lost contact with a peer: ranks on other hosts: {', '.join(elsewhere)}" if elsewhere else ""

    def _prepare_folder(self) -> None:
        """Rank 0, once every check passed: apply the resume's changes to the folder, write the configs."""
        if self.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            for line in self.resume.apply() if self.resume else []:
                print(line)
            print("\n".join(["resolved config:", *("  " + line for line in describe(self.cfg))]))
            plan = self.plan
            print(f"batch: {plan.global_batch_size} = {plan.local_batch_size} local x {plan.grad_accum_steps} "
                  f"accumulation x {self.world} ranks ({plan.note}); peak lr {self.peak_lr:.3g}")
            atomic_write_text(self.output / "config.json", self.cfg.to_json())
            atomic_write_text(self.output / "deepspeed_config.json", json.dumps(self.ds_config, indent=1))
        dist.barrier()

    def _knn_monitor(self) -> KnnMonitor | None:
        cfg = self.cfg
        try:
            return KnnMonitor(cfg.data.shards, cfg.eval.split, cfg.eval.train_samples, cfg.eval.val_samples,
                              local_batch_size=self.plan.local_batch_size, img_size=cfg.data.img_size,
                              rank=self.rank, world_size=self.world,
                              device=self.loader_device, backend=cfg.data.backend,
                              num_threads=cfg.data.num_threads or None, dtype=self.dtype)
        except (FileNotFoundError, ValueError) as err:  # no held-out split, or one labelled with other classes
            self.say(f"k-NN evaluation off: {str(err).splitlines()[0]}")
            return None

    def _open_sample_log(self) -> TextIO:
        """OUTPUT/samples/rank<r>.txt: one line per local batch, `<optimizer step> <sample keys...>`."""
        folder = self.output / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        return open(folder / f"rank{self.rank:05d}.txt", "a")

    def _noise_seed(self, step: int) -> int:
        """Seeds a rank's mask noise: a fresh run's, or one that continues on other ranks or other masks."""
        return hash((self.cfg.runtime.seed, self.cfg.runtime.mask_seed, self.rank, step)) % (2**63)

    def _load(self, plan: ResumePlan) -> None:
        began = time.perf_counter()
        rank_state = load_checkpoint(self.engine, self.ckpt_dir, plan.tag, plan.universal,
                                     self.cfg.optim.gradient_clipping)
        saved = plan.saved
        self.state = TrainState(saved.step, saved.epoch, saved.samples, self.world)
        self.saved_step = self.state.step
        self.loader.load_state_dict(rank_state["loader"])
        if rank_state["noise_rng"] is not None and not plan.masks_change:
            self.noise_gen.set_state(rank_state["noise_rng"])
        else:  # another rank count or another mask seed: masks drawn afresh from here
            self.noise_gen.manual_seed(self._noise_seed(self.state.step))
        norms = optimizer_state_norms(self.engine, self.replicated, self.control)
        self.note({"step": self.state.step, "event": "resumed", "from": plan.tag, "world_size": self.world,
                   "saved_world_size": saved.world_size, "universal": plan.universal, "adamw_norms": list(norms)})
        how = f"on {self.world} rank{'s' if self.world > 1 else ''}"
        if saved.world_size != self.world:
            how += f" instead of {saved.world_size}"
        if plan.universal:
            how += f", through DeepSpeed's universal checkpoint ({time.perf_counter() - began:.1f} s)"
        self.say(f"resumed from {plan.tag} {how}: step {self.state.step}, epoch {self.state.epoch}, "
                 f"{self.state.samples} samples seen; {describe_norms(norms)}")

    # ---------------------------------------------------------------- the loop

    def fit(self) -> RunEnd:
        """Train to `stop_at` steps, to a stop signal, or until the loss is not finite; closes everything on
        every path out."""
        try:
            end = self._train()
            self._finish(end)
            return end
        finally:
            self.close()

    def _train(self) -> RunEnd:
        self.window.restart(self.loader.wait_s)
        while self.state.step < self.stop_at:
            self.loader.set_epoch(self.state.epoch)
            end = self.run_epoch()
            if end is not None:
                return end
            self.state.epoch += 1
            if self.milestones.due(self.state.epoch):
                self.checkpoint(milestone=True)
            if self.evaluates and self.evaluations.due(self.state.epoch):
                self.evaluate()
            if self.makes_reconstructions and self.reconstructions.due(self.state.epoch):
                self.write_reconstruction()
        return RunEnd.FINISHED

    def run_epoch(self) -> RunEnd | None:
        """None when the epoch is done, else how the run ends."""
        accum = self.plan.grad_accum_steps
        usable = len(self.loader) // accum * accum  # batches that fill whole optimizer steps
        for images, labels in self.loader:
            batch = self.loader.position.batch - 1
            if batch >= usable:
                break  # trailing local batches that cannot fill an optimizer step
            if batch % accum == 0:
                self.set_lr()
            if self.sample_log is not None:
                self.sample_log.write(f"{self.state.step + 1} {' '.join(self.loader.batch_keys(batch))}\n")
            with attention_backend(self.cfg.runtime.attention), self.rank_times.forward():
                loss = self.training_loss(images, labels, batch)
            self.engine.backward(loss)
            boundary = (batch + 1) % accum == 0
            if boundary and self.replicated and self.logging.due(self.state.step + 1):
                self.window.grad_norm = total_grad_norm(self.model)  # on the device: read at the log
            self.engine.step()
            self.window.add(loss, self.state.step + 1)
            if boundary and (end := self.after_optimizer_step()) is not None:
                return end
        return None

    def set_lr(self) -> None:
        # Progress counted in steps, so that an epoch finished on another rank count (a resume on a new
        # allocation) continues the schedule where it was.
        self.lr = lr_at(self.state.step / self.steps_per_epoch, self.peak_lr, self.cfg.optim)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)

    def after_optimizer_step(self) -> RunEnd | None:
        """Count the step; every rank votes on stopping and checkpointing; log, checkpoint when due."""
        state = self.state
        state.step += 1
        state.samples += self.plan.global_batch_size
        self.watchdog.beat()
        if self.profiler is not None:
            self.profiler.step()
        self.window.steps += 1
        self.bar.update(1)
        votes = torch.tensor([self.stop.signal_name is not None, self.checkpoints.due(state.step)], dtype=torch.int32)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.control)
        stopping, checkpoint_due = bool(votes[0]), bool(votes[1])
        finished = state.step >= self.stop_at
        if self.logging.due(state.step) or checkpoint_due or stopping or finished:
            loss, bad_step = self.window.reduce()
            if bad_step is not None:
                self.say(f"non-finite loss at step {bad_step}: stopping. The last good checkpoint "
                         f"({latest_tag(self.ckpt_dir) or 'none written yet'}) is left intact.")
                return RunEnd.DIVERGED
            spike = self.log(loss)
            if spike and self.cfg.checkpoint.on_spike:
                self.checkpoint(milestone=True)
        if (checkpoint_due or stopping) and self.saved_step != state.step:
            self.checkpoint()
        if stopping:
            self.say(f"stopped by {self.stop.signal_name or 'a signal on another rank'} after step {state.step}; "
                     "resume with --resume")
            return RunEnd.STOPPED
        return RunEnd.FINISHED if finished else None

    def _finish(self, end: RunEnd) -> None:
        """The end of a run that did not diverge: its last checkpoint, reconstruction and evaluation."""
        self.bar.close()
        if self.state.step == self.first_step:
            self.say(f"nothing to train: the run is at step {self.state.step}, its end is step {self.stop_at}")
        elif end is not RunEnd.DIVERGED:
            if self.saved_step != self.state.step and (self.cfg.checkpoint.at_end or end is RunEnd.STOPPED):
                self.checkpoint()
            if self.makes_reconstructions:
                self.write_reconstruction()
            if self.evaluates and end is RunEnd.FINISHED and self.evaluated_step != self.state.step:
                self.evaluate()
        self.say(f"{end.name.lower()}: step {self.state.step} of {self.stop_at}, epoch {self.state.epoch}, "
                 f"{self.state.samples} samples; outputs in {self.output}")

    def close(self) -> None:
        self.watchdog.close()
        if self.profiler is not None:
            self.profiler.stop()
        self.bar.close()
        if self.sample_log is not None:
            self.sample_log.close()
        self.board.close()
        faulthandler.unregister(signal.SIGUSR1)
        self.stack_file.close()
        leave_process_group()
        if self.folder_lock is not None:
            self.folder_lock.close()

    # ---------------------------------------------------------------- what the loop records

    def say(self, line: str) -> None:
        """Rank 0 prints a line without breaking the progress bar."""
        if self.is_main:
            tqdm.write(line)

    def log(self, loss: float) -> bool:
        """Collective: the window's record (every rank's figures gathered); True when the loss spiked."""
        window = self.window
        elapsed = time.perf_counter() - window.started
        img_per_s = window.steps * self.plan.global_batch_size / elapsed
        grad_norm = window.grad_norm if self.replicated else self.engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        ranks, straggler = self.rank_times.gather(self.loader.wait_s - window.wait_at_start)
        record = {
            "step": self.state.step, "epoch": self.state.epoch, "samples": self.state.samples, "loss": loss,
            "lr": self.lr,
            "grad_norm": grad_norm,
            "img_per_s": img_per_s, "data_stall_pct": 100 * (self.loader.wait_s - window.wait_at_start) / elapsed,
            "mfu": None if self.peak_flops is None else self.flops_per_image * img_per_s / self.peak_flops / self.world,
            "step_time_s": elapsed / window.steps, **ranks,
        }
        self.record(record)
        if self.plain_lines:
            print(f"step {self.state.step}/{self.stop_at} epoch {self.state.epoch} loss {loss:.4f} "
                  f"{img_per_s:.0f} img/s", flush=True)
        elif self.is_main:
            self.bar.set_postfix(epoch=self.state.epoch, loss=f"{loss:.4f}", img_s=f"{img_per_s:.0f}")
        if straggler:
            self.say(straggler)
        spike = self.spikes.check(loss, grad_norm)
        if spike:
            last = latest_tag(self.ckpt_dir) or "none yet"
            self.note({"step": self.state.step, "event": "loss_spike", **spike, "last_checkpoint": last})
            self.say(f"loss spike at step {self.state.step}: {spike['cause']} {loss:.4f} against a recent median of "
                     f"{spike['median_loss']:.4f}; the last checkpoint before it is {last}")
        window.restart(self.loader.wait_s)
        return spike is not None

    def record(self, record: dict) -> None:
        """Rank 0 appends a record to metrics.jsonl and its numbers to TensorBoard."""
        self.note(record)
        if self.is_main:
            self.board.scalars(record, record["step"])

    def note(self, record: dict) -> None:
        """Rank 0 appends a record to metrics.jsonl only (events: resumes, checkpoints)."""
        if self.is_main:
            with open(self.output / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(self) -> None:
        """Every rank embeds its share; rank 0 records the k-NN top-1 of both feature kinds."""
        with self.watchdog.slow_phase("k-NN evaluation"):
            self._evaluate()

    def _evaluate(self) -> None:
        began, cfg = time.perf_counter(), self.cfg
        # ZeRO-3 holds a slice of each parameter per rank: gather them for the evaluation forward.
        gathered = deepspeed.zero.GatheredParameters(list(self.model.parameters()), enabled=cfg.runtime.zero_stage == 3)
        autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=cfg.runtime.precision == "autocast_bf16")

        def encode(images: torch.Tensor) -> torch.Tensor:
            with autocast, attention_backend(cfg.runtime.attention):
                return self.model.forward_features(images.to(self.dtype))

        with gathered, torch.no_grad():
            result = self.knn(encode, self.device, cfg.eval.k, cfg.eval.temperature)
        self.evaluated_step = self.state.step
        self.record({"step": self.state.step, "epoch": self.state.epoch, **result,
                     "eval_s": time.perf_counter() - began})
        self.say(f"k-NN top-1 at step {self.state.step}: {100 * result['knn_top1_cls']:.1f}% (cls token), "
                 f"{100 * result['knn_top1_patch_mean']:.1f}% (mean patch token); {result['knn_train_samples']} "
                 f"train / {result['knn_val_samples']} {cfg.eval.split} samples")

    def checkpoint(self, milestone: bool = False) -> None:
        with self.watchdog.slow_phase("a checkpoint"):
            self._checkpoint(milestone)

    def _checkpoint(self, milestone: bool) -> None:
        rank_state = {"loader": self.loader.state_dict(), "noise_rng": self.noise_gen.get_state()}
        if self.sample_log is not None:
            self.sample_log.flush()
        norms = optimizer_state_norms(self.engine, self.replicated, self.control)
        tag = save_checkpoint(self.engine, self.ckpt_dir, self.state, rank_state, self.cfg.checkpoint.keep_last,
                              norms, milestone)
        self.checkpoints.saved()
        self.saved_step = self.state.step
        self.say(f"{'milestone ' if milestone else ''}checkpoint {self.ckpt_dir / tag}; {describe_norms(norms)}")

    def write_reconstruction(self) -> None:
        """Every rank runs the forward (ZeRO-3 gathers weights collectively); rank 0 writes the PNG."""
        with self.watchdog.slow_phase("a reconstruction"):
            self._write_reconstruction()

    def _write_reconstruction(self) -> None:
        cfg = self.cfg
        images = fixed_images(cfg.data.shards, cfg.data.viz_split, cfg.log.viz_images, cfg.data.img_size,
                              self.device, synthetic=self.synthetic)
        noise = fixed_noise(images.shape[0], self.model.num_patches, self.device)
        self.engine.eval()
        with torch.no_grad():
            loss, pred, mask = self.engine(images.to(self.dtype), mask_ratio=cfg.model.mask_ratio, noise=noise)
        self.engine.train()
        if self.is_main:
            picture = reconstruction_grid(self.model, images, pred, mask)
            path = save_reconstruction(picture, self.output / "viz", self.state.step)
            with open(self.output / "viz" / "losses.jsonl", "a") as f:
                f.write(json.dumps({"step": self.state.step, "loss": float(loss), "image": path.name}) + "\n")
            self.board.image("reconstruction", picture, self.state.step)
            self.say(f"reconstruction {path} (loss {float(loss):.4f} on the fixed images)")


def leave_process_group() -> None:
    """Tear the process group down before the interpreter does: left to exit-time destructors, a group can abort
    the process ("terminate called without an active exception") and turn a refusal's status into a crash's."""
    if dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # after a lost peer the group may refuse; the process ends anyway
            dist.destroy_process_group()


def _alive(pid: int) -> bool:
    """Whether process `pid` on this host still runs (a zombie, dead but not yet reaped by its launcher, does not)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or the pid now belongs to someone else's process
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc here: the signal check is all there is
        return True


def total_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The global L2 norm of the gradients every rank holds in full (ZeRO stage 0, after the all-reduce)."""
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def print_plan(cfg: TrainConfig, ranks: int) -> None:
    """--print-config: what a run of `cfg` on `ranks` ranks would do, checked as far as it can be without them."""
    if ranks < 1:
        raise ConfigError(f"--ranks must be at least 1, got {ranks}")
    plan = plan_batch(cfg.optim, ranks)
    lines = [*describe(cfg), "",
             f"batch on {ranks} ranks: {plan.global_batch_size} = {plan.local_batch_size} local x "
             f"{plan.grad_accum_steps} accumulation x {ranks} ranks ({plan.note})",
             f"peak lr: {peak_lr(cfg.optim, plan.global_batch_size):.4g}"]
    if cfg.data.shards or cfg.data.backend == "synthetic":
        samples = sum(sample_counts(cfg.data.shards, "train", cfg.data.backend, cfg.data.synthetic_samples))
        steps = optimizer_steps_per_epoch(samples, plan)
        where = "synthetic images" if cfg.data.backend == "synthetic" else cfg.data.shards
        lines.append(f"data: {samples} training samples ({where}): {steps} optimizer steps per epoch")
    lines += ["deepspeed config:", json.dumps(deepspeed_config(cfg, plan), indent=1)]
    print("\n".join(lines))


def parse_args(argv: list[str] | None, description: str = "MAE pre-training with DeepSpeed ZeRO") -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="preset file, or a name in configs/ (e.g. vit_h14_1600ep)")
    parser.add_argument("--data", help="shard folder or brace pattern (sets data.shards)")
    parser.add_argument("--output", help="output folder (sets output)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    parser.add_argument("--log-every", type=int, help="steps between metric reductions (sets log.log_every)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="TAG",
                        help="continue from the newest checkpoint in the output, or from TAG (e.g. step00001200 or "
                             "1200; what the run did after it is set aside in OUTPUT/abandoned/), on any number of "
                             "ranks")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--print-config", action="store_true",
                        help="dry run: print every config field with its doc, the batch plan for --ranks, the lr and "
                             "the DeepSpeed config, check --data, and exit")
    parser.add_argument("--ranks", type=int, help="with --print-config: the number of ranks to plan for (default: "
                                                  "WORLD_SIZE, or 1)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, trainer_class: type[Trainer] = Trainer,
         description: str = "MAE pre-training with DeepSpeed ZeRO") -> int:
    """Exit status: a RunEnd (README, "Exit codes"). Fine-tuning runs the same main with its own trainer."""
    args = parse_args(argv, description)
    overrides = list(args.set)
    for flag, key in ((args.data, "data.shards"), (args.output, "output"), (args.max_steps, "max_steps"),
                      (args.log_every, "log.log_every")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print_plan(cfg, args.ranks if args.ranks is not None else int(os.environ.get("WORLD_SIZE", "1")))
            return RunEnd.FINISHED
        if not cfg.data.shards and cfg.data.backend != "synthetic":
            raise ConfigError("no training data: pass --data SHARDS, set data.shards, or train on synthetic images "
                              "with --set data.backend=synthetic")
        sample_counts(cfg.data.shards, "train", cfg.data.backend)  # the shards are there and whole
        if Path(cfg.output).exists() and not Path(cfg.output).is_dir():
            raise ConfigError(f"--output {cfg.output} is a file, not a folder")
        found = existing_run(Path(cfg.output))
        if args.resume:
            resume_tag(Path(cfg.output) / "checkpoints", args.resume)  # a tag that is not there: refused before work
        elif found:
            raise ConfigError(f"{cfg.output} already holds a run ({found}): pass --resume to continue it, or choose "
                              "another --output")
        trainer = trainer_class(cfg, args.resume)
    except REFUSALS as err:
        print(f"error: {err}", file=sys.stderr)
        leave_process_group()
        return RunEnd.REFUSED
    try:
        return trainer.fit()
    except (RuntimeError, OSError) as err:  # damaged data, a full disk, a lost rank: the run stops, resumably
        if trainer.watchdog.overdue():  # this rank was the frozen one: its stuck call failed as it woke
            trainer.watchdog.report("".join(traceback.format_exception(err)))
            return RunEnd.HUNG
        lost = trainer.lost_peers()
        print(f"error: training stopped at step {trainer.state.step} on rank {trainer.rank}: "
              f"{lost + ' ' if lost else ''}({str(err).strip()})\nfix that, then continue with --resume (the last "
              "checkpoint is intact)", file=sys.stderr)
        return RunEnd.FAILED


if __name__ == "__main__":
    sys.exit(main())
