"""`mediagent sweep`'s own logic, without running experiments: device groups, and a worker
that outlives an empty queue (it missed DVC's one shutdown command) is stopped rather than
waited on for ever. The full sweep, two real queue workers running two experiments at
once, is tests/test_distributed.py::test_sweep_runs_queued_experiments_at_once_one_device_each."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from mediagent import compat
from mediagent.commands.sweep import device_groups, stop_idle_workers
from mediagent.errors import UserError
from tests.test_pipeline import git_env, run_ok

HANG = [sys.executable, "-c", "import time; time.sleep(120)"]  # a worker that never hears its shutdown
EXIT = [sys.executable, "-c", "pass"]  # a worker that did


def test_device_groups_per_worker():
    assert device_groups("0,1,2,3") == ["0", "1", "2", "3"]
    assert device_groups("0+1, 2+3") == ["0,1", "2,3"]
    with pytest.raises(UserError, match="a device is given to two workers"):
        device_groups("0,0+1")
    with pytest.raises(UserError, match="give device numbers"):
        device_groups("gpu0")


def test_a_worker_left_up_after_the_queue_empties_is_stopped(tmp_path):
    env = git_env()
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        run_ok(cmd, tmp_path, env)
    state = compat.dvc_queue_state(tmp_path)  # DVC's own reading of an empty queue
    assert (state.queued, state.active) == (0, 0)

    workers = [subprocess.Popen(HANG), subprocess.Popen(EXIT)]
    started = time.monotonic()
    stopped = stop_idle_workers(workers, lambda: compat.dvc_queue_state(tmp_path), grace_s=1.0, poll_s=0.2)
    assert stopped == {0}
    assert workers[0].wait(timeout=10) != 0 and workers[1].wait(timeout=10) == 0
    assert time.monotonic() - started < 60


def test_no_worker_is_stopped_while_an_experiment_runs():
    worker = subprocess.Popen(HANG)
    running = compat.QueueState("wdir", queued=0, active=1, failed=frozenset())
    polls = []

    def queue_state():
        polls.append(time.monotonic())
        if len(polls) > 15:  # the experiment "ends" after 15 polls (3 s, three graces)
            return compat.QueueState("wdir", queued=0, active=0, failed=frozenset())
        return running

    try:
        stopped = stop_idle_workers([worker], queue_state, grace_s=1.0, poll_s=0.2)
    finally:
        worker.kill()
    assert stopped == {0}
    assert len(polls) >= 15 + 5  # alive through every busy poll, then a whole grace of idle ones
