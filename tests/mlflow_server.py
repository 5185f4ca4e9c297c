"""A real ``mlflow server`` for the tests that check what MLflow serves (REST, artifacts, the UI)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow import MlflowClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(command: list[str], url: str, what: str = "mlflow server") -> Iterator[str]:
    """Run ``command`` (an MLflow server or UI) in its own process group until ``url/health``
    answers (150 s at most); yield ``url``; then stop the group (the server and its workers)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 150
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{what} did not start: {' '.join(command)}") from None
                time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def mlflow_server(backend: str, artifacts: Path) -> Iterator[str]:
    """``mlflow server`` on a free loopback port over the store ``backend`` (migrated first: starting
    is faster) with its artifacts in ``artifacts``; yields its URL, stops it (its process group)."""
    port = free_port()
    MlflowClient(backend).search_experiments()  # create (migrate) the store if nothing did yet
    with serve([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
                str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
               f"http://127.0.0.1:{port}") as uri:
        yield uri


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return dict(json.loads(r.read()))


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return dict(json.loads(r.read()))
