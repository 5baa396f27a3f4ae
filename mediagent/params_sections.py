"""The sections of params.yaml, one frozen dataclass each, with their own checks.

Kept apart from :mod:`mediagent.params`, which builds them from the YAML and re-exports every
name here (``from mediagent.params import TrainParams`` keeps working); ``data`` has its own
module, :mod:`mediagent.data_params`. No field has a default unless noted: params.yaml is the
one source of every value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# Ranks vLLM can serve (vllm/config/lora.py); any other rank trains fine and then fails
# at serving time, so it is rejected up front.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def below(section: str, values: object, minimums: dict[str, tuple[int, str]]) -> list[str]:
    """``<section>.<field>: must be >= <least><tail>`` for each field below its least value;
    ``minimums`` maps field -> (least, tail), the tail a unit or a reason."""
    return [
        f"{section}.{name}: must be >= {least}{tail}"
        for name, (least, tail) in minimums.items()
        if getattr(values, name) < least
    ]


# TrainingArguments' lr_scheduler_type and optim (within the installed transformers' choices: a test);
# optimizers that train a LoRA on our devices (the 8-bit ones need bitsandbytes' GPU kernels).
Scheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
]
Optimizer = Literal["adamw_torch_fused", "adamw_torch", "adafactor", "sgd", "adamw_8bit", "paged_adamw_8bit"]


@dataclass(frozen=True)
class DownloadParams:
    mirrors: list[str]  # base URLs tried in turn; each file is verified by its blob id whatever the source
    out_dir: str
    files: dict[str, str]
    timeout_s: float

    def problems(self) -> list[str]:
        out = [
            f"download.files.{name}: {blob!r} is not a 40-hex git blob id"
            for name, blob in self.files.items()
            if len(str(blob)) != 40 or any(c not in "0123456789abcdef" for c in str(blob))
        ]
        if not self.files:
            out.append("download.files: list at least one file (name: git blob id)")
        if isinstance(self.mirrors, str) or not self.mirrors:
            return [*out, "download.mirrors: list at least one base URL (a YAML list, one `- url` per line)"]
        out += [
            f"download.mirrors: {url!r} must be an http(s) URL"
            for url in self.mirrors
            if not str(url).startswith(("https://", "http://"))
        ]
        if self.timeout_s <= 0:
            out.append("download.timeout_s: must be > 0")
        return out


@dataclass(frozen=True)
class ProcessParams:
    system_prompt: str
    limit: int
    min_question_chars: int
    max_question_chars: int
    min_answer_chars: int
    max_answer_chars: int
    mask_pii: bool
    answers_per_question: Literal["all", "first"]
    val_ratio: float
    test_ratio: float
    seed: int
    metrics_file: str
    num_negatives: int
    max_candidate_questions: int
    heldout_candidates_dir: str  # hash split: questions of the official dev/test lists here always go to test
    train_on: Literal["all_turns", "last_turn"] = "all_turns"  # multi-turn; optional: keeps the DVC params hash

    def problems(self) -> list[str]:
        out = below(
            "process",
            self,
            {
                "limit": (0, " (0 = all rows)"),
                "num_negatives": (1, ""),
                "max_candidate_questions": (0, " (0 = all test questions)"),
            },
        )
        if not 0 <= self.val_ratio < 1 or not 0 <= self.test_ratio < 1 or self.val_ratio + self.test_ratio >= 1:
            out.append("process.val_ratio/test_ratio: each in [0, 1) and their sum below 1")
        if self.min_question_chars > self.max_question_chars:
            out.append("process.min_question_chars: larger than process.max_question_chars")
        if self.min_answer_chars > self.max_answer_chars:
            out.append("process.min_answer_chars: larger than process.max_answer_chars")
        if self.min_question_chars < 1 or self.min_answer_chars < 1:
            out.append("process.min_question_chars/min_answer_chars: must be >= 1 (empty texts are always dropped)")
        return out


@dataclass(frozen=True)
class ModelParams:
    base: str
    dir: str
    revision: str
    source: Literal["huggingface", "modelscope", "gguf"]
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    trust_remote_code: bool
    quantization: Literal["none", "nf4"]  # the base in 4-bit for training only (QLoRA)
    gguf: str  # source gguf: a .gguf path or pkg:<module> of a package shipping one
    chat_template: str  # auto (the base's own) | a name in chat_format.TEMPLATES | a .jinja path
    chat_template_kwargs: dict[str, Any]  # frozen into the saved template, e.g. enable_thinking: false

    @property
    def path(self) -> Path:
        """Where the base model lives: <model.dir>/<model.base> (the `base` stage's out)."""
        return Path(self.dir) / self.base

    def problems(self) -> list[str]:
        out = []
        if self.base != "tiny" and (self.base.startswith(("/", ".")) or ".." in self.base):
            out.append(
                f"model.base: {self.base!r} must be 'tiny' or a hub id like 'Qwen/Qwen3-8B'; "
                f"put a local copy under {self.dir}/<org>/<name> and name it by that id"
            )
        if self.source == "gguf" and not self.gguf:
            out.append("model.gguf: name the .gguf file (a path, or pkg:<module> of a package that ships one)")
        return out


@dataclass(frozen=True)
class TinyParams:
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    seed: int

    def problems(self) -> list[str]:
        if self.num_attention_heads % self.num_key_value_heads:
            return ["tiny.num_key_value_heads: must divide tiny.num_attention_heads"]
        return []


@dataclass(frozen=True)
class LoraParams:
    """Maps 1:1 onto peft.LoraConfig (task_type is always CAUSAL_LM)."""

    r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: tuple[str, ...]
    bias: Literal["none"]  # peft would train bias vectors otherwise, which vLLM's LoRA cannot serve

    def problems(self) -> list[str]:
        out = []
        if self.r not in VLLM_LORA_RANKS:
            out.append(f"lora.r: {self.r} cannot be served by vLLM; use one of {', '.join(map(str, VLLM_LORA_RANKS))}")
        if not self.target_modules:
            out.append("lora.target_modules: must name at least one module (e.g. q_proj)")
        if not 0 <= self.lora_dropout < 1:
            out.append("lora.lora_dropout: must be in [0, 1)")
        return out


@dataclass(frozen=True)
class TrainParams:
    """Names follow transformers.TrainingArguments where one exists."""

    output_dir: str
    checkpoint_dir: str
    max_seq_length: int
    learning_rate: float
    num_train_epochs: float
    max_steps: int
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    gradient_accumulation_steps: int
    micro_batch_size: int | Literal["auto"]  # or a divisor of per_device_train_batch_size
    warmup_steps: int | float  # steps, or a fraction of the run's optimizer steps when < 1
    lr_scheduler_type: Scheduler
    lr_scheduler_kwargs: dict[str, Any]  # e.g. min_lr_rate for cosine_with_min_lr
    optim: Optimizer
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    max_grad_norm: float  # gradient clipping; 0 = none
    seed: int
    gradient_checkpointing: bool | Literal["auto"]
    loss: Literal["chunked", "full"]
    memory_budget: float | Literal["auto"]  # or GiB
    allow_quantization: bool  # may the plan switch to a 4-bit base when nothing else fits
    logging_steps: int
    eval_steps: int | float  # steps, or a fraction of the run when < 1 (transformers' rule)
    save_steps: int | float
    save_total_limit: int
    group_by_length: bool
    max_eval_examples: int
    metrics_file: str
    dvclive_dir: str

    def problems(self) -> list[str]:
        ones = (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_total_limit",
            "max_eval_examples",
        )
        out = below(
            "train",
            self,
            {
                "max_seq_length": (16, " tokens"),
                **{n: (1, "") for n in ones},
                **{n: (0, "") for n in ("adam_epsilon", "weight_decay", "max_grad_norm")},
            },
        )
        if self.learning_rate <= 0:
            out.append("train.learning_rate: must be > 0")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            out.append("train.max_steps / train.num_train_epochs: one must be > 0")
        for name, least in (("warmup_steps", 0), ("eval_steps", 1), ("save_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not (
                isinstance(value, int) and value >= least or isinstance(value, float) and 0 < value < 1
            ):
                out.append(
                    f"train.{name}: {value!r} must be a step count >= {least} "
                    "or a fraction of the run's steps in (0, 1), e.g. 0.05"
                )
        if self.micro_batch_size != "auto" and not (
            self.micro_batch_size >= 1 and self.per_device_train_batch_size % self.micro_batch_size == 0
        ):
            out.append(
                f"train.micro_batch_size: {self.micro_batch_size!r} must be auto or a divisor of "
                f"train.per_device_train_batch_size ({self.per_device_train_batch_size})"
            )
        if self.memory_budget != "auto" and self.memory_budget <= 0:
            out.append(f"train.memory_budget: {self.memory_budget!r} must be auto or a size in GiB (e.g. 24)")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            out.append("train.adam_beta1/adam_beta2: each in [0, 1)")
        paths = {"output_dir": self.output_dir, "checkpoint_dir": self.checkpoint_dir, "dvclive_dir": self.dvclive_dir}
        for a, b in ((a, b) for a in paths for b in paths if a < b):
            pa, pb = Path(paths[a]), Path(paths[b])
            if pa == pb or pa in pb.parents or pb in pa.parents:
                # the adapter is a DVC out, checkpoints are scratch: nesting would mix them
                out.append(f"train.{a} / train.{b}: must be separate folders, not {paths[a]!r} and {paths[b]!r}")
        return out


@dataclass(frozen=True)
class MergeParams:
    output_dir: str
    parity_prompts: int
    tolerance: float
    relative_tolerance: float  # 16-bit bases: bound = this x max |reference logit|
    quantized_rounding_factor: float  # 4-bit-trained adapters: bound = this x the base's own 4-bit rounding
    max_shard_size: str  # safetensors shard size (transformers' save_pretrained)
    metrics_file: str

    def problems(self) -> list[str]:
        out = below("merge", self, {"parity_prompts": (1, " (the parity check needs a sequence)")})
        if not self.tolerance > 0:
            out.append("merge.tolerance: must be > 0")
        if not 0 < self.relative_tolerance < 1:
            out.append("merge.relative_tolerance: must be in (0, 1)")
        if not self.quantized_rounding_factor >= 1:
            out.append(
                "merge.quantized_rounding_factor: must be >= 1 (merged vs 4-bit never beats the rounding itself)"
            )
        return out


@dataclass(frozen=True)
class EvalParams:
    backend: Literal["auto", "vllm", "hf"]
    scorer: Literal["auto", "vllm", "hf"]  # answer selection
    selection_score: Literal[
        "mean", "pmi"
    ]  # mean (log-prob per answer token) | pmi (conditional - unconditional, sums)
    bootstrap_resamples: int  # paired bootstrap resamples for the 95% intervals in the report
    max_questions: int
    max_generations: int
    max_new_tokens: int
    max_seq_length: int  # prompt + answer tokens scored (loss, answer selection)
    batch_size: int
    seed: int
    metrics_file: str
    report_path: str  # backend, serve-readiness reasons (not metrics: strings)
    samples_path: str
    plots_dir: str

    def problems(self) -> list[str]:
        return below(
            "eval",
            self,
            {
                "bootstrap_resamples": (100, " (percentile intervals need a few hundred)"),
                "max_questions": (0, " (0 = the whole test split)"),
                "max_generations": (1, " (BLEU/ROUGE need an answer)"),
                "max_new_tokens": (1, ""),
                "batch_size": (1, ""),
                "max_seq_length": (16, " tokens"),
            },
        )


@dataclass(frozen=True)
class ServeParams:
    host: str
    port: int
    alias: str
    max_model_len: int
    base_name: str  # the base model's name in /v1/models (adapters are named by lineage)
    cpu_kv_cache_gib: int  # VLLM_CPU_KVCACHE_SPACE on CPU-only machines
    startup_timeout_s: float  # give up if vLLM is not healthy by then
    experiments_dir: str  # adapters of DVC experiments (--exp), copied out of the DVC cache
    runtime_max_loras: int  # extra --max-loras slots for adapters loaded at runtime
    runtime_max_lora_rank: int  # --max-lora-rank with --runtime-lora: later adapters must fit

    def problems(self) -> list[str]:
        out = below(
            "serve",
            self,
            {
                "runtime_max_loras": (1, " (one slot per adapter loaded at runtime)"),
                "max_model_len": (16, " tokens"),
                "cpu_kv_cache_gib": (1, ""),
            },
        )
        if self.runtime_max_lora_rank not in VLLM_LORA_RANKS:
            out.append(
                f"serve.runtime_max_lora_rank: {self.runtime_max_lora_rank} must be one of vLLM's ranks "
                f"{', '.join(map(str, VLLM_LORA_RANKS))}"
            )
        if not self.experiments_dir:
            out.append("serve.experiments_dir: must name a folder (git-ignored, e.g. models/experiments)")
        if not 0 < self.port < 65536:
            out.append(f"serve.port: {self.port} must be in 1..65535")
        if not self.alias or self.alias == self.base_name:
            out.append(f"serve.alias: {self.alias!r} must be non-empty and differ from serve.base_name")
        return out


@dataclass(frozen=True)
class ReviewParams:
    """Clinician review: `make ui`'s blind A/B tab and the `review` stage."""

    judgments_file: str
    answers_file: str
    metrics_file: str
    plots_file: str
    seed: int
    max_questions: int
    max_tokens: int
    temperature: float

    def problems(self) -> list[str]:
        out = below(
            "review",
            self,
            {
                "max_questions": (1, ""),
                "max_tokens": (1, ""),
                "temperature": (0, " (0 = greedy, the same answer every time)"),
            },
        )
        if len({self.judgments_file, self.answers_file, self.metrics_file, self.plots_file}) < 4:
            out.append("review.judgments_file/answers_file/metrics_file/plots_file: must be four different files")
        return out


@dataclass(frozen=True)
class LaunchParams:
    """How the train stage runs: in this process, or through `accelerate launch` (DDP,
    FSDP, DeepSpeed) with one of configs/accelerate/*.yaml. Not part of the adapter's
    identity: the same data and params give the same adapter on 1 or N processes."""

    config: str  # "" = this process; else an accelerate config file
    processes: int | Literal["auto"]  # auto = one per GPU | a number (needed where there is no GPU)

    def problems(self) -> list[str]:
        out = []
        if self.config and not Path(self.config).is_file():
            out.append(
                f'launch.config: {self.config!r} is not a file (e.g. configs/accelerate/ddp.yaml, or "" for one process)'
            )
        if self.processes != "auto" and self.processes < 1:
            out.append(f"launch.processes: {self.processes!r} must be auto or a number >= 1")
        return out
