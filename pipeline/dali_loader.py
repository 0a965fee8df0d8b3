"""The DALI backend's life cycle: a rank reads an epoch as a few readings, each one pipeline
(`pipeline.dali_graph`) over index files that list exactly its window of this rank's samples in the
epoch plan's order (a window: the batches of about `window_shards` shards); checkpointable
mid-window, and the reading cache around it.

DALI reads the members at the offsets an index names, in the index's order, so no shuffle buffer is
needed and nothing leaks from one epoch into the next. While a window runs, the next one's pipeline
(the next epoch's first, at an epoch's end) is built and starts decoding in a background thread,
its shards fetched whole from a bucket first where they are in one (`pipeline.shard_stage`): at the
boundary its first batches are ready. Windows are the same wherever the shards are, so a bucket's
shards and the same shards on disk give the same batches.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia.dali import Pipeline
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipeline.dali_graph import HW_DECODER_LOAD, PREFETCH_QUEUE_DEPTH, ascii_labels, image_pipeline
from pipeline.errors import DamagedImage, DamagedIndex, StorageError
from pipeline.loader_base import Batch, Loader, LoaderSpec
from pipeline.loader_state import LoaderState, ReadPosition
from pipeline.shard_stage import ShardStage
from pipeline.wds_format import INDEX_VERSION

_DAMAGED_HINT = (
    "the shards are damaged: find the bad shard with `python -m pipeline.build_shards --verify DIR`"
)


@dataclass
class _Reading:
    """One pipeline reading this rank's samples of an epoch from `start` to the batch before `end`,
    the index files it reads, and what gives back its shards' local copies."""

    start: ReadPosition
    end: int
    iterator: DALIGenericIterator
    pipeline: Pipeline
    folder: Path
    release: Callable[[], None]
    consumed: int = 0  # batches handed out so far

    @property
    def position(self) -> ReadPosition:
        """The position its next batch continues from."""
        return replace(self.start, batch=self.start.batch + self.consumed)

    @property
    def finished(self) -> bool:
        """Its window is read (DALI's iterator would begin it again)."""
        return self.start.batch + self.consumed >= self.end

    def close(self) -> None:
        # DALI's iterator and pipeline refer to each other, so dropping them frees nothing until the
        # cycle collector runs. Shutting the pipeline down frees its threads and buffers now, before
        # the next epoch allocates its own; a gc.collect() here cost about 100 ms at every epoch
        # boundary. DALI has no public call for this; where a version lacks the private one, the
        # collector frees it later.
        shutdown = getattr(self.pipeline, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        del self.iterator, self.pipeline
        shutil.rmtree(self.folder, ignore_errors=True)
        self.release()


@dataclass(frozen=True)
class _ExactState:
    """DALI's own state at `position` (its random generators mid-epoch), from a checkpoint: it
    reproduces the rest of the epoch's crops exactly when the pipeline that started at
    `reading_start` is rebuilt with it."""

    position: ReadPosition
    reading_start: ReadPosition
    dali: str


def _check_lengths(tars: list[str], copies: list[str], ends: list[int]) -> None:
    """A DamagedIndex, naming the shard, where a tar is shorter than its index says (cut short,
    or replaced by another): DALI would fail on it without saying which."""
    for tar, copy, end in zip(tars, copies, ends, strict=True):
        size = os.stat(copy).st_size
        if size < end:
            raise DamagedIndex(
                f"{tar}: {size} bytes, but its index places members up to byte {end}: the shard "
                f"is cut short or was replaced; rebuild it. {_DAMAGED_HINT}"
            )


class DaliLoader(Loader):
    backend = "dali"

    def __init__(self, spec: LoaderSpec, hw_decoder_load: float = HW_DECODER_LOAD) -> None:
        super().__init__(spec)
        self.hw_decoder_load = hw_decoder_load
        # Fixed here, in the caller's thread: CUDA's current device is per thread, and the next
        # epoch is built in another one.
        self._device_id = torch.cuda.current_device() if spec.device == "gpu" else None
        self._scratch = Path(tempfile.mkdtemp(prefix="maeflow-dali-"))
        weakref.finalize(self, shutil.rmtree, self._scratch, True)
        self._stage = ShardStage(self._scratch / "staged")
        self._stage.folder.mkdir()
        sizes = self.table.shard_sizes
        # Batches a reading covers: about `window_shards` median shards, so that a bucket's shards
        # staged for the current reading and the next stay a few shards per rank.
        self.window_batches = max(
            1, spec.window_shards * int(np.median(sizes) if sizes else 1) // spec.local_batch_size
        )
        self._background = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="maeflow-next-reading"
        )
        weakref.finalize(self, self._background.shutdown, wait=False, cancel_futures=True)
        # Pipelines, not position: each knows the position it continues from, and is used only
        # there.
        self._reading: _Reading | None = None  # the pipeline the last loop read from
        # the next window's (or epoch's), being built in the background
        self._ahead: Future[_Reading] | None = None
        # a checkpoint's DALI state, for the position it was taken at
        self._exact: _ExactState | None = None

    def window_end(self, start: ReadPosition) -> int:
        """The batch a reading from `start` stops before: the next multiple of `window_batches`, or
        the epoch's end. From the batch alone, so a reading rebuilt from a checkpoint ends where the
        first one did."""
        batches = -(-len(self.samples(start)) // self.spec.local_batch_size)
        return min(batches, (start.batch // self.window_batches + 1) * self.window_batches)

    def _open(self, start: ReadPosition, checkpoint: str | None = None) -> _Reading:
        """A pipeline over this rank's samples of one window from `start` on, its first batches
        decoding."""
        spec = self.spec
        end = self.window_end(start)
        b = spec.local_batch_size
        samples = self.samples(start)[start.batch * b: end * b]
        folder = Path(tempfile.mkdtemp(prefix=f"epoch{start.epoch:05d}-", dir=self._scratch))
        tars, indexes, ends = self._write_indexes(samples, folder)
        try:
            copies = self._stage.hold(tars)
            _check_lengths(tars, copies, ends)
            pipe = image_pipeline(
                spec,
                copies,
                indexes,
                self.hw_decoder_load,
                batch_size=b,
                num_threads=spec.num_threads,
                device_id=self._device_id,
                seed=self.augmentation_seed(start),
                prefetch_queue_depth=PREFETCH_QUEUE_DEPTH,
                checkpoint=checkpoint,
            )
            outputs = ["images", "labels"] if spec.labels else ["images"]
            iterator = DALIGenericIterator(
                pipe, outputs, reader_name="reader", last_batch_policy=LastBatchPolicy.PARTIAL
            )
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            self._stage.release(tars)
            raise
        return _Reading(start, end, iterator, pipe, folder, partial(self._stage.release, tars))

    def _after(self, reading: _Reading) -> ReadPosition | None:
        """Where the reading after `reading` starts: its epoch's next window, or (training) the next
        epoch."""
        if reading.end < -(-len(self.samples(reading.start)) // self.spec.local_batch_size):
            return replace(reading.start, batch=reading.end)
        return ReadPosition(reading.start.epoch + 1) if self.spec.train else None

    def _write_indexes(
        self, samples: np.ndarray, folder: Path
    ) -> tuple[list[str], list[str], list[int]]:
        """One (tar, index) pair per run of consecutive samples from the same shard, and the byte
        the run's members reach to in the tar."""
        entries = self.table.entries(samples)
        shards = entries.rows[:, 0]
        lines = entries.index_lines()
        member_ends = np.maximum(
            entries.rows[:, 1] + entries.rows[:, 2], entries.rows[:, 3] + entries.rows[:, 4]
        )
        tars, indexes, ends = [], [], []
        for number, run in enumerate(
            np.split(np.arange(len(samples)), np.flatnonzero(np.diff(shards)) + 1)
        ):
            index = folder / f"{number:06d}.idx"
            index.write_text(
                f"{INDEX_VERSION} {len(run)}\n" + "\n".join(lines[run[0] : run[-1] + 1]) + "\n"
            )
            tars.append(entries.tars[int(shards[run[0]])])
            indexes.append(str(index))
            ends.append(int(member_ends[run].max()))
        return tars, indexes, ends

    def _reading_for(self, position: ReadPosition) -> _Reading:
        """The pipeline that continues at `position`; every other one is closed. The cases, in
        order:
        1. a checkpoint's DALI state for exactly this position: the interrupted reading, rebuilt
        with it;
        2. the pipeline the last loop stopped in mid-window, when it stopped here;
        3. the next window's (or epoch's), built ahead, where it starts;
        4. a new pipeline."""
        exact, self._exact = self._exact, None
        held = [r for r in (self._reading, self._ahead.result() if self._ahead else None) if r]
        self._reading = self._ahead = None
        if exact is not None and exact.position == position:
            chosen = self._open(exact.reading_start, exact.dali)
            chosen.consumed = position.batch - exact.reading_start.batch
        else:
            chosen = next(
                (r for r in held if r.position == position and not r.finished), None
            ) or self._open(position)
        for reading in held:
            if reading is not chosen:
                reading.close()
        return chosen

    def _epoch_batches(self, position: ReadPosition) -> Iterator[Batch]:
        # The reading outlives this generator when a consumer stops mid-window (a training loop that
        # ends or checkpoints): its DALI state is what makes the position exactly resumable.
        try:
            start: ReadPosition | None = position
            while start is not None and start.epoch == position.epoch:
                reading = self._reading = self._reading_for(start)
                start = self._after(reading)
                if start is not None:  # build and fill the next reading's pipeline now
                    self._ahead = self._background.submit(self._open, start)
                for outputs in reading.iterator:
                    batch = outputs[0]
                    # where the graph put them
                    labels = ascii_labels(batch["labels"]) if self.spec.labels else None
                    reading.consumed += 1
                    yield batch["images"].to(self.spec.dtype), labels
        except (DamagedIndex, StorageError):
            self._epoch_read()
            raise
        except RuntimeError as err:
            self._epoch_read()
            # DALI's decoder error does not say which sample failed: find it before reporting. Where
            # every image decodes, the error is not the data's (DALI's memory, a bug): it goes on as
            # it is.
            culprit = self.table.first_undecodable(self.samples(position))
            if culprit is None:
                raise
            raise DamagedImage(
                f"DALI pipeline failed on {self.spec.split} shards ({culprit}): {err}\n"
                f"{_DAMAGED_HINT}"
            ) from err

    def _exact_state(self) -> dict[str, Any] | None:
        """DALI's own state where the last loop stopped mid-window (or where a restored state left
        it, before any read), with the batch its pipeline started at. At a window's edge there is
        none to keep: a new pipeline starts there, as it would have."""
        pending = self._exact
        if pending is not None and pending.position == self.position:  # restored, not read yet
            return {"dali": pending.dali, "start_batch": pending.reading_start.batch}
        reading = self._reading
        if (
            reading is None
            or reading.position != self.position
            or self.position.batch in (reading.start.batch, reading.end)
        ):
            return None
        return {"dali": reading.iterator.checkpoints()[0], "start_batch": reading.start.batch}

    def _restore_exactly(self, state: LoaderState) -> None:
        if state.exact is not None:
            start = replace(state.position, batch=state.exact["start_batch"])
            self._exact = _ExactState(state.position, start, state.exact["dali"])

    def _epoch_read(self) -> None:
        if self._reading is not None:
            self._reading.close()
            self._reading = None

    def close(self) -> None:
        super().close()
        ahead, self._ahead = self._ahead, None
        # a failed build holds nothing
        if ahead is not None and not ahead.cancel() and ahead.exception() is None:
            ahead.result().close()
        self._background.shutdown(wait=True, cancel_futures=True)
        self._stage.close()
        shutil.rmtree(self._scratch, ignore_errors=True)
