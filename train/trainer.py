"""The one training loop every task runs (`train.task`): DeepSpeed ZeRO, gradient accumulation, the lr set every
optimizer step, logging, checkpoints, exact and elastic resume, and the run's health.

Set-up order (`Trainer.__init__`): join the group; take the output folder; check the resume and let the task
check its inputs (reading only); build the model; only then change the folder; then the loader, the engine and
the checkpoint's state. Every resource is entered in one exit stack, which `close()` (or leaving the `with`
block) unwinds on every path: a finished run, a refusal, a crash.

One optimizer step, on every rank, inside one region that keeps the weights' bf16 copies (`weights_cast_once`):
per micro-step a batch from the loader -> the task's loss -> engine.backward -> engine.step, the lr set before the
first forward pass. At ZeRO stage 0 the last micro-step's gradients leave in buckets while its backward pass runs
(`train.grad_reduce`); nothing is reduced at one rank. The loop waits on the device only at log steps (every
`log.log_every` optimizer steps), when the window's losses are reduced across ranks.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from model import KernelChoice
from model.flops import peak_flops
from pipeline.atomic import atomic_write_text
from pipeline.formats import stamp
from pipeline.loader import sample_counts
from pipeline.loader_state import LoaderState
from train.cadence import EverySteps
from train.checkpoint import (
    Checkpointer,
    TrainState,
    check_shared_folder,
    describe_norms,
    latest_tag,
    sound_resume_tag,
)
from train.config import RunConfig, describe
from train.distributed import Peers, StepVote, agree, from_rank_zero, join_process_group, leave_process_group
from train.engine import (
    apply_model_switches,
    attention_backend,
    deepspeed_config,
    engine_args,
    image_dtype,
    weights_cast_once,
)
from train.grad_reduce import OverlappedAllReduce
from train.health import SLOW_PHASE_FACTOR, RankTimes, SpikeDetector, Watchdog, dump_stacks_on
from train.metrics import MetricsLog, MetricWindow
from train.outcome import RunEnd
from train.preflight import check_loader, kernel_choice
from train.profiling import step_profiler, write_profile
from train.recipe import Schedule, lr_at, peak_lr, plan_batch
from train.resume import plan_resume
from train.run_folder import lock_folder
from train.task import MicroBatch, PeriodicJob, RunContext, Task


class StopRequest:
    """Set by SIGTERM/SIGINT; the loop finishes its step, checkpoints and ends with RunEnd.STOPPED."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal_name = signal.Signals(signum).name

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One run of `task_class` with `cfg`; every rank builds one. Use as `with Trainer(...) as trainer:
    trainer.fit()`, so that everything it holds is released on every path.

    Its own state, what a resume restores besides the engine's (`state_dict`): the step, epoch and samples seen,
    the periodic jobs' state, this rank's loader position and the task's random streams.
    """

    def __init__(self, cfg: RunConfig, task_class: type[Task], resume: str | None) -> None:
        self.resources = contextlib.ExitStack()
        try:
            self._start(cfg, task_class, resume)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release every resource the run took, in the reverse order (idempotent)."""
        self.resources.close()

    # ---------------------------------------------------------------- set-up

    def _start(self, cfg: RunConfig, task_class: type[Task], resume: str | None) -> None:
        """The set-up, in the order the module docstring gives: each phase needs the ones before it."""
        deepspeed.utils.logger.setLevel(logging.WARNING)
        self.cfg, self.output = cfg, Path(cfg.output)
        self._join()
        self._plan(resume, task_class)
        self._build(task_class)
        self.metrics.note(stamp("run_log", {"step": self.resume.saved.step if self.resume and self.resume.saved else 0,
                                            "event": "started", "world_size": self.world,
                                            "ranks": self.peers.placement()}))
        if self.resume and self.resume.tag:
            self._load()
        self._instrument()

    def _join(self) -> None:
        """The process group, the CPU side-channel, the watchdog, the peers' names and the folder's lock."""
        hold, cfg = self.resources, self.cfg
        # Collectives time out after the longest a healthy rank may be silent; the watchdog reports sooner.
        collective_timeout_s = cfg.runtime.hang_timeout_s * (SLOW_PHASE_FACTOR + 1)
        hold.callback(leave_process_group)
        self.device = join_process_group(collective_timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        # CPU side-channel for votes, refusals and per-rank figures: no GPU sync.
        self.control = dist.new_group(backend="gloo", **({"timeout": timedelta(seconds=collective_timeout_s)}
                                                         if collective_timeout_s else {}))
        self.state = TrainState(world_size=self.world)
        self.watchdog = Watchdog(cfg.runtime.hang_timeout_s, self.output, self.rank, lambda: self.state.step)
        hold.callback(self.watchdog.close)
        self.peers = Peers(self.control, self.device)
        lock = agree(lambda: lock_folder(self.output) if self.is_main else None, self.control)
        if lock is not None:
            hold.callback(lock.close)
        check_shared_folder(self.output, self.control)

    def _plan(self, resume: str | None, task_class: type[Task]) -> None:
        """The batch plan, the schedule's length and peak lr, and the checked resume (reading only)."""
        cfg = self.cfg
        self.plan = plan_batch(cfg.optim, self.world)
        train_samples = sum(sample_counts(cfg.data.shards, "train", cfg.data.backend, cfg.data.synthetic_samples))
        self.schedule = Schedule.of(train_samples, self.plan, cfg.optim.epochs)
        self.peak_lr = peak_lr(cfg.optim, self.plan.global_batch_size)
        self.resume = None
        if resume:
            ckpt_dir = self.output / "checkpoints"
            tag, passed_over = from_rank_zero(lambda: sound_resume_tag(ckpt_dir, resume), self.control)
            for line in passed_over:
                self.say(f"{line}: resuming from {tag}, the newest sound checkpoint before it")
            self.resume = agree(lambda: plan_resume(self.output, tag, cfg, self.world, task_class), self.control)
        saved = self.resume.saved if self.resume and self.resume.saved else TrainState()
        end = saved.step + self.schedule.steps_left(saved.samples, self.plan.global_batch_size)
        self.stop_at = min(end, cfg.max_steps) if cfg.max_steps else end

    def _build(self, task_class: type[Task]) -> None:
        """The task (its checks) and its model; then, every check passed, the folder's first write; then the
        loader, the engine, the checkpointer and the task's periodic jobs."""
        hold, cfg = self.resources, self.cfg
        self.metrics = MetricsLog(self.output, self.is_main, cfg.log.tensorboard, cfg.log.wandb_project,
                                  json.loads(cfg.to_json()))
        hold.callback(self.metrics.close)
        self.ctx = RunContext(cfg, self.device, self.rank, self.world, self.plan, image_dtype(cfg), self.control,
                              self.metrics, self.say, hold)
        self.task = task_class(self.ctx)
        torch.manual_seed(cfg.runtime.seed)  # identical initial weights on every rank
        self.model = self.task.build_model(initialise=not (self.resume and self.resume.tag))
        self._preflight()
        self.ds_config = deepspeed_config(cfg, self.plan)
        if self.resume and self.resume.universal:
            self.ds_config["checkpoint"] = {**self.ds_config.get("checkpoint", {}), "load_universal": True}
        self._prepare_folder()

        self.loader = self.ctx.loader("train", train=True, augment=self.task.augmentation,
                                      labels=self.task.needs_labels, verbose=self.is_main)
        apply_model_switches(self.model, cfg, self.say_on_every_rank)
        self.engine, _, _, _ = deepspeed.initialize(
            args=engine_args(self.device), model=self.model,
            optimizer=self.task.build_optimizer(self.model, self.peak_lr), config=self.ds_config)
        # ZeRO stage 0 with a torch optimizer DeepSpeed only wraps (not its bf16 master copies): every rank holds
        # the whole optimizer state and the whole gradients, and DeepSpeed computes no gradient norm.
        self.replicated = cfg.runtime.zero_stage == 0 and cfg.runtime.precision != "bf16"
        self.reducer: OverlappedAllReduce | None = None
        if self.replicated:  # DeepSpeed's reduction starts after the backward pass, in fp32, and at one rank too
            self.engine.enable_backward_allreduce = False
            if self.world > 1:
                send = torch.bfloat16 if cfg.runtime.precision == "autocast_bf16" else torch.float32
                self.reducer = OverlappedAllReduce(self.model, None, send, int(cfg.runtime.reduce_bucket_mb * 2**20))
                hold.callback(self.reducer.close)
        self.checkpointer = Checkpointer(cfg.checkpoint, self.output / "checkpoints", self.engine, self.replicated,
                                         self.control, self.say)
        self.jobs: list[PeriodicJob] = self.task.jobs(self.engine, self.model)

    def _preflight(self) -> None:
        """What this rank's device must run (`train.preflight`): the DALI decoding and the model's fused kernels. A
        refusal on any rank refuses on every rank; a fallback to the kernels' references is said on its own."""
        choice = getattr(self.model, "kernels", None)  # None: the model has no fused kernels
        dtype = torch.float32 if self.cfg.runtime.precision == "fp32" else torch.bfloat16  # what the kernels see

        def check() -> tuple[KernelChoice | None, str | None]:
            check_loader(self.device, self.cfg.data.backend)
            return (None, None) if choice is None else kernel_choice(self.device, dtype, choice)

        choice, line = self.ctx.agree(check)
        if line is not None:
            self.say_on_every_rank(line)
        if choice is not None:
            self.model.kernels = choice

    def _instrument(self) -> None:
        """What watches the loop: the stop signals, stacks on demand, per-rank times, spikes, the metric window,
        the profiler, the progress bar."""
        hold, cfg, device = self.resources, self.cfg, self.device
        self.first_step = self.state.step
        self.logging = EverySteps(cfg.log.log_every)
        self.flops_per_image = self.task.flops_per_image(self.model)
        named = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.peak_flops = self.cfg.log.peak_tflops * 1e12 or named
        self.sample_log = self._open_sample_log() if cfg.log.sample_ids else None
        self.lr = 0.0  # the schedule's lr of the current step (each group trains at it x its lr_scale)
        self.stop = StopRequest()
        hold.callback(self.stop.close)
        self.vote = StepVote(self.control, size=2)  # stop, checkpoint by the clock
        hold.callback(self.vote.close)
        stack_file = dump_stacks_on(signal.SIGUSR1, self.output, self.rank)
        hold.callback(stack_file.close)
        hold.callback(faulthandler.unregister, signal.SIGUSR1)
        self.rank_times = RankTimes(device, self.control, self.peers.hosts, cfg.log.straggler_margin,
                                    cfg.log.straggler_windows)
        self.spikes = SpikeDetector(cfg.log.spike_loss_factor, cfg.log.spike_grad_factor, cfg.log.spike_history)
        self.window = MetricWindow(device)
        self.profiler = None
        if cfg.log.profile_steps:
            write = write_profile(self.output) if self.is_main else lambda table: None
            self.profiler = hold.enter_context(step_profiler(cfg.log.profile_steps, device, write))
        # A terminal gets a progress bar; a log file (SLURM's) a plain line per logged window instead.
        self.plain_lines = self.is_main and not sys.stderr.isatty()
        self.bar = tqdm(total=self.stop_at, initial=self.state.step, unit="step", dynamic_ncols=True,
                        disable=not self.is_main or self.plain_lines)
        hold.callback(self.bar.close)

    def _prepare_folder(self) -> None:
        """Rank 0, once every check passed: apply the resume's changes to the folder, write the configs."""
        if self.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            for line in self.resume.apply() if self.resume else []:
                print(line)
            print("\n".join([f"{self.task.name}, resolved config:", *("  " + line for line in describe(self.cfg))]))
            plan = self.plan
            print(f"batch: {plan.global_batch_size} = {plan.local_batch_size} local x {plan.grad_accum_steps} "
                  f"accumulation x {self.world} ranks ({plan.note}); peak lr {self.peak_lr:.3g}")
            atomic_write_text(self.output / "config.json", self.cfg.to_json())
            atomic_write_text(self.output / "deepspeed_config.json", json.dumps(self.ds_config, indent=1))
        dist.barrier()

    def _open_sample_log(self) -> TextIO:
        """OUTPUT/samples/rank<r>.txt: one line per local batch, `<optimizer step> <sample keys...>`."""
        folder = self.output / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        return self.resources.enter_context(open(folder / f"rank{self.rank:05d}.txt", "a"))

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """What a resume restores besides the engine's weights and optimizer: the run's place (the same on every
        rank) and this rank's own (its loader position, the task's random streams)."""
        run = TrainState(self.state.step, self.state.epoch, self.state.samples, self.world, self._job_states())
        return {"run": run, "rank": {"loader": self.loader.state_dict().to_dict(), **self.task.rank_state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """`state["rank"]` holds only the loader's position where the checkpoint was written on another rank count."""
        saved: TrainState = state["run"]
        self.state = TrainState(saved.step, saved.epoch, saved.samples, self.world)
        self.loader.load_state_dict(LoaderState.from_dict(state["rank"]["loader"], "the checkpoint's rank file"))
        same_ranks = saved.world_size == self.world
        self.task.load_rank_state_dict(state["rank"] if same_ranks else None, saved.step,
                                       reseed=self.resume is not None and self.resume.masks_change)
        for job in self.jobs:
            job.load_state_dict(saved.jobs.get(job.name))

    def _job_states(self) -> dict[str, dict[str, Any]]:
        return {job.name: job.state_dict() for job in self.jobs}

    def _load(self) -> None:
        began, plan = time.perf_counter(), self.resume
        saved, rank_state = self.checkpointer.load(plan.tag, plan.universal, self.cfg.optim.gradient_clipping)
        self.load_state_dict({"run": saved, "rank": rank_state})
        norms = self.checkpointer.norms()
        batch = self.plan.global_batch_size
        self.metrics.note({"step": self.state.step, "event": "resumed", "from": plan.tag, "world_size": self.world,
                           "saved_world_size": saved.world_size, "universal": plan.universal,
                           "global_batch_size": batch, "saved_global_batch_size": plan.saved_global_batch_size,
                           "peak_lr": self.peak_lr, "saved_peak_lr": plan.saved_peak_lr,
                           "adamw_norms": list(norms), "jobs": self._job_states()})
        if plan.saved_global_batch_size != batch:
            optim = self.cfg.optim
            rule = (f"optim.lr is set, so it does not follow the batch (the linear scaling rule would give "
                    f"{optim.blr * batch / 256:.4g})" if optim.lr else "the linear scaling rule, blr x batch / 256")
            self.say(f"global batch {plan.saved_global_batch_size} -> {batch}: peak lr {plan.saved_peak_lr:.4g} -> "
                     f"{self.peak_lr:.4g} ({rule}); the schedule continues from {self.state.samples} samples seen, "
                     f"epoch {self.schedule.progress(self.state.samples):.3f}, and ends at step {self.stop_at}")
        how = f"on {self.world} rank{'s' if self.world > 1 else ''}"
        if saved.world_size != self.world:
            how += f" instead of {saved.world_size}"
        if plan.universal:
            how += f", through DeepSpeed's universal checkpoint ({time.perf_counter() - began:.1f} s)"
        self.say(f"resumed from {plan.tag} {how}: step {self.state.step}, epoch {self.state.epoch}, "
                 f"{self.state.samples} samples seen; {describe_norms(norms)}")

    # ---------------------------------------------------------------- the loop

    def fit(self) -> RunEnd:
        """Train to `stop_at` steps, to a stop signal, or until the loss is not finite."""
        self.window.restart(self.loader.wait_s)
        end = None
        while end is None and self.state.step < self.stop_at:
            self.loader.set_epoch(self.state.epoch)
            end = self.run_epoch()
        end = RunEnd.FINISHED if end is None else end
        self._finish(end)
        return end

    def run_epoch(self) -> RunEnd | None:
        """The rest of the current epoch; None when it is done, else how the run ends."""
        accum = self.plan.grad_accum_steps
        usable = len(self.loader) // accum * accum  # local batches that fill whole optimizer steps
        batches = iter(self.loader)
        while self.loader.position.batch < usable:
            with weights_cast_once(self.device):
                for micro_index in range(accum):
                    images, labels = next(batches)
                    self.micro_step(images, labels, MicroBatch(self.state.step, micro_index))
            epoch_done = self.loader.position.batch == usable
            end = self.after_optimizer_step(epoch_done)
            if end is not None or epoch_done:
                return end
        self.end_epoch()  # its remaining samples made no optimizer step (an epoch handed over to more ranks)
        return None

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor | None, micro: MicroBatch) -> None:
        """One forward and backward pass of an accumulation; DeepSpeed's step updates the weights after the last."""
        if micro.index == 0:
            self.set_lr()
        if self.sample_log is not None:
            index = self.loader.position.batch - 1  # of this epoch's local batches
            self.sample_log.write(f"{self.state.step + 1} {' '.join(self.loader.batch_keys(index))}\n")
        with attention_backend(self.cfg.runtime.attention), self.rank_times.forward():
            loss = self.task.loss(self.engine, images, labels, micro)
        last = micro.index == self.plan.grad_accum_steps - 1
        if last and self.reducer is not None:
            self.reducer.arm()  # the gradients leave in buckets while this backward pass runs
        self.engine.backward(loss)  # divided by the accumulation count
        if last and self.reducer is not None:
            self.reducer.finish()
        if last and self.replicated and self.logging.due(self.state.step + 1):
            self.window.grad_norm = total_grad_norm(self.model)  # on the device: read at the log
        self.engine.step()  # the optimizer steps after the accumulation's last forward pass only
        self.window.add(loss, self.state.step + 1)

    def set_lr(self) -> None:
        self.lr = lr_at(self.schedule.progress(self.state.samples), self.peak_lr, self.cfg.optim)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)

    def after_optimizer_step(self, epoch_done: bool) -> RunEnd | None:
        """Count the step; take the decisions the ranks voted on at the step before (a stop, a checkpoint by the
        clock) and vote on the next; log, end the epoch, checkpoint when due. An epoch's jobs run before its last
        step's checkpoint, so that the checkpoint holds what they found."""
        state = self.state
        state.step += 1
        state.samples += self.plan.global_batch_size
        self.watchdog.beat()
        if self.profiler is not None:
            self.profiler.step()
        self.window.steps += 1
        self.bar.update(1)
        stopping, clock_due = self.vote.cast(self.stop.signal_name is not None, self.checkpointer.due_by_clock())
        checkpoint_due = clock_due or self.checkpointer.due_by_steps(state.step)
        finished = state.step >= self.stop_at
        if self.logging.due(state.step) or checkpoint_due or stopping or finished:
            loss, bad_step = self.window.reduce()
            if bad_step is not None:
                self.say(f"non-finite loss at step {bad_step}: stopping. The last good checkpoint "
                         f"({latest_tag(self.checkpointer.ckpt_dir) or 'none written yet'}) is left intact.")
                return RunEnd.DIVERGED
            if self.log(loss) and self.cfg.checkpoint.on_spike:
                self.checkpoint(milestone=True)
        if stopping:
            self.checkpoint()
            self.say(f"stopped by {self.stop.signal_name or 'a signal on another rank'} after step {state.step}; "
                     "resume with --resume")
            return RunEnd.STOPPED
        if epoch_done:
            self.end_epoch()
        if finished:
            return RunEnd.FINISHED  # its checkpoint follows the end's jobs (_finish)
        if checkpoint_due:
            self.checkpoint()
        return None

    def end_epoch(self) -> None:
        """Collective: the epoch is done; its periodic jobs and milestone, when due."""
        self.state.epoch += 1
        for job in self.jobs:
            if job.due(self.state.epoch):
                self.run_job(job)
        if self.checkpointer.milestones.due(self.state.epoch):
            self.checkpoint(milestone=True)

    def _finish(self, end: RunEnd) -> None:
        """The end of a run that did not diverge: the jobs the end asks for, then the last checkpoint."""
        self.bar.close()
        if self.state.step == self.first_step:
            self.say(f"nothing to train: the run is at step {self.state.step}, its end is step {self.stop_at}")
        elif end is not RunEnd.DIVERGED:
            for job in self.jobs:
                if (end is RunEnd.FINISHED or job.runs_when_stopped) and job.last_step != self.state.step:
                    self.run_job(job)
            if self.cfg.checkpoint.at_end or end is RunEnd.STOPPED:
                self.checkpoint()  # unless this step's is written already
        self.say(f"{end.name.lower()}: step {self.state.step} of {self.stop_at}, epoch {self.state.epoch}, "
                 f"{self.state.samples} samples; outputs in {self.output}")

    def run_job(self, job: PeriodicJob) -> None:
        run_job(job, self.watchdog, self.state.step, self.state.epoch)

    def checkpoint(self, milestone: bool = False) -> None:
        """Collective: this step's checkpoint (a milestone is kept apart from checkpoint.keep_last)."""
        if self.checkpointer.saved_step == self.state.step and not milestone:
            return
        with self.watchdog.slow_phase("a checkpoint"):
            if self.sample_log is not None:
                self.sample_log.flush()
            state = self.state_dict()
            self.checkpointer.save(state["run"], state["rank"], milestone)

    # ---------------------------------------------------------------- what the loop records

    def say(self, line: str) -> None:
        """Rank 0 prints a line without breaking the progress bar."""
        if self.is_main:
            tqdm.write(line)

    def say_on_every_rank(self, line: str) -> None:
        """What one rank finds of itself (a compiler missing on its node), named by that rank."""
        tqdm.write(f"rank {self.rank}: {line}", file=sys.stderr)

    def log(self, loss: float) -> bool:
        """Collective: the window's record (every rank's figures gathered); True when the loss spiked."""
        window = self.window
        elapsed = time.perf_counter() - window.started
        img_per_s = window.steps * self.plan.global_batch_size / elapsed
        grad_norm = window.grad_norm if self.replicated else self.engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        data_wait_s = self.loader.wait_s - window.wait_at_start
        ranks, straggler = self.rank_times.gather(data_wait_s)
        self.metrics.record({
            "step": self.state.step, "epoch": self.state.epoch, "samples": self.state.samples, "loss": loss,
            "lr": self.lr, "grad_norm": grad_norm, "img_per_s": img_per_s,
            "data_stall_pct": 100 * data_wait_s / elapsed,
            "mfu": None if self.peak_flops is None else self.flops_per_image * img_per_s / self.peak_flops / self.world,
            "step_time_s": elapsed / window.steps, **ranks,
        })
        if self.plain_lines:
            print(self.log_line(loss, grad_norm, img_per_s, 100 * data_wait_s / elapsed, ranks.get("peak_memory_gb"),
                                elapsed / window.steps), flush=True)
        elif self.is_main:
            self.bar.set_postfix(epoch=self.state.epoch, loss=f"{loss:.4f}", img_s=f"{img_per_s:.0f}")
        if straggler:
            self.say(straggler)
        spike = self.spikes.check(loss, grad_norm)
        if spike:
            last = latest_tag(self.checkpointer.ckpt_dir) or "none yet"
            self.metrics.note({"step": self.state.step, "event": "loss_spike", **spike, "last_checkpoint": last})
            value, median = ((loss, spike["median_loss"]) if spike["cause"] == "loss"
                             else (grad_norm, spike["median_grad_norm"]))
            self.say(f"loss spike at step {self.state.step}: {spike['cause']} {value:.4f} against a recent median of "
                     f"{median:.4f}; the last checkpoint before it is {last}")
        window.restart(self.loader.wait_s)
        return spike is not None


    def log_line(self, loss: float, grad_norm: float | None, img_per_s: float, stall_pct: float,
                 memory_gb: float | None, step_s: float) -> str:
        """The line a log file gets per window: when, where the run is, how it learns, how fast, when it ends."""
        eta = timedelta(seconds=round(step_s * (self.stop_at - self.state.step)))
        parts = [time.strftime("%Y-%m-%d %H:%M:%S"), f"step {self.state.step}/{self.stop_at}",
                 f"epoch {self.state.epoch}", f"loss {loss:.4f}", f"lr {self.lr:.3g}",
                 f"grad {grad_norm:.3g}" if grad_norm is not None else "", f"{img_per_s:.0f} img/s",
                 f"stall {stall_pct:.0f}%", f"mem {memory_gb:.1f} GB" if memory_gb is not None else "", f"eta {eta}"]
        return " ".join(part for part in parts if part)


def run_job(job: PeriodicJob, watchdog: Watchdog, step: int, finished_epochs: int) -> None:
    """Collective: a periodic job, in a slow phase named as the job itself (what a hang report says it was in)."""
    with watchdog.slow_phase(job.name):
        job.run(step, finished_epochs)
    job.last_step = step


def total_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The global L2 norm of the gradients every rank holds in full (ZeRO stage 0, after the all-reduce)."""
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])

