"""How big a training job is and how long it takes: examples, tokens and optimizer steps
per epoch, and a wall-time estimate from a stated throughput assumption per GPU.

Used by ``mediagent preflight`` (before anything trains) and logged by the train stage
(with the split it actually encoded).

Examples per epoch come from the processed train split when it exists. Without one, for
the official data (``data.raw_dir`` = ``download.out_dir``) the count is a figure of the
released files, named with its source (OFFICIAL_TRAIN); for other data it stays unknown
until ``dvc repro process`` writes the split.

Tokens per example: counted with the base's tokenizer and chat format, exactly as the train
stage encodes them, when the base is on disk; otherwise the mean of 500 real cMedQA2 pairs
(SAMPLE_TOKENS_PER_EXAMPLE), times the examples.

Wall time: hours = tokens of the run x FLOPs per token / (peak bf16 FLOP/s x UTILIZATION x
devices). FLOPs per token for LoRA on a frozen base, counting the multiply-adds of every
matrix the tokens pass through (decoder linears and the LM head, N of them):

- forward: 2N;
- backward: 2N for the gradients of the activations, which must flow back through every
  frozen layer to reach the adapters below it; the frozen weights get no gradient (the 2N a
  full fine-tune spends there is saved), and the adapters' own are ~0.5% of N;
- gradient checkpointing recomputes the forward inside the backward: 2N more.

So 6N with gradient checkpointing (the plan says whether it is on), 4N without. Attention's
score products (~4 x layers x sequence x q dims per token, <1% at cMedQA2's ~130-token
examples) and padding (~4% with ``train.group_by_length``, bench/train.py) are left out;
evaluations (a forward over ``train.max_eval_examples`` every ``eval_steps``) add a few
percent more. ``mediagent preflight --measure N`` replaces the assumption by a measurement.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from mediagent.chat_format import ChatFormat, resolve_template
from mediagent.fileio import read_jsonl
from mediagent.memory import Arch, param_counts
from mediagent.params import Params, TrainParams

# The official cMedQA2 files as `make data` fetches them: answer.zip holds 226,266 answers
# (ids 0..226,265). The process stage sends the questions of the official dev and test
# candidate lists to val and test; their true answers are 7,527 + 7,552 (the lists' label-1
# rows). Every other answer is a training example (process.answers_per_question: all), before
# the length filters drop a few. (The cMedQA2 README's own table gives 188,490 training
# answers of 100,000 questions: the paper's version, smaller than the released files.)
OFFICIAL_TRAIN = (
    226_266 - 7_527 - 7_552,
    (
        "official cMedQA2 release: 226,266 answers less the 15,079 of the dev/test questions, "
        "before process's length filters (no processed split yet)"
    ),
)
# Mean tokens per training example (system prompt, question and answer in Qwen3's chat
# format, cut at 512) over 500 real cMedQA2 question/answer pairs, counted with Qwen's
# tokenizer (the tiny base's). Their answers are at most 249 characters, about 40% of them
# cut mid-sentence where they were published, so full answers make the real mean higher.
SAMPLE_TOKENS_PER_EXAMPLE = 126.5

# The train stage's line per logged step, and how `preflight --measure` reads it back.
STEP_LINE = "step %d: loss %.4f, %.3f s since the first step"
STEP_PATTERN = re.compile(r"step (\d+): loss \S+, ([\d.]+) s since the first step")

# Peak dense (no sparsity) bf16 tensor-core throughput, TFLOP/s, from NVIDIA's datasheets
# (which print twice these figures "with sparsity").
GPUS = {
    "a10": (125, "NVIDIA A10 datasheet: BF16 Tensor Core 125 TFLOPS dense"),
    "a100": (312, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS dense"),
    "h100": (989, "NVIDIA H100 SXM datasheet: BF16 Tensor Core 989 TFLOPS dense"),
    "l4": (121, "NVIDIA L4 datasheet: BF16 Tensor Core 121 TFLOPS dense"),
    "l40s": (362, "NVIDIA L40S datasheet: BF16 Tensor Core 362 TFLOPS dense"),
}
# Share of that peak a single-GPU LoRA run is assumed to reach, recomputation included
# (hardware FLOPs utilisation). Not measured on these GPUs: tuned pretraining reaches about
# 0.46 MFU / 0.58 HFU (PaLM, Chowdhery et al. 2022, Table 3); a Trainer fine-tune with short
# sequences, small matrices per adapter and checkpointing reaches less. Estimates are given
# for 0.3..0.4 around this value.
UTILIZATION = 0.35
UTILIZATION_RANGE = (0.3, 0.4)


def gpu_kind(device_name: str) -> str | None:
    """The GPUS key of a CUDA device name ("NVIDIA A10" -> a10, "NVIDIA A100-SXM4-80GB" -> a100), else None."""
    return next((kind for kind in GPUS if re.search(rf"\b{kind}\b", device_name.lower())), None)


def matmul_params(config: dict) -> int:
    """N: weights every token multiplies through (decoder linears and the LM head, tied or not)."""
    arch = Arch.from_config(config)
    return param_counts(arch)["linear"] + arch.vocab * arch.hidden


def count_split(path: Path, params: Params, tokenizer=None) -> tuple[int, int, str]:
    """(examples kept, tokens, how the tokens were counted) of a processed train split."""
    rows = read_jsonl(path)
    if tokenizer is None:
        how = (
            f"{path}; tokens: {SAMPLE_TOKENS_PER_EXAMPLE} per example, the mean of 500 real cMedQA2 pairs "
            f"(the base's tokenizer is not on disk)"
        )
        return len(rows), round(len(rows) * SAMPLE_TOKENS_PER_EXAMPLE), how
    tokenizer.chat_template = resolve_template(params.model.chat_template, params.model.chat_template_kwargs, tokenizer)
    fmt = ChatFormat.of(tokenizer)
    encoded = [fmt.encode(row["messages"], params.train.max_seq_length) for row in rows]
    kept = [e for e in encoded if any(label != -100 for label in e.labels)]  # as the train stage drops them
    return len(kept), sum(len(e.input_ids) for e in kept), f"{path}; tokens counted with the base's tokenizer"


def examples_and_tokens(params: Params, tokenizer=None) -> tuple[int, int, str] | None:
    """The train split's size as the train stage will see it; None where unknown (see the module doc)."""
    path = Path(params.data.processed_dir) / "train.jsonl"
    if path.is_file():
        return count_split(path, params, tokenizer)
    if Path(params.data.raw_dir) == Path(params.download.out_dir):
        n, source = OFFICIAL_TRAIN
        return n, round(n * SAMPLE_TOKENS_PER_EXAMPLE), f"{source}; tokens: {SAMPLE_TOKENS_PER_EXAMPLE} per example"
    return None


