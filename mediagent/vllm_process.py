"""Running the vLLM server as a supervised child of ``mediagent serve``: a free port first,
then the child in its own process group, ``/health`` until ready, Ctrl-C/SIGTERM forwarded,
and the whole group killed on exit so no engine or worker process outlives the command.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from mediagent.vllm_command import ServeError

# The serve command's logger: its start/stop lines read as they did when this lived in the command.
log = logging.getLogger("mediagent.commands.serve")

STOP_GRACE_S = 30  # vLLM drains requests and stops its engine on SIGTERM; then SIGKILL


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}): pass another --port / PORT=") from exc


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> float:
    """Poll ``/health`` (no auth needed) until 200; fail if vLLM exits or times out."""
    start = time.monotonic()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    while True:
        code = proc.poll()
        if code is not None:
            raise ServeError(f"vLLM exited with code {code} before it was ready; its log is above")
        try:
            with opener.open(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() - start > timeout_s:
            raise ServeError(f"vLLM not ready after {timeout_s:.0f} s (serve.startup_timeout_s)")
        time.sleep(1.0)


class _Stop(BaseException):
    """Raised from the signal handler so that any blocking wait unwinds to cleanup."""


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_group(proc: subprocess.Popen, known: list, grace_s: float = STOP_GRACE_S) -> None:
    """Stop vLLM: SIGTERM to its leader (graceful), then SIGKILL to whatever is left.

    ``known`` are descendants seen earlier: one that left the process group or was
    orphaned is still found and killed.
    """
    import psutil

    procs = {p.pid: p for p in [*known, *_descendants(proc.pid)]}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("vLLM did not stop within %d s; killing it", grace_s)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5 if proc.poll() is not None else 0)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    if proc.poll() is None:
        proc.wait(timeout=5)


def run_server(
    cmd: list[str], env: dict[str, str], url: str, timeout_s: float, on_ready: Callable[[float], None]
) -> int:
    """Run vLLM until it exits or we are told to stop; return its exit code (0 when stopped)."""
    known: list = []
    proc: subprocess.Popen | None = None
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.getsignal(s) for s in stops}

    def _raise(signum, _frame):
        raise _Stop(signum)

    def cleanup() -> None:
        if proc is not None:
            stop_group(proc, known)

    # Handlers first: a signal that arrived right after the start would otherwise kill us
    # and orphan vLLM. vLLM gets its own session, so a terminal's Ctrl-C reaches it once,
    # through stop_group, instead of racing in its engine and worker processes.
    for s in stops:
        signal.signal(s, _raise)
    atexit.register(cleanup)
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        on_ready(wait_ready(proc, url, timeout_s))
        known.extend(_descendants(proc.pid))
        return proc.wait()
    except (_Stop, KeyboardInterrupt):
        log.info("stopping vLLM ...")
        return 0
    finally:
        for s in stops:  # a second Ctrl-C must not cut the cleanup short (it is bounded)
            signal.signal(s, signal.SIG_IGN)
        cleanup()
        atexit.unregister(cleanup)
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.info("vLLM stopped")
