"""TrainingArguments and peft.LoraConfig from params, with every other setting chosen here.

A transformers or peft upgrade must not change a run silently (a new default would not
show in params.yaml, dvc.lock or lineage.json), so every field of TrainingArguments and
LoraConfig that can change the adapter or its metrics gets its value from one of:

- a param of the same name in params.yaml's ``train:`` / ``lora:`` section;
- ``DERIVED_TRAINING``: computed from params, the memory plan, the dtype or the machine;
- ``FIXED_TRAINING`` / ``FIXED_LORA``: a value fixed on purpose, with the reason.

Fields that cannot change the adapter or its metrics (logging, paths, hub, reporting, and
options of features that are off) are listed in ``NO_EFFECT_TRAINING`` /
``NO_EFFECT_LORA``, with the reason. tests/test_params_complete.py fails when a field of
the installed versions is in none of these lists, naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from mediagent.params import LoraParams, TrainParams

# field -> (value, why). Passed explicitly, so the library's default is never what decides.
FIXED_TRAINING: dict[str, tuple[Any, str]] = {
    "optim_args": (None, "the optimizer's settings are the train.adam_* and train.weight_decay params"),
    "optim_target_modules": (None, "only GaLore/APOLLO optimizers use it; train.optim offers none of them"),
    "average_tokens_across_devices": (
        True,
        "the loss is the mean over the learned tokens of all processes, "
        "so 1 or N processes train the same adapter (see launch:)",
    ),
    "label_smoothing_factor": (0.0, "plain cross-entropy; the chunked loss returns no logits to smooth"),
    "bf16_full_eval": (False, "evaluation runs the model as trained, so eval_loss compares with train_loss"),
    "fp16_full_eval": (False, "as bf16_full_eval"),
    "tf32": (False, "float32 matmuls stay float32 on Ampere+ GPUs (no effect on CPUs)"),
    "gradient_checkpointing_kwargs": (
        {"use_reentrant": False},
        "non-reentrant checkpointing needs no grad on the (frozen) inputs",
    ),
    "torch_compile": (False, "compiling costs minutes at start-up and reorders float sums"),
    "use_liger_kernel": (False, "Liger's kernels are Triton (GPU only); train.loss=chunked saves the memory anywhere"),
    "neftune_noise_alpha": (None, "no noise on the input embeddings (NEFTune); make it a train param to try it"),
    "auto_find_batch_size": (
        False,
        "it halves the batch on OOM without rescaling gradient accumulation (the "
        "effective batch changes silently); the memory plan decides before loading",
    ),
    "logging_nan_inf_filter": (False, "a nan/inf step loss shows in the logs and train_loss, not hidden"),
    "eval_strategy": ("steps", "evaluate every train.eval_steps and at the end"),
    "eval_delay": (0, "the first evaluation is at step 0 (eval_on_start: eval_loss_step0)"),
    # main() turns it off for a resumed run: the restored log history holds step 0's evaluation
    "eval_on_start": (True, "eval_loss_step0, evaluated inside train() so FSDP2 wraps model and optimizer together"),
    "prediction_loss_only": (True, "evaluation needs eval_loss only (the chunked loss returns no logits)"),
    "save_strategy": ("steps", "a checkpoint every train.save_steps to resume from"),
    "save_only_model": (
        False,
        "checkpoints keep optimizer, scheduler and RNG states: a resumed run ends "
        "with the adapter an uninterrupted one would",
    ),
    "load_best_model_at_end": (False, "the adapter is the last step's; the val split is watched, not used to pick"),
    "ignore_data_skip": (False, "a resumed run skips the batches it already trained on"),
    "full_determinism": (
        False,
        "deterministic-only kernels are slower on GPUs; seeds and the epoch-seeded sampler fix the batch order",
    ),
    "dataloader_drop_last": (False, "the last, partial batch is trained on too"),
    "dataloader_num_workers": (0, "batches built in the training process: their order cannot depend on timing"),
    "dataloader_in_order": (True, "batches in the sampler's order"),
    "remove_unused_columns": (False, "the features hold exactly input_ids and labels"),
    "label_names": (["labels"], "PeftModel's forward hides them; eval_loss needs them"),
    "ddp_find_unused_parameters": (False, "every LoRA weight gets a gradient each step"),
}

# field -> how its value is computed (training_kwargs below).
DERIVED_TRAINING: dict[str, str] = {
    "output_dir": "train.checkpoint_dir (train.output_dir is the adapter, which the stage publishes itself)",
    "per_device_train_batch_size": "the memory plan: train.micro_batch_size (auto: the largest that fits)",
    "gradient_accumulation_steps": "the memory plan: train.gradient_accumulation_steps x the micro-batches per batch",
    "gradient_checkpointing": "the memory plan: train.gradient_checkpointing (auto: on only if needed to fit)",
    "bf16": "model.dtype (auto: bfloat16 on a GPU)",
    "fp16": "model.dtype",
    "use_cpu": "the machine: true where there is no GPU (transformers refuses bf16 on a CPU otherwise)",
    "data_seed": "train.seed",
    "train_sampling_strategy": "train.group_by_length (transformers 5's name for it)",
}

# field -> why it cannot change the adapter or its metrics.
NO_EFFECT_TRAINING: dict[str, str] = {
    **dict.fromkeys(
        ("save_steps", "save_total_limit", "save_on_each_node", "enable_jit_checkpoint", "resume_from_checkpoint"),
        "where and when checkpoints are written (train.checkpoint_dir); main() resumes explicitly",
    ),
    **dict.fromkeys(
        (
            "logging_strategy",
            "logging_steps",
            "logging_first_step",
            "log_on_each_node",
            "log_level",
            "log_level_replica",
            "disable_tqdm",
            "include_num_input_tokens_seen",
            "report_to",
            "run_name",
            "project",
            "trackio_space_id",
            "trackio_bucket_id",
            "trackio_static_space_id",
            "skip_memory_metrics",
            "debug",
        ),
        "logging and reporting only (dvclive is attached by the train stage)",
    ),
    **dict.fromkeys(
        (
            "push_to_hub",
            "hub_token",
            "hub_private_repo",
            "hub_model_id",
            "hub_strategy",
            "hub_always_push",
            "hub_revision",
        ),
        "the hub: nothing is pushed",
    ),
    **dict.fromkeys(
        (
            "eval_do_concat_batches",
            "eval_use_gather_object",
            "eval_accumulation_steps",
            "include_for_metrics",
            "batch_eval_metrics",
        ),
        "only eval_loss is computed (prediction_loss_only)",
    ),
    **dict.fromkeys(("metric_for_best_model", "greater_is_better"), "only with load_best_model_at_end (off)"),
    **dict.fromkeys(("torch_compile_backend", "torch_compile_mode"), "only with torch_compile (off)"),
    "liger_kernel_config": "only with use_liger_kernel (off)",
    **dict.fromkeys(
        ("dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context"),
        "only with dataloader workers (none)",
    ),
    "dataloader_pin_memory": "copy speed to the GPU only",
    "length_column_name": "the features have no length column: lengths are counted from input_ids",
    "use_cache": "training runs whole sequences; the KV cache is for generation",
    "torch_empty_cache_steps": "frees cached GPU memory; the numbers are the same",
    "restore_callback_states_from_checkpoint": "callbacks here keep no state that changes training",
    **dict.fromkeys(
        ("ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend", "ddp_timeout"),
        "how processes communicate, not what they compute (LoRA has no buffers)",
    ),
    **dict.fromkeys(
        ("fsdp", "fsdp_config", "deepspeed", "accelerator_config", "parallelism_config", "local_rank"),
        "the launch (launch.config's accelerate file) decides; the adapter does not depend on it",
    ),
    **dict.fromkeys(("do_train", "do_eval", "do_predict"), "read by example scripts, not by Trainer"),
}

# peft.LoraConfig: task_type plus every variant and extra switched off, each with why.
FIXED_LORA: dict[str, tuple[Any, str]] = {
    "task_type": ("CAUSAL_LM", "a causal LM"),
    "exclude_modules": (None, "lora.target_modules names every adapted module"),
    "fan_in_fan_out": (False, "Qwen3's layers are nn.Linear (True is for GPT-2's Conv1D)"),
    "use_rslora": (False, "scale = lora_alpha / r (rsLoRA: / sqrt(r)); lora.lora_alpha is chosen for it"),
    "modules_to_save": (None, "vLLM cannot serve adapters with fully trained modules"),
    "init_lora_weights": (True, "A random (seeded by train.seed), B zero: training starts from the base"),
    "layers_to_transform": (None, "every layer is adapted"),
    "rank_pattern": ({}, "one rank (lora.r) everywhere: vLLM serves up to one max rank"),
    "alpha_pattern": ({}, "one lora_alpha everywhere"),
    "trainable_token_indices": (None, "would train embedding rows, which vLLM cannot serve"),
    "use_dora": (False, "vLLM cannot serve DoRA adapters"),
    "lora_bias": (False, "vLLM cannot serve LoRA bias vectors"),
    "target_parameters": (None, "LoRA on linear modules only, as vLLM serves it"),
    "layer_replication": (None, "the base's layers as they are"),
    # variants of LoRA: their adapters are not plain LoRA weights, which is all vLLM serves
    **dict.fromkeys(
        ("velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config", "alora_invocation_tokens"),
        (None, "plain LoRA, the only kind vLLM serves"),
    ),
    "use_qalora": (False, "QLoRA here is plain LoRA on an NF4 base (model.quantization), not QA-LoRA"),
}

NO_EFFECT_LORA: dict[str, str] = {
    **dict.fromkeys(
        ("peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"),
        "set by peft for saving and loading",
    ),
    "layers_pattern": "only with layers_to_transform (every layer)",
    **dict.fromkeys(
        ("loftq_config", "eva_config", "corda_config", "lora_ga_config"),
        "read only by its own init_lora_weights method (the plain one is used)",
    ),
    **dict.fromkeys(("megatron_config", "megatron_core"), "Megatron layers only"),
    "qalora_group_size": "only with use_qalora (off)",
    "runtime_config": "peft's runtime options (GPU offload when loading), not saved with the adapter",
    "ensure_weight_tying": "only with modules_to_save / trainable_token_indices, both refused",
}


def fixed_values(fixed: dict[str, tuple[Any, str]]) -> dict[str, Any]:
    # copies: transformers and peft may fill in the dicts and lists they are given
    return {name: copy.deepcopy(value) for name, (value, _why) in fixed.items()}


def training_kwargs(train: TrainParams, dtype: torch.dtype, plan: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of TrainingArguments: the train params that TrainingArguments
    names, the derived values and the fixed ones (see the module docstring)."""
    named = ({f.name for f in dataclasses.fields(train)} & training_fields()) - DERIVED_TRAINING.keys()
    derived = {
        "output_dir": train.checkpoint_dir,
        "per_device_train_batch_size": plan["per_device_train_batch_size"],
        "gradient_accumulation_steps": plan["gradient_accumulation_steps"],
        "gradient_checkpointing": plan["gradient_checkpointing"],
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "use_cpu": not torch.cuda.is_available(),
        "data_seed": train.seed,
        "train_sampling_strategy": "group_by_length" if train.group_by_length else "random",
    }
    return {
        **{name: copy.deepcopy(getattr(train, name)) for name in sorted(named)},
        **derived,
        **fixed_values(FIXED_TRAINING),
        "logging_strategy": "steps",
        "dataloader_pin_memory": torch.cuda.is_available(),
        "report_to": "none",  # dvclive is attached explicitly (on the main process only)
    }


def training_fields() -> set[str]:
    """The names TrainingArguments takes."""
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def training_arguments(train: TrainParams, dtype: torch.dtype, plan: dict[str, Any]):
    """TrainingArguments of the train stage (under accelerate this also sets up the process group)."""
    from transformers import TrainingArguments

    return TrainingArguments(**training_kwargs(train, dtype, plan))


def lora_kwargs(lora: LoraParams) -> dict[str, Any]:
    """Keyword arguments of peft.LoraConfig: the `lora` section (named as LoraConfig names
    them) and the fixed values."""
    return {**fixed_values(FIXED_LORA), **dataclasses.asdict(lora), "target_modules": list(lora.target_modules)}


def lora_config(lora: LoraParams):
    from peft import LoraConfig

    config = LoraConfig(**lora_kwargs(lora))
    # peft keeps target_modules as a set, which adapter_config.json would list in a different
    # order per process (string hashing is randomised): the params' order keeps its bytes stable
    config.target_modules = list(lora.target_modules)
    return config
