"""A local S3-compatible server for measurements and tests: moto's server (pure Python, from PyPI,
speaking S3's HTTP API with ranged GETs, multipart uploads and paginated listings) in its own
process on 127.0.0.1, with an optional delay added to every request, as a cloud bucket has, and a
count of the requests and bytes it served.

Its own process, not a thread: DALI's reader calls S3 from C++ while holding the interpreter's lock,
so a server sharing that interpreter could never answer it.

    python -m bench.s3_server --port 9000 --delay-ms 20
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

STATS_PATH = "/__maeflow_stats__"  # not a bucket name S3 allows (two leading underscores)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "maeflow-test", "AWS_SECRET_ACCESS_KEY": "maeflow-test",
               "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


class _Counting:
    """WSGI middleware: sleeps `delay_s` before each request, counts requests by method and the
    bytes of the responses' bodies; GET STATS_PATH returns the counts, DELETE resets them, PUT
    ?delay_ms=D sets the delay (DALI's S3 client is made once per process, with the endpoint it
    first saw: a measurement changes the delay, not the server)."""

    def __init__(self, app: Any, delay_s: float) -> None:
        self.app, self.delay_s = app, delay_s
        self.requests: Counter[str] = Counter()
        self.bytes_out = 0
        self._lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Any) -> Any:
        if environ["PATH_INFO"] == STATS_PATH:
            with self._lock:
                if environ["REQUEST_METHOD"] == "DELETE":
                    self.requests.clear()
                    self.bytes_out = 0
                if environ["REQUEST_METHOD"] == "PUT":
                    self.delay_s = float(parse_qs(environ["QUERY_STRING"])["delay_ms"][0]) / 1000
                body = json.dumps({"requests": dict(self.requests), "bytes": self.bytes_out})
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body.encode()]
        if self.delay_s:
            time.sleep(self.delay_s)
        chunks = list(self.app(environ, start_response))
        with self._lock:
            self.requests[environ["REQUEST_METHOD"]] += 1
            self.bytes_out += sum(len(c) for c in chunks)
        return chunks


def serve(port: int, delay_ms: float) -> None:
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    app = _Counting(DomainDispatcherApplication(create_backend_app), delay_ms / 1000)
    run_simple("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


@dataclass(frozen=True)
class LocalS3:
    """A running local server: `env` points the AWS tools (boto3, DALI's SDK) at it."""

    endpoint: str
    process: subprocess.Popen

    def stop(self) -> None:
        """Ends the server now (what a bucket that stops answering looks like to a client)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, **CREDENTIALS}

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """{"requests": {method: count}, "bytes": body bytes served} since the last reset."""
        return self._control("DELETE" if reset else "GET")

    def set_delay(self, delay_ms: float) -> None:
        """The delay added to every request from now on."""
        self._control("PUT", f"?delay_ms={delay_ms}")

    def _control(self, method: str, query: str = "") -> dict[str, Any]:
        request = urllib.request.Request(self.endpoint + STATS_PATH + query, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_s3(
    delay_ms: float = 0, start_timeout_s: float = 60, env: dict[str, str] | None = None
) -> Iterator[LocalS3]:
    """Starts the server, waits until it answers, and stops it on leaving. `env`: the server's own
    environment on top of this one's (moto's settings)."""
    port = _free_port()
    # The server logs a line per request: to a file, since a pipe nobody reads fills and stops it.
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "bench.s3_server", "--port", str(port),
             "--delay-ms", str(delay_ms)],
            stdout=subprocess.DEVNULL, stderr=log,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            env={**os.environ, **(env or {})},
        )
        local = LocalS3(f"http://127.0.0.1:{port}", server)
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                try:
                    local.stats()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(
                            f"the local S3 server did not start: {log.read().decode()[-2000:]}"
                        ) from None
                    time.sleep(0.1)
            yield local
        finally:
            local.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0, help="added before every request")
    args = parser.parse_args()
    serve(args.port, args.delay_ms)
