"""`mediagent sweep --gpus ...` (`make sweep GPUS=...`): the queued DVC experiments, several
at once, each on its own GPU (or group of GPUs).

`dvc queue start -j N` starts N queue workers that all see every GPU, so N experiments
would crowd onto the same device. This starts DVC's own queue workers
(`dvc exp queue-worker`, the process `dvc queue start` spawns, with the same names) in the
foreground, one per device group, each with its own ``CUDA_VISIBLE_DEVICES``; each takes
the next queued experiment until the queue is empty, then exits (a worker that misses its
shutdown command is stopped a minute after the last experiment ends). Results land in
`dvc exp show` as with `dvc queue start`; the train stage records its devices in
``metrics/train.json`` (``devices``).

    dvc exp run --queue -S lora.r=8
    dvc exp run --queue -S lora.r=32
    mediagent sweep --gpus 0,1          # two workers: GPU 0 and GPU 1
    mediagent sweep --gpus 0+1,2+3      # two workers with two GPUs each (launch.config)

Reads  the DVC experiment queue of the current repository.
Writes nothing itself; each experiment is a `dvc exp run` of the pipeline.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import click

from mediagent import compat
from mediagent.errors import UserError, setup_logging

log = logging.getLogger(__name__)


def device_groups(spec: str) -> list[str]:
    """'0,1,2,3' -> ['0', '1', '2', '3']; '0+1,2+3' -> ['0,1', '2,3'] (CUDA_VISIBLE_DEVICES values)."""
    groups = [[d.strip() for d in group.split("+")] for group in spec.split(",")]
    devices = [d for group in groups for d in group]
    if not devices or not all(d.isdigit() for d in devices):
        raise UserError(
            f"--gpus {spec!r}: give device numbers, ',' between workers and '+' within one "
            "worker's group, e.g. 0,1,2,3 or 0+1,2+3"
        )
    if len(set(devices)) != len(devices):
        raise UserError(f"--gpus {spec!r}: a device is given to two workers")
    return [",".join(group) for group in groups]


# DVC's workers stop themselves 10 s after the queue empties, by one shutdown command through
# the broker; a command that is lost (expired, or cleaned away by another worker) leaves the
# worker up for good. A worker still up this long after the last experiment ended is stopped.
IDLE_GRACE_S = 60.0
POLL_S = 5.0


def stop_idle_workers(workers: list[subprocess.Popen], queue_state, grace_s: float, poll_s: float) -> set[int]:
    """Wait for ``workers``; once ``queue_state()`` has nothing queued or running for ``grace_s``,
    stop (SIGTERM: Celery's warm shutdown) those still up. Returns the indices of those stopped."""
    stopped: set[int] = set()
    idle_since = None
    while any(w.poll() is None for w in workers):
        time.sleep(poll_s)
        state = queue_state()
        if state.queued or state.active:
            idle_since = None
            continue
        idle_since = idle_since or time.monotonic()
        if time.monotonic() - idle_since < grace_s:
            continue
        for i, worker in enumerate(workers):
            if worker.poll() is None and i not in stopped:
                log.warning("worker %d is still up %.0f s after the queue emptied: stopping it", i + 1, grace_s)
                worker.terminate()
                stopped.add(i)
    return stopped


def run_sweep(groups: list[str], grace_s: float = IDLE_GRACE_S, poll_s: float = POLL_S) -> None:
    before = compat.dvc_queue_state()
    if not before.queued:
        raise UserError("no queued experiments: queue them first with `dvc exp run --queue -S <param>=<value>`")
    log.info(
        "%d queued experiments, %d workers: %s",
        before.queued,
        len(groups),
        ", ".join(f"CUDA_VISIBLE_DEVICES={g}" for g in groups),
    )
    # no worker gets `--clean` (as `dvc queue start`'s first does): the broker is cleaned once
    # all have exited, so no worker deletes a shutdown command meant for another
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "dvc", "exp", "queue-worker", compat.dvc_worker_name(before.wdir, num)],
            env={**os.environ, "CUDA_VISIBLE_DEVICES": devices},
        )
        for num, devices in enumerate(groups, start=1)
    ]
    stopped = stop_idle_workers(workers, compat.dvc_queue_state, grace_s, poll_s)
    codes = [w.wait() for w in workers]
    compat.dvc_queue_clean()
    failed = compat.dvc_queue_state().failed - before.failed
    if failed or any(code for i, code in enumerate(codes) if i not in stopped):
        raise UserError(
            f"sweep: {len(failed)} experiment(s) failed, worker exit codes {codes}; "
            "see `dvc queue status` and `dvc queue logs <name>`"
        )
    log.info("sweep done: see `dvc exp show`")


@click.command()
@click.option("--gpus", required=True, help="Devices per worker: 0,1,2,3 (one each) or 0+1,2+3 (groups).")
def command(gpus: str) -> None:
    """Run the queued experiments in parallel, one GPU (or group) per DVC queue worker."""
    setup_logging()
    run_sweep(device_groups(gpus))
