"""Whole shards from a bucket on local disk, for the DALI readings that read them.

DALI's reader asks for each image of a tar with its own request, one after another: from a bucket
every image would pay a request's latency (20 ms a request is 50 images/s, `bench storage`). A
reading's shards are therefore fetched whole first, each in a few large ranged GETs, while the
reading before it runs; DALI then reads the copies at local-disk speed. A copy stays while a reading
holds it (a shard at a window's edge is read by two) and is removed when none does. Local shards are
read where they are.
"""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pipeline.storage as storage

# Shards fetched at once; each in up to storage.PARALLEL_PARTS ranged GETs.
PARALLEL_SHARDS = 4


class ShardStage:
    """Local copies of remote shards under `folder`, counted by the readings holding them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._holders: Counter[str] = Counter()
        self._copies: dict[str, Future[Path]] = {}
        self._fetching = ThreadPoolExecutor(PARALLEL_SHARDS, thread_name_prefix="maeflow-stage")

    def hold(self, tars: Sequence[str]) -> list[str]:
        """Where DALI reads each of `tars`: its local copy (fetched now where no reading holds one),
        or the tar itself where it is on a file system. Each call is undone by one `release`."""
        remote = sorted({tar for tar in tars if storage.is_remote(tar)})
        with self._lock:
            for tar in remote:
                self._holders[tar] += 1
                if tar not in self._copies:
                    self._copies[tar] = self._fetching.submit(self._fetch, tar)
            waiting = {tar: self._copies[tar] for tar in remote}
        try:
            copies = {tar: str(copy.result()) for tar, copy in waiting.items()}
        except BaseException:
            self.release(tars)
            raise
        return [copies.get(tar, tar) for tar in tars]

    def release(self, tars: Sequence[str]) -> None:
        """A reading no longer needs `tars`: copies no other reading holds are removed."""
        with self._lock:
            for tar in {tar for tar in tars if storage.is_remote(tar)}:
                self._holders[tar] -= 1
                if self._holders[tar] == 0:
                    del self._holders[tar]
                    self._copies.pop(tar).add_done_callback(_remove)

    def held(self) -> list[str]:
        """The remote shards that have a local copy now (or one on its way)."""
        with self._lock:
            return sorted(self._copies)

    def close(self) -> None:
        self._fetching.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _fetch(self, tar: str) -> Path:
        # Named by the whole URL: two prefixes may hold tars of one name.
        local = self.folder / tar[len(storage.SCHEME):].replace("/", "%")
        storage.download(tar, local)
        return local


def _remove(copy: Future[Path]) -> None:
    if not copy.cancelled() and copy.exception() is None:
        copy.result().unlink(missing_ok=True)
