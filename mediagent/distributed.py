"""Distributed training set-up under `accelerate launch`: the engine accelerate chose (DDP,
FSDP, DeepSpeed), FSDP on CPU processes, and the barrier between processes."""

from __future__ import annotations

import os

import torch

from mediagent.errors import UserError


def fsdp_on_cpu(accelerator) -> bool:
    """Turn accelerate's FSDP on for CPU processes launched with an FSDP config; True if it did.

    accelerate (1.15) enables its FSDP plugin for GPU-like devices only: launched on CPUs
    (ACCELERATE_USE_CPU=true) with configs/accelerate/fsdp.yaml it would silently train
    plain data-parallel. torch's FSDP2 runs on CPU over gloo, so the plugin is switched
    on here; wrapping, gathering and checkpoints are then accelerate's and transformers'
    own FSDP code, as on GPUs, which is what rehearsing a multi-GPU run on CPUs is for.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from mediagent import compat

    state = accelerator.state
    if (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"
        or state.distributed_type != DistributedType.MULTI_CPU
    ):
        return False
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* settings the launcher exported
    if plugin.fsdp_version != 2:
        raise UserError(
            "fsdp_version 1 cannot run on CPU processes (torch's FSDP1 needs a GPU): "
            "use configs/accelerate/fsdp.yaml as shipped (fsdp_version: 2)"
        )
    state.fsdp_plugin = plugin
    compat.set_distributed_type(state, DistributedType.FSDP)
    return True


def _engine(trainer) -> str:
    """accelerate's distributed type as a plain name: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED."""
    return str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]


def check_engine(trainer) -> None:
    """Fail when the launch asked for FSDP or DeepSpeed and accelerate quietly set up
    something else (it falls back to plain data parallel where it cannot run them)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        raise UserError(f"the accelerate config asks for FSDP, but accelerate set up {_engine(trainer)}")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not trainer.is_deepspeed_enabled:
        raise UserError(
            f"the accelerate config asks for DeepSpeed, but accelerate set up {_engine(trainer)} "
            "(accelerate turns DeepSpeed off under ACCELERATE_USE_CPU / --cpu: drop it, DeepSpeed "
            "finds the CPU itself)"
        )


def describe_parallelism(trainer) -> str:
    """What the launch actually did, e.g. 'FSDP2, 344 of 344 parameter tensors sharded over 2 processes'."""
    world_size = trainer.args.world_size
    if trainer.is_fsdp_enabled and trainer.accelerator.state.fsdp_plugin.fsdp_version == 2:
        from torch.distributed.tensor import DTensor

        params = list(trainer.model_wrapped.parameters())
        sharded = sum(isinstance(p, DTensor) for p in params)
        return f"FSDP2, {sharded} of {len(params)} parameter tensors sharded over {world_size} processes"
    if trainer.is_deepspeed_enabled:
        return f"DeepSpeed ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}, {world_size} processes"
    return f"{_engine(trainer)}, {world_size} process{'es' if world_size > 1 else ''}"


def barrier() -> None:
    """Wait for every process of a distributed run (nothing to wait for in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
