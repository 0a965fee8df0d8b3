"""The DALI backend's life cycle: one pipeline (`pipeline.dali_graph`) per rank and epoch over index
files that list exactly this rank's samples in the epoch plan's order, checkpointable mid-epoch, and
the reading cache around it.

DALI reads the members at the offsets an index names, in the index's order, so no shuffle buffer is
needed and nothing leaks from one epoch into the next. While an epoch runs, the next epoch's
pipeline is built and starts decoding in a background thread: at the boundary its first batches are
ready.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia.dali import Pipeline
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipeline.dali_graph import HW_DECODER_LOAD, PREFETCH_QUEUE_DEPTH, ascii_labels, image_pipeline
from pipeline.errors import DamagedImage, DamagedIndex
from pipeline.loader_base import Batch, Loader, LoaderSpec
from pipeline.loader_state import LoaderState, ReadPosition
from pipeline.wds_format import INDEX_VERSION

_DAMAGED_HINT = (
    "the shards are damaged: find the bad shard with `python -m pipeline.build_shards --verify DIR`"
)


@dataclass
class _Reading:
    """One pipeline reading this rank's samples of an epoch from `start` on, and the index files it
    reads."""

    start: ReadPosition
    iterator: DALIGenericIterator
    pipeline: Pipeline
    folder: Path
    consumed: int = 0  # batches handed out so far

    @property
    def position(self) -> ReadPosition:
        """The position its next batch continues from."""
        return replace(self.start, batch=self.start.batch + self.consumed)

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


@dataclass(frozen=True)
class _ExactState:
    """DALI's own state at `position` (its random generators mid-epoch), from a checkpoint: it
    reproduces the rest of the epoch's crops exactly when the pipeline that started at
    `reading_start` is rebuilt with it."""

    position: ReadPosition
    reading_start: ReadPosition
    dali: str


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
        self._background = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="maeflow-next-epoch"
        )
        weakref.finalize(self, self._background.shutdown, wait=False, cancel_futures=True)
        # Pipelines, not position: each knows the position it continues from, and is used only
        # there.
        self._reading: _Reading | None = None  # the pipeline the last loop read from
        # the next epoch's, being built in the background
        self._next_epoch: Future[_Reading] | None = None
        # a checkpoint's DALI state, for the position it was taken at
        self._exact: _ExactState | None = None

    def _open(self, start: ReadPosition, checkpoint: str | None = None) -> _Reading:
        """A pipeline over this rank's samples from `start` on, its first batches decoding."""
        spec = self.spec
        samples = self.samples(start)[start.batch * spec.local_batch_size:]
        folder = Path(tempfile.mkdtemp(prefix=f"epoch{start.epoch:05d}-", dir=self._scratch))
        tars, indexes = self._write_indexes(samples, folder)
        pipe = image_pipeline(
            spec,
            tars,
            indexes,
            self.hw_decoder_load,
            batch_size=spec.local_batch_size,
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
        return _Reading(start, iterator, pipe, folder)

    def _write_indexes(self, samples: np.ndarray, folder: Path) -> tuple[list[str], list[str]]:
        """One (tar, index) pair per run of consecutive samples from the same shard."""
        entries = self.table.entries(samples)
        shards = entries.rows[:, 0]
        lines = entries.index_lines()
        tars, indexes = [], []
        for number, run in enumerate(
            np.split(np.arange(len(samples)), np.flatnonzero(np.diff(shards)) + 1)
        ):
            index = folder / f"{number:06d}.idx"
            index.write_text(
                f"{INDEX_VERSION} {len(run)}\n" + "\n".join(lines[run[0] : run[-1] + 1]) + "\n"
            )
            tars.append(entries.tars[int(shards[run[0]])])
            indexes.append(str(index))
        return tars, indexes

    def _reading_for(self, position: ReadPosition) -> _Reading:
        """The pipeline that continues at `position`; every other one is closed. The cases, in
        order:
        1. a checkpoint's DALI state for exactly this position: the interrupted reading, rebuilt
        with it;
        2. the pipeline the last loop stopped in mid-epoch, when it stopped here;
        3. the next epoch's, built ahead, at the start of that epoch;
        4. a new pipeline."""
        exact, self._exact = self._exact, None
        held = [
            r for r in (self._reading, self._next_epoch.result() if self._next_epoch else None) if r
        ]
        self._reading = self._next_epoch = None
        if exact is not None and exact.position == position:
            chosen = self._open(exact.reading_start, exact.dali)
            chosen.consumed = position.batch - exact.reading_start.batch
        else:
            chosen = next((r for r in held if r.position == position), None) or self._open(position)
        for reading in held:
            if reading is not chosen:
                reading.close()
        return chosen

    def _epoch_batches(self, position: ReadPosition) -> Iterator[Batch]:
        # The reading outlives this generator when a consumer stops mid-epoch (a training loop that
        # ends or checkpoints): its DALI state is what makes the position exactly resumable.
        try:
            reading = self._reading = self._reading_for(position)
            if self.spec.train:  # build and fill the next epoch's pipeline now
                self._next_epoch = self._background.submit(
                    self._open, ReadPosition(position.epoch + 1)
                )
            for outputs in reading.iterator:
                batch = outputs[0]
                # where the graph put them
                labels = ascii_labels(batch["labels"]) if self.spec.labels else None
                reading.consumed += 1
                yield batch["images"].to(self.spec.dtype), labels
        except DamagedIndex:
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
        """DALI's own state where the last loop stopped mid-epoch, with the batch its pipeline
        started at."""
        reading = self._reading
        if reading is None or not self.position.batch or reading.position != self.position:
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
        ahead, self._next_epoch = self._next_epoch, None
        # a failed build holds nothing
        if ahead is not None and not ahead.cancel() and ahead.exception() is None:
            ahead.result().close()
        self._background.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._scratch, ignore_errors=True)
