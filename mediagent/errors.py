"""One way to fail, one logging setup.

An expected failure (a bad or missing param, a missing base or adapter, a bad input file,
a server that is not there) raises :class:`UserError` or a subclass. Entry points run
through :func:`run`, which turns it into exit status 1 and one last stderr line
``error: <what> — <what to do>``, without a traceback. Anything else is a bug and keeps
its traceback. ``MEDIAGENT_DEBUG=1`` (or ``mediagent --debug``) shows the traceback of
expected errors too.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
# Libraries that log at INFO on every import or request; their warnings still show.
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "filelock", "datasets", "torch.distributed")
# Warnings that are not problems: bitsandbytes (imported by peft) says at every import on an
# AVX-512 CPU that an optional, downloadable kernel is missing; its own fallback runs instead.
SILENT_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


class UserError(Exception):
    """An expected failure that the user fixes: the message names the thing and what to do."""


class ProcessError(UserError, ValueError):
    """The input data cannot be processed; the message names the file/column/row and the fix."""


def debug_enabled() -> bool:
    return os.environ.get("MEDIAGENT_DEBUG", "") not in ("", "0")


def setup_logging(level: int = logging.INFO) -> None:
    """The project's one logging setup (idempotent: the first call wins, as basicConfig does)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in SILENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _clip(text: str, width: int = 120) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def fail(message: str) -> NoReturn:
    """Print an expected error as the last stderr line and exit 1.

    A multi-line message prints its detail first, so the final line is always the
    ``error:`` line; a short list of problems (``- x``) is repeated on it, so that line
    alone names them.
    """
    head, *detail = str(message).strip().splitlines() or ["failed"]
    detail = [line for line in detail if line.strip()]
    sys.stdout.flush()
    last = head
    if detail:
        print("\n".join(detail), file=sys.stderr)
        items = [_clip(line.strip()[2:]) for line in detail if line.strip().startswith("- ")]
        if len(items) == len(detail) and len(items) <= 5:
            last = f"{head.rstrip(':')}: {'; '.join(items)}"
        else:
            last = f"{head.rstrip(':')} (details above)"
    print(f"error: {last}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(fn: Callable[[], Any]) -> Any:
    """Call fn; expected errors become :func:`fail`, unexpected ones keep their traceback."""
    try:
        return fn()
    except UserError as exc:
        if debug_enabled():
            raise
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted")


def run_stage(main: Callable[[Any], None]) -> None:
    """``python -m mediagent.pipeline.<stage>``: log, load params.yaml, run ``main(params)``."""
    from mediagent.params import load_params  # params imports this module

    setup_logging()
    run(lambda: main(load_params()))
