"""The data path's one error type for data that cannot serve what was asked: the message names the
file and the cause, and a training run refuses to start on it (exit status 2) rather than crash."""


class DataError(ValueError):
    """Shards, manifests or indexes that do not fit together, or do not fit the request (a batch
    larger than the data, unlabelled shards where labels are needed)."""


class DamagedIndex(RuntimeError):
    """A shard's index that does not match its manifest, found when a loader first reads that shard
    (a rank reads the indexes of its own share only): the run stops as on any damaged data (exit 5),
    resumable once rebuilt."""


class DamagedImage(RuntimeError):
    """A sample whose image does not decode, found while reading it: the run stops as on any damaged
    data (exit 5), naming the sample, resumable once the shard is rebuilt or replaced."""


class StorageError(RuntimeError):
    """An object store that did not serve a request after its bounded retries: an endpoint that does
    not answer, credentials it refuses, a bucket that does not exist. The message names the URL and
    the cause. Before training a refusal (exit 2); while training a failure (exit 5), resumable
    once the store answers again."""


class BuildError(Exception):
    """A problem with a shard build's inputs or OUT: reported in one line, nothing written."""