def job_size(
    examples: int, tokens: int, source: str, train: TrainParams, plan: dict | None = None, world_size: int = 1
) -> dict:
    """Examples, tokens and optimizer steps per epoch and for the run, as transformers' Trainer counts steps.

    ``plan``: the memory plan's micro-batch and accumulation (default the params'); the
    effective batch is the same either way, the step count nearly so.
    """
    micro = plan["per_device_train_batch_size"] if plan else train.per_device_train_batch_size
    accumulation = plan["gradient_accumulation_steps"] if plan else train.gradient_accumulation_steps
    batches = math.ceil(examples / (micro * world_size))
    per_epoch = max(math.ceil(batches / accumulation), 1)
    total = train.max_steps if train.max_steps > 0 else math.ceil(train.num_train_epochs * per_epoch)
    return {
        "examples_per_epoch": examples,
        "tokens_per_epoch": tokens,
        "steps_per_epoch": per_epoch,
        "steps": total,
        "effective_batch": micro * accumulation * world_size,
        "run_tokens": round(tokens * total / per_epoch),
        "source": source,
    }


def wall_time(
    size: dict | None, config: dict, gradient_checkpointing: bool, gpu: str = "a10", devices: int = 1
) -> dict:
    """Hours for the run's tokens on ``devices`` GPUs of kind ``gpu`` (a key of GPUS); with the
    size unknown (None), the throughput and its assumption alone (hours and tokens None)."""
    tflops, source = GPUS[gpu]
    passes = 6 if gradient_checkpointing else 4
    flops_per_token = passes * matmul_params(config)
    tokens_per_s = tflops * 1e12 * UTILIZATION * devices / flops_per_token
    tokens = size["run_tokens"] if size else None

    def hours(utilization: float) -> float | None:
        return round(tokens / (tokens_per_s / UTILIZATION * utilization) / 3600, 2) if tokens else None

    low, high = UTILIZATION_RANGE
    return {
        "hours": hours(UTILIZATION),
        "hours_range": [hours(high), hours(low)],
        "tokens": tokens,
        "tokens_per_s": round(tokens_per_s, 1),
        "flops_per_token": flops_per_token,
        "gpu": gpu,
        "devices": devices,
        "assumption": f"{devices} x {gpu.upper()} at {tflops} TFLOP/s bf16 ({source}) x {UTILIZATION} assumed "
        f"utilisation ({low}..{high} for the range); {passes}N FLOPs per token, N = "
        f"{matmul_params(config) / 1e9:.2f}B weights multiplied (forward 2N, backward to the "
        f"activations 2N{', recompute 2N' if gradient_checkpointing else ''})",
    }


def format_size(size: dict) -> str:
    return (
        f"job: {size['examples_per_epoch']:,} examples, {size['tokens_per_epoch']:,} tokens per epoch; "
        f"{size['steps_per_epoch']:,} optimizer steps per epoch of {size['effective_batch']} examples, "
        f"{size['steps']:,} in the run ({size['source']})"
    )


def format_time(time: dict) -> str:
    if time["hours"] is None:
        return (
            f"time: unknown until the job's size is; {time['tokens_per_s']:,.0f} tokens/s assumed: {time['assumption']}"
        )
    low, high = time["hours_range"]
    return (
        f"time: ~{time['hours']:.1f} h ({low:.1f}..{high:.1f}) for {time['tokens']:,} tokens at "
        f"{time['tokens_per_s']:,.0f} tokens/s: {time['assumption']}"
    )
