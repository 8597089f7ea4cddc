"""The temporary Prefect API server that a flow command runs against when no ``PREFECT_API_URL`` is set.

Prefect would start one itself, in the command's own process group: Ctrl-C at a terminal then stops the server
before the flow, and the flow spends its last seconds failing to report to it. ``flow_server()`` starts the
same API app (uvicorn, Prefect's factory) in a session of its own, so an interrupt reaches the flow and its
stages first, lets the flow record how it ended, and stops the server after it, whatever ended the flow. On
Linux the server also dies with the command if the command is killed outright (SIGKILL): nothing is left
running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

from flows.repo import CHILD_ENV, FlowError

_STARTUP_VARIABLE = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process, before it runs: ask Linux to send it SIGTERM when its parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def flow_server() -> Iterator[str | None]:
    """Run the body against a temporary Prefect API server (its URL is yielded), or against the one that
    ``PREFECT_API_URL`` names (None is yielded, nothing is started)."""
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    try:
        limit = float(os.environ.get(_STARTUP_VARIABLE) or CHILD_ENV[_STARTUP_VARIABLE])
        deadline = time.monotonic() + limit
        while not _healthy(url):
            if proc.poll() is not None:
                raise FlowError(f"the temporary Prefect server exited with code {proc.returncode} before it "
                                "answered (its error is printed above)",
                                "check that the project is installed (pip install -e .), or set PREFECT_API_URL to "
                                "a running Prefect server")
            if time.monotonic() > deadline:
                raise FlowError(f"the temporary Prefect server did not answer within {limit:.0f} s",
                                f"retry on a less loaded machine, raise {_STARTUP_VARIABLE}, or set PREFECT_API_URL "
                                "to a running Prefect server")
            time.sleep(0.2)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        os.environ["PREFECT_API_URL"] = url  # the flow's own child processes (Dask workers) use it too
        try:
            with temporary_settings({PREFECT_API_URL: url}):
                try:
                    yield url
                finally:
                    _drain()
        finally:
            os.environ.pop("PREFECT_API_URL", None)
    finally:
        _stop(proc)


def _drain(timeout: float = 5.0) -> None:
    """Send the logs and events that Prefect's background workers still hold, while the server still answers
    (else they fail at exit, printing ``Error logging to API``)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


def _stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
