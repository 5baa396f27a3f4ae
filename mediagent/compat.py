"""Every use of a library's private API, in one place.

Each function below reaches into a library where its maintainers promise nothing (an
underscored name, an engine's internals, a naming scheme copied from its code). Its
docstring says what it relies on and why no public API does the job; ``CHECKED`` says which
installed versions it was checked against and how to see that the private thing is still
there. ``tests/test_compat.py`` fails, naming the function, when an installed version
leaves that range or the private name is gone: re-check the function, then widen its range.

Nothing heavy is imported here at module level (the CLI stays fast): each function imports
its library when called.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

# ---------------------------------------------------------------- accelerate


def set_distributed_type(state, value) -> None:
    """Switch an accelerate ``AcceleratorState`` (and every ``PartialState``) to ``value``.

    accelerate keeps the state shared by all its instances in ``PartialState._shared_state``;
    setting the attribute on one object alone would leave the process's ``PartialState`` on
    the old type. There is no public setter: accelerate decides the type at start-up.
    """
    from accelerate.state import PartialState

    state.distributed_type = PartialState._shared_state["distributed_type"] = value


def _probe_shared_state() -> bool:
    from accelerate.state import PartialState

    return isinstance(PartialState._shared_state, dict)


# ---------------------------------------------------------------- huggingface_hub


def hub_download_etag(local_dir: str | Path, filename: str) -> str | None:
    """The etag ``snapshot_download(local_dir=...)`` recorded for ``filename``, or None.

    The hub client writes it under ``local_dir/.cache/`` and reads it back only through the
    private ``huggingface_hub._local_folder.read_download_metadata``.
    """
    from huggingface_hub._local_folder import read_download_metadata

    meta = read_download_metadata(Path(local_dir), filename)
    return None if meta is None else meta.etag


def _probe_local_folder() -> bool:
    from huggingface_hub._local_folder import LocalDownloadFileMetadata, read_download_metadata

    return callable(read_download_metadata) and "etag" in LocalDownloadFileMetadata.__dataclass_fields__


# ---------------------------------------------------------------- vLLM


def engine_max_model_len(llm) -> int:
    """The context length vLLM's offline engine ``llm`` runs with (after its own defaults).

    ``LLM`` does not expose it; its engine's ``model_config`` holds it.
    """
    return llm.llm_engine.model_config.max_model_len


def shutdown_engine(llm) -> None:
    """Stop the engine core (its worker process, if any) of vLLM's offline ``llm`` now.

    ``LLM`` has no public close; without this the worker lives until interpreter exit.
    """
    llm.llm_engine.engine_core.shutdown()


def _probe_engine_core() -> bool:
    from vllm.v1.engine.core_client import EngineCoreClient
    from vllm.v1.engine.llm_engine import LLMEngine

    return "self.engine_core" in inspect.getsource(LLMEngine.__init__) and callable(EngineCoreClient.shutdown)


def _probe_model_config() -> bool:
    from vllm import LLM
    from vllm.v1.engine.llm_engine import LLMEngine

    return "self.llm_engine" in inspect.getsource(LLM.__init__) and "self.model_config" in inspect.getsource(
        LLMEngine.__init__
    )


CPU_LORA_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def cpu_lora_op_modules() -> tuple[ModuleType, ...] | None:
    """The namespaces holding vLLM's CPU LoRA ops (``CPU_LORA_OPS``), or None without them.

    First ``vllm.lora.ops.torch_ops.lora_ops`` (its ``sgmv_*`` call the ops through the
    module's globals), then the package and ``vllm.lora.punica_wrapper.punica_cpu``, which
    imported them by name: a replacement has to go into each (mediagent/vllm_lora_fix.py).
    """
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without these modules: nothing to patch
        return None
    return lora_ops, torch_ops, punica_cpu


def _probe_cpu_lora_ops() -> bool:
    modules = cpu_lora_op_modules()
    return modules is not None and all(hasattr(m, name) for m in modules[::2] for name in CPU_LORA_OPS)


# ---------------------------------------------------------------- modelscope_hub


def modelscope_download_module() -> ModuleType:
    """``modelscope_hub._download``, whose ``DOWNLOAD_RETRY_TIMES`` (read from
    ``MODELSCOPE_DOWNLOAD_MAX_RETRIES`` once, at its import) sets how often the client
    retries a file. Tests lower it on this module so that its backoff does not cost
    half a minute; the environment variable cannot, once the client is imported.
    """
    from modelscope_hub import _download

    return _download


def _probe_modelscope_retries() -> bool:
    return isinstance(modelscope_download_module().DOWNLOAD_RETRY_TIMES, int)


# ---------------------------------------------------------------- DVC


@dataclass(frozen=True)
class QueueState:
    """DVC's experiment queue of one repository: its working folder, queued, running and failed entries."""

    wdir: str
    queued: int
    active: int  # taken by a worker, not finished
    failed: frozenset[str]  # stash revisions of failed experiments


def dvc_queue_state(repo_root: str | Path | None = None) -> QueueState:
    """The state of the Celery experiment queue of the repository at ``repo_root`` (default:
    the one around the working directory), as `dvc queue status` reads it.

    DVC's Python API (``dvc.api``) has no queue; ``Repo.experiments.celery_queue`` is its internal object.
    """
    from dvc.repo import Repo

    with Repo(repo_root) as repo:
        queue = repo.experiments.celery_queue
        return QueueState(
            queue.wdir,
            len(list(queue.iter_queued())),
            len(list(queue.iter_active())),
            frozenset(result.entry.stash_rev for result in queue.iter_failed()),
        )


def _probe_celery_queue() -> bool:
    from dvc.repo.experiments import Experiments
    from dvc.repo.experiments.queue.base import QueueDoneResult, QueueEntry
    from dvc.repo.experiments.queue.celery import LocalCeleryQueue

    return (
        hasattr(Experiments, "celery_queue")
        and all(hasattr(LocalCeleryQueue, name) for name in ("iter_queued", "iter_active", "iter_failed", "wdir"))
        and "entry" in QueueDoneResult._fields
        and "stash_rev" in QueueEntry.__dataclass_fields__
    )


def dvc_worker_name(wdir: str, num: int) -> str:
    """The node name `dvc queue start` gives its queue worker ``num`` (so `dvc queue stop` sees ours).

    Copied from ``LocalCeleryQueue._spawn_worker``, which builds it inline.
    """
    return f"dvc-exp-{hashlib.sha256(wdir.encode('utf-8')).hexdigest()[:6]}-{num}@localhost"


def _probe_worker_name() -> bool:
    from dvc.repo.experiments.queue.celery import LocalCeleryQueue

    source = inspect.getsource(LocalCeleryQueue._spawn_worker)
    return (
        'hashlib.sha256(self.wdir.encode("utf-8")).hexdigest()[:6]' in source
        and 'f"dvc-exp-{wdir_hash}-{num}@localhost"' in source
    )


def dvc_queue_clean(repo_root: str | Path | None = None) -> None:
    """Clear the spent messages (replies, control commands) out of the queue's broker folder.

    What `dvc queue start`'s first worker does as it exits (``--clean``). Done here once every
    worker has exited instead: a worker that cleans while another is still up can delete the
    shutdown command meant for it, and that worker never exits. ``celery_queue.celery`` is
    DVC's internal Celery app (dvc-task's ``FSApp``); nothing public cleans it.
    """
    from dvc.repo import Repo

    with Repo(repo_root) as repo:
        repo.experiments.celery_queue.celery.clean()


def _probe_queue_clean() -> bool:
    from dvc_task.app.filesystem import FSApp

    return callable(getattr(FSApp, "clean", None))


def experiment_refs(scm) -> list[tuple[str, str, str]]:
    """(name, git ref, baseline commit) of every experiment ref of ``scm`` (a ``dvc.scm.SCM``).

    What `dvc exp list -A` reads, through DVC's internal ``exp_refs``, without the repository
    lock that its public commands take (a running `dvc exp run` holds it for hours).
    """
    from dvc.repo.experiments.utils import exp_refs

    return [(ref.name, str(ref), ref.baseline_sha) for ref in exp_refs(scm)]


def _probe_exp_refs() -> bool:
    from dvc.repo.experiments.refs import ExpRefInfo
    from dvc.repo.experiments.utils import exp_refs

    ref = ExpRefInfo.from_ref(str(ExpRefInfo("ab" * 20, "exp-1")))  # what exp_refs yields for a ref
    return callable(exp_refs) and (ref.name, ref.baseline_sha) == ("exp-1", "ab" * 20)


# ---------------------------------------------------------------- the table the test reads


@dataclass(frozen=True)
class Checked:
    """A compat function's library (import name), the versions it was checked against (a
    ``packaging`` specifier), and a probe that is True while the private thing is there."""

    package: str
    versions: str
    probe: Callable[[], Any]


CHECKED: dict[str, Checked] = {
    "set_distributed_type": Checked("accelerate", ">=1.15,<1.16", _probe_shared_state),
    "hub_download_etag": Checked("huggingface_hub", ">=2.4,<2.5", _probe_local_folder),
    "engine_max_model_len": Checked("vllm", ">=0.32,<0.33", _probe_model_config),
    "shutdown_engine": Checked("vllm", ">=0.32,<0.33", _probe_engine_core),
    "cpu_lora_op_modules": Checked("vllm", ">=0.32,<0.33", _probe_cpu_lora_ops),
    "modelscope_download_module": Checked("modelscope_hub", ">=0.5,<0.6", _probe_modelscope_retries),
    "dvc_queue_state": Checked("dvc", ">=3.67,<3.68", _probe_celery_queue),
    "dvc_queue_clean": Checked("dvc", ">=3.67,<3.68", _probe_queue_clean),
    "dvc_worker_name": Checked("dvc", ">=3.67,<3.68", _probe_worker_name),
    "experiment_refs": Checked("dvc", ">=3.67,<3.68", _probe_exp_refs),
}
