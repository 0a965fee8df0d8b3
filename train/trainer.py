"""The one training loop every task runs (`train.task`): DeepSpeed ZeRO, gradient accumulation, the
lr set every optimizer step, logging, checkpoints, exact and elastic resume, and the run's health.

Set-up order (`Trainer.__init__`): join the group; take the output folder; check the resume and let
the task check its inputs (reading only); build the model; only then change the folder; then the
loader, the engine and the checkpoint's state. Every resource is entered in one exit stack, which
`close()` (or leaving the `with` block) unwinds on every path: a finished run, a refusal, a crash.

One optimizer step, on every rank, inside one region that keeps the weights' bf16 copies
(`weights_cast_once`): per micro-step a batch from the loader -> the task's loss -> engine.backward
-> engine.step, the lr set before the first forward pass. At ZeRO stage 0 the last micro-step's
gradients leave in buckets while its backward pass runs (`train.grad_reduce`); nothing is reduced at
one rank. The loop waits on the device only at log steps (every `log.log_every` optimizer steps),
when the window's losses are reduced across ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from pipeline.atomic import atomic_write_text
from pipeline.formats import stamp
from pipeline.loader import sample_counts
from pipeline.loader_state import LoaderState
from train.checkpoint import (
    Checkpointer,
    TrainState,
    check_shared_folder,
    describe_norms,
    latest_tag,
    sound_resume_tag,
)
from train.config import RunConfig, describe
from train.distributed import (
    Peers,
    StepVote,
    agree,
    from_rank_zero,
    join_process_group,
    leave_process_group,
)
from train.engine import (
    apply_model_switches,
    attention_backend,
    deepspeed_config,
    engine_args,
    image_dtype,
    weights_cast_once,
)
from train.grad_reduce import OverlappedAllReduce
from train.health import SLOW_PHASE_FACTOR
from train.metrics import MetricsLog
from train.monitor import RunMonitor
from train.outcome import RunEnd
from train.preflight import check_rank
from train.recipe import Schedule, lr_at, peak_lr, plan_batch
from train.resume import plan_resume
from train.run_folder import lock_folder
from train.task import MicroBatch, PeriodicJob, RunContext, Task, run_job


class StopRequest:
    """Set by SIGTERM/SIGINT; the loop finishes its step, checkpoints and ends with
    RunEnd.STOPPED."""

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
    """One run of `task_class` with `cfg`; every rank builds one. Use as `with Trainer(...) as
    trainer: trainer.fit()`, so that everything it holds is released on every path. What watches the
    run and writes it down is its `monitor` (`train.monitor`).

    Its own state, what a resume restores besides the engine's (`state_dict`): the step, epoch and
    samples seen, the periodic jobs' state, this rank's loader position and the task's random
    streams.
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
        """The set-up, in the order the module docstring gives: each phase needs the ones before
        it."""
        deepspeed.utils.logger.setLevel(logging.WARNING)
        self.cfg, self.output = cfg, Path(cfg.output)
        self._join()
        self._plan(resume, task_class)
        self._build(task_class)
        first = self.resume.saved.step if self.resume and self.resume.saved else 0
        self.metrics.note(
            stamp(
                "run_log",
                {
                    "step": first,
                    "event": "started",
                    "world_size": self.world,
                    "ranks": self.peers.placement(),
                },
            )
        )
        if self.resume and self.resume.tag:
            self._load()
        self.monitor.begin(
            self.state.step, self.stop_at, self.task.flops_per_image(self.model), self.metrics
        )
        # the schedule's lr of the current step (each group trains at it x its lr_scale)
        self.lr = 0.0
        self.stop = StopRequest()
        self.resources.callback(self.stop.close)
        self.vote = StepVote(self.control, size=2)  # stop, checkpoint by the clock
        self.resources.callback(self.vote.close)

    def _join(self) -> None:
        """The process group, the CPU side-channel, the peers' names, the run's monitor and the
        folder's lock."""
        hold, cfg = self.resources, self.cfg
        # Collectives time out after the longest a healthy rank may be silent; the watchdog reports
        # sooner.
        collective_timeout_s = cfg.runtime.hang_timeout_s * (SLOW_PHASE_FACTOR + 1)
        hold.callback(leave_process_group)
        self.device = join_process_group(collective_timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        # CPU side-channel for votes, refusals and per-rank figures: no GPU sync.
        self.control = dist.new_group(
            backend="gloo",
            **(
                {"timeout": timedelta(seconds=collective_timeout_s)} if collective_timeout_s else {}
            ),
        )
        self.state = TrainState(world_size=self.world)
        self.peers = Peers(self.control, self.device)
        self.monitor = RunMonitor(
            cfg, self.output, self.rank, self.device, self.control, self.peers.hosts, hold
        )
        lock = agree(lambda: lock_folder(self.output) if self.is_main else None, self.control)
        if lock is not None:
            hold.callback(lock.close)
        check_shared_folder(self.output, self.control)

    def _plan(self, resume: str | None, task_class: type[Task]) -> None:
        """The batch plan, the schedule's length and peak lr, and the checked resume (reading
        only)."""
        cfg = self.cfg
        self.plan = plan_batch(cfg.optim, self.world)
        train_samples = sum(
            sample_counts(cfg.data.shards, "train", cfg.data.backend, cfg.data.synthetic_samples)
        )
        self.schedule = Schedule.of(train_samples, self.plan, cfg.optim.epochs)
        self.peak_lr = peak_lr(cfg.optim, self.plan.global_batch_size)
        self.resume = None
        if resume:
            ckpt_dir = self.output / "checkpoints"
            tag, passed_over = from_rank_zero(
                lambda: sound_resume_tag(ckpt_dir, resume), self.control
            )
            for line in passed_over:
                self.monitor.say(
                    f"{line}: resuming from {tag}, the newest sound checkpoint before it"
                )
            self.resume = agree(
                lambda: plan_resume(self.output, tag, cfg, self.world, task_class), self.control
            )
        saved = self.resume.saved if self.resume and self.resume.saved else TrainState()
        end = saved.step + self.schedule.steps_left(saved.samples, self.plan.global_batch_size)
        self.stop_at = min(end, cfg.max_steps) if cfg.max_steps else end

    def _build(self, task_class: type[Task]) -> None:
        """The task (its checks) and its model; then, every check passed, the folder's first write;
        then the loader, the engine, the checkpointer and the task's periodic jobs."""
        hold, cfg, say = self.resources, self.cfg, self.monitor.say
        self.metrics = MetricsLog(
            self.output,
            self.is_main,
            cfg.log.tensorboard,
            cfg.log.wandb_project,
            json.loads(cfg.to_json()),
        )
        hold.callback(self.metrics.close)
        self.ctx = RunContext(
            cfg,
            self.device,
            self.rank,
            self.world,
            self.plan,
            image_dtype(cfg),
            self.control,
            self.metrics,
            say,
            hold,
        )
        self.task = task_class(self.ctx)
        torch.manual_seed(cfg.runtime.seed)  # identical initial weights on every rank
        self.model = self.task.build_model(initialise=not (self.resume and self.resume.tag))
        check_rank(self.model, cfg, self.device, self.ctx.agree, self.monitor.say_on_every_rank)
        self.ds_config = deepspeed_config(cfg, self.plan)
        if self.resume and self.resume.universal:
            self.ds_config["checkpoint"] = {
                **self.ds_config.get("checkpoint", {}),
                "load_universal": True,
            }
        self._prepare_folder()

        self.loader = self.ctx.loader("train", train=True, augment=self.task.augmentation,
                                      labels=self.task.needs_labels, verbose=self.is_main)
        apply_model_switches(self.model, cfg, self.monitor.say_on_every_rank)
        self.engine, _, _, _ = deepspeed.initialize(
            args=engine_args(self.device), model=self.model,
            optimizer=self.task.build_optimizer(self.model, self.peak_lr), config=self.ds_config)
        # ZeRO stage 0 with a torch optimizer DeepSpeed only wraps (not its bf16 master copies):
        # every rank holds the whole optimizer state and the whole gradients, and DeepSpeed computes
        # no gradient norm.
        self.replicated = cfg.runtime.zero_stage == 0 and cfg.runtime.precision != "bf16"
        self.reducer: OverlappedAllReduce | None = None
        # DeepSpeed's reduction starts after the backward pass, in fp32, and at one rank too
        if self.replicated:
            self.engine.enable_backward_allreduce = False
            if self.world > 1:
                send = torch.bfloat16 if cfg.runtime.precision == "autocast_bf16" else torch.float32
                self.reducer = OverlappedAllReduce(
                    self.model, None, send, int(cfg.runtime.reduce_bucket_mb * 2**20)
                )
                hold.callback(self.reducer.close)
        self.checkpointer = Checkpointer(
            cfg.checkpoint,
            self.output / "checkpoints",
            self.engine,
            self.replicated,
            self.control,
            say,
        )
        self.jobs: list[PeriodicJob] = self.task.jobs(self.engine, self.model)

    def _prepare_folder(self) -> None:
        """Rank 0, once every check passed: apply the resume's changes to the folder, write the
        configs."""
        if self.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            for line in self.resume.apply() if self.resume else []:
                print(line)
            print(
                "\n".join(
                    [
                        f"{self.task.name}, resolved config:",
                        *("  " + line for line in describe(self.cfg)),
                    ]
                )
            )
            plan = self.plan
            print(
                f"batch: {plan.global_batch_size} = {plan.local_batch_size} local x "
                f"{plan.grad_accum_steps} accumulation x {self.world} ranks ({plan.note}); peak lr "
                f"{self.peak_lr:.3g}"
            )
            atomic_write_text(self.output / "config.json", self.cfg.to_json())
            atomic_write_text(
                self.output / "deepspeed_config.json", json.dumps(self.ds_config, indent=1)
            )
        dist.barrier()

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """What a resume restores besides the engine's weights and optimizer: the run's place (the
        same on every rank) and this rank's own (its loader position, the task's random streams)."""
        jobs = {job.name: job.state_dict() for job in self.jobs}
        run = TrainState(self.state.step, self.state.epoch, self.state.samples, self.world, jobs)
        return {
            "run": run,
            "rank": {"loader": self.loader.state_dict().to_dict(), **self.task.rank_state_dict()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """`state["rank"]` holds only the loader's position where the checkpoint was written on
        another rank count."""
        saved: TrainState = state["run"]
        self.state = TrainState(saved.step, saved.epoch, saved.samples, self.world)
        self.loader.load_state_dict(
            LoaderState.from_dict(state["rank"]["loader"], "the checkpoint's rank file")
        )
        same_ranks = saved.world_size == self.world
        self.task.load_rank_state_dict(state["rank"] if same_ranks else None, saved.step,
                                       reseed=self.resume is not None and self.resume.masks_change)
        for job in self.jobs:
            job.load_state_dict(saved.jobs.get(job.name))

    def _load(self) -> None:
        began, plan, say = time.perf_counter(), self.resume, self.monitor.say
        saved, rank_state = self.checkpointer.load(
            plan.tag, plan.universal, self.cfg.optim.gradient_clipping
        )
        self.load_state_dict({"run": saved, "rank": rank_state})
        norms = self.checkpointer.norms()
        batch = self.plan.global_batch_size
        self.metrics.note(
            {
                "step": self.state.step,
                "event": "resumed",
                "from": plan.tag,
                "world_size": self.world,
                "saved_world_size": saved.world_size,
                "universal": plan.universal,
                "global_batch_size": batch,
                "saved_global_batch_size": plan.saved_global_batch_size,
                "peak_lr": self.peak_lr,
                "saved_peak_lr": plan.saved_peak_lr,
                "adamw_norms": list(norms),
                "jobs": saved.jobs,
            }
        )
        if plan.saved_global_batch_size != batch:
            optim = self.cfg.optim
            rule = (
                "optim.lr is set, so it does not follow the batch (the linear scaling rule would "
                f"give {optim.blr * batch / 256:.4g})"
                if optim.lr
                else "the linear scaling rule, blr x batch / 256"
            )
            say(
                f"global batch {plan.saved_global_batch_size} -> {batch}: peak lr "
                f"{plan.saved_peak_lr:.4g} -> {self.peak_lr:.4g} ({rule}); the schedule continues "
                f"from {self.state.samples} samples seen, epoch "
                f"{self.schedule.progress(self.state.samples):.3f}, and ends at step {self.stop_at}"
            )
        how = f"on {self.world} rank{'s' if self.world > 1 else ''}"
        if saved.world_size != self.world:
            how += f" instead of {saved.world_size}"
        if plan.universal:
            how += (
                f", through DeepSpeed's universal checkpoint ({time.perf_counter() - began:.1f} s)"
            )
        say(f"resumed from {plan.tag} {how}: step {self.state.step}, epoch {self.state.epoch}, "
            f"{self.state.samples} samples seen; {describe_norms(norms)}")

    # ---------------------------------------------------------------- the loop

    def fit(self) -> RunEnd:
        """Train to `stop_at` steps, to a stop signal, or until the loss is not finite."""
        self.monitor.restart_window(self.loader.wait_s)
        self.first_step = self.state.step
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
        # its remaining samples made no optimizer step (an epoch handed over to more ranks)
        self.end_epoch()
        return None

    def micro_step(
        self, images: torch.Tensor, labels: torch.Tensor | None, micro: MicroBatch
    ) -> None:
        """One forward and backward pass of an accumulation, the lr set before the first;
        DeepSpeed's step updates the weights after the last."""
        if micro.index == 0:
            self.lr = lr_at(
                self.schedule.progress(self.state.samples), self.peak_lr, self.cfg.optim
            )
            for group in self.engine.optimizer.param_groups:
                group["lr"] = self.lr * group.get("lr_scale", 1.0)
        step = self.state.step + 1
        keys = (
            self.loader.batch_keys(self.loader.position.batch - 1)
            if self.cfg.log.sample_ids
            else None
        )
        with attention_backend(self.cfg.runtime.attention), self.monitor.forward(step, keys):
            loss = self.task.loss(self.engine, images, labels, micro)
        last = micro.index == self.plan.grad_accum_steps - 1
        if last and self.reducer is not None:
            self.reducer.arm()  # the gradients leave in buckets while this backward pass runs
        self.engine.backward(loss)  # divided by the accumulation count
        if last and self.reducer is not None:
            self.reducer.finish()
        if last and self.replicated and self.monitor.log_due(step):
            # on the device: read at the log
            self.monitor.window.grad_norm = total_grad_norm(self.model)
        self.engine.step()  # the optimizer steps after the accumulation's last forward pass only
        self.monitor.add_loss(loss, step)

    def after_optimizer_step(self, epoch_done: bool) -> RunEnd | None:
        """The step is done; what follows it, on every rank alike: the decisions the ranks voted on
        at the step before (a stop, a checkpoint by the clock), the per-step jobs, the logged
        window, the epoch's end, the checkpoint. An epoch's jobs run before its last step's
        checkpoint, so that the checkpoint holds what they found."""
        state = self.state
        state.step += 1
        state.samples += self.plan.global_batch_size
        self.monitor.step_done(state.step)
        stopping, clock_due = self.vote.cast(
            self.stop.signal_name is not None, self.checkpointer.due_by_clock()
        )
        # a clock vote cast at the step before, ahead of that step's checkpoint, that checkpoint
        # answered already
        clock_due = clock_due and self.checkpointer.saved_step < state.step - 1
        checkpoint_due = clock_due or self.checkpointer.due_by_steps(state.step)
        finished = state.step >= self.stop_at
        for job in self.jobs:
            if job.due_after_step(state.step):
                run_job(job, self.monitor, state.step, state.epoch)
        if self.monitor.log_due(state.step) or checkpoint_due or stopping or finished:
            end = self._close_window()
            if end is not None:
                return end
        if stopping:
            self.checkpoint()
            self.monitor.say(
                f"stopped by {self.stop.signal_name or 'a signal on another rank'} after step "
                f"{state.step}; resume with --resume"
            )
            return RunEnd.STOPPED
        if epoch_done:
            self.end_epoch()
        if finished:
            return RunEnd.FINISHED  # its checkpoint follows the end's jobs (_finish)
        if checkpoint_due:
            self.checkpoint()
        return None

    def _close_window(self) -> RunEnd | None:
        """Collective: the logged window's loss over all ranks, its record and line; RunEnd.DIVERGED
        at a non-finite loss, a milestone checkpoint at a loss spike where the config asks for
        one."""
        loss, bad_step = self.monitor.reduce()
        if bad_step is not None:
            self.monitor.say(
                f"non-finite loss at step {bad_step}: stopping. The last good checkpoint "
                f"({latest_tag(self.checkpointer.ckpt_dir) or 'none written yet'}) is left intact."
            )
            return RunEnd.DIVERGED
        grad_norm = (
            self.monitor.window.grad_norm if self.replicated else self.engine.get_global_grad_norm()
        )
        grad_norm = None if grad_norm is None else float(grad_norm)
        spike = self.monitor.record(self.state, loss, self.lr, grad_norm, self.loader.wait_s,
                                    self.plan.global_batch_size, self.world)
        if spike:
            last = latest_tag(self.checkpointer.ckpt_dir) or "none yet"
            self.metrics.note(
                {"step": self.state.step, "event": "loss_spike", **spike, "last_checkpoint": last}
            )
            value, median = ((loss, spike["median_loss"]) if spike["cause"] == "loss"
                             else (grad_norm, spike["median_grad_norm"]))
            self.monitor.say(
                f"loss spike at step {self.state.step}: {spike['cause']} {value:.4f} against a "
                f"recent median of {median:.4f}; the last checkpoint before it is {last}"
            )
            if self.cfg.checkpoint.on_spike:
                self.checkpoint(milestone=True)
        return None

    def end_epoch(self) -> None:
        """Collective: the epoch is done; its periodic jobs and milestone, when due."""
        self.state.epoch += 1
        for job in self.jobs:
            if job.due_after_epoch(self.state.epoch):
                run_job(job, self.monitor, self.state.step, self.state.epoch)
        if self.checkpointer.milestones.due(self.state.epoch):
            self.checkpoint(milestone=True)

    def _finish(self, end: RunEnd) -> None:
        """The end of a run that did not diverge: the jobs the end asks for, then the last
        checkpoint."""
        self.monitor.close_bar()
        if self.state.step == self.first_step:
            self.monitor.say(
                f"nothing to train: the run is at step {self.state.step}, its end is step "
                f"{self.stop_at}"
            )
        elif end is not RunEnd.DIVERGED:
            for job in self.jobs:
                if end is RunEnd.FINISHED or job.runs_when_stopped:
                    run_job(job, self.monitor, self.state.step, self.state.epoch)
            if self.cfg.checkpoint.at_end or end is RunEnd.STOPPED:
                self.checkpoint()  # unless this step's is written already
        self.monitor.say(
            f"{end.name.lower()}: step {self.state.step} of {self.stop_at}, epoch "
            f"{self.state.epoch}, {self.state.samples} samples; outputs in {self.output}"
        )

    def checkpoint(self, milestone: bool = False) -> None:
        """Collective: this step's checkpoint (a milestone is kept apart from
        checkpoint.keep_last)."""
        if self.checkpointer.saved_step == self.state.step and not milestone:
            return
        with self.monitor.slow_phase("a checkpoint"):
            self.monitor.flush()
            state = self.state_dict()
            self.checkpointer.save(state["run"], state["rank"], milestone)


def total_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The global L2 norm of the gradients every rank holds in full (ZeRO stage 0, after the
    all-reduce)."""
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
