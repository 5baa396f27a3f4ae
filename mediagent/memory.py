"""Pre-flight memory and cost plan, from the base's ``config.json`` and params alone.

Shared by `train`, `evaluate` and `serve`, which log :func:`format_plan` before loading
anything, so a run that cannot fit says so in its first lines instead of after minutes of
loading. Pure arithmetic: no model, no tokenizer, no GPU.

    mediagent preflight            # the plan for params.yaml's base (make preflight)
    mediagent preflight --table    # Qwen3 0.6B..14B on 24/48/80 GB GPUs (README)

The training process's bytes (weights, LoRA, activations, logits) come from
:mod:`mediagent.model_size`, whose docstring says what is counted there. Counted here
(letters as there):

- serving: KV cache 2·L·kv_heads·head_dim·(dtype bytes) per token, x serve.max_model_len
  per full-length sequence.
- evaluation: candidate tokens to score = questions x candidates x answer tokens, read
  from ``test_candidates.jsonl`` when it exists (tokens estimated from characters at
  0.66 tokens per character, measured on cMedQA2 answers with Qwen's tokenizer).

Not counted in the model estimate: the framework itself (CUDA context and kernels, ~0.5-1
GB per GPU; on CPU the interpreter and libraries, ~0.4-0.65 GiB of RSS), which plans add
as RUNTIME_BYTES by device; allocator fragmentation and temporary buffers of a single op,
which MARGIN keeps free. Checked in tests/test_preflight.py against
LLaMA-Factory's published table and against the measured peak RSS of a CPU training run.
"""

from __future__ import annotations

import json
from pathlib import Path

from mediagent.errors import UserError
from mediagent.model_size import (  # noqa: F401 (re-exported: importers name them from here)
    DTYPE_BYTES,
    GIB,
    QWEN3,
    Arch,
    lora_param_count,
    param_counts,
    qwen3_config,
    resolve_dtype_name,
    train_peak_bytes,
    train_plan,
    weight_bytes,
)
from mediagent.params import Params, with_overrides

TOKENS_PER_CHAR = 0.66  # Qwen tokenizer on cMedQA2 answers (data/sample and the real sample)
# What the model estimate leaves out, by the device the stage trains on; a plan must fit
# estimate + this. cuda: the CUDA context and kernels, ~0.5-1 GB per GPU. cpu: the
# interpreter and libraries: the train stage's imports are 403 MiB of RSS, 665 MiB with
# Qwen's tokenizer loaded. A whole GiB on a CPU made the rehearsal's small model's estimate
# 1.6x its measured peak; with 0.5 GiB it is 1.075x (docs/rehearsal.md).
RUNTIME_BYTES = {"cuda": GIB, "cpu": GIB // 2}
# Kept free of any budget: the allocator's fragmentation and one op's temporaries. A
# "24 GB" A10 reports 22.5 GiB to CUDA; 24 GiB x 0.9 = 21.6 GiB is what a plan may use.
MARGIN = 0.10
OFFICIAL_TEST = (4000, 100)  # cMedQA2 test set: questions x candidates


# ---------------------------------------------------------------- choosing a plan that fits


def budget_bytes(params: Params) -> tuple[int, str]:
    """(bytes, where from) for ``train.memory_budget``: GiB given, else the device's memory.

    auto: the first GPU's total memory, or without one the RAM available now (what the
    training process can still take on a machine that runs other things).
    """
    budget = params.train.memory_budget
    if budget != "auto":
        return int(float(budget) * GIB), "train.memory_budget"
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory), f"GPU 0 ({torch.cuda.get_device_name(0)})"
    import psutil

    return int(psutil.virtual_memory().available), "available RAM (no GPU)"


def training_device() -> str:
    """The device the train stage runs on here: ``cuda`` or ``cpu`` (keys of RUNTIME_BYTES)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def usable_bytes(budget: int) -> int:
    """What a plan may use of a budget: MARGIN kept free for the allocator's fragmentation."""
    return int(budget * (1 - MARGIN))


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _search_space(params: Params) -> tuple[list[int], list[bool], list[str]]:
    """The micro-batches, gradient-checkpointing settings and quantizations to try, in ORDER:
    a knob params fix has one value; ``auto`` ones are searched."""
    t = params.train
    micros = _divisors_desc(t.per_device_train_batch_size) if t.micro_batch_size == "auto" else [t.micro_batch_size]
    gcs = [False, True] if t.gradient_checkpointing == "auto" else [t.gradient_checkpointing]
    quants = [params.model.quantization]
    if params.model.quantization == "none":
        quants.append("nf4")  # priced always; chosen only when allowed
    return micros, gcs, quants


def _why_nothing_fits(options: list[dict], room: int, allow: bool, smallest: dict) -> tuple[bool, str]:
    """(whether a 4-bit base would fit, were it allowed; what to change) when no plan fits."""
    fits_4bit = [o for o in options if o["quantization"] == "nf4" and o["estimate_bytes"] <= room]
    fits_with_quantization = bool(fits_4bit) and not allow
    needs = (
        "fits only with a 4-bit base: set train.allow_quantization: true (QLoRA, NF4)"
        if fits_with_quantization
        else f"nothing fits {_gib(room)} (the smallest option needs {_gib(smallest['estimate_bytes'])}): "
        f"a shorter train.max_seq_length, a smaller lora.r or fewer lora.target_modules, a bigger device, "
        f"or several (configs/accelerate)"
    )
    return fits_with_quantization, needs


def _plan_values(t, quant: str, gc: bool, micro: int, chunked: bool) -> dict:
    """The TrainingArguments values of a plan: micro-batches of ``micro``, the effective batch kept."""
    return {
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": t.gradient_accumulation_steps * (t.per_device_train_batch_size // micro),
        "gradient_checkpointing": gc,
        "chunked_loss": chunked,
        "quantization": quant,
    }


def choose_plan(
    config: dict,
    params: Params,
    budget: int,
    dtype: str | None = None,
    allow_quantization: bool | None = None,
    device: str = "cuda",
) -> dict:
    """The first plan, in ORDER, whose estimate (+ RUNTIME_BYTES[device]) fits ``usable_bytes(budget)``.

    Knobs params fix stay fixed: an int ``train.micro_batch_size``, a bool
    ``train.gradient_checkpointing``, ``train.loss`` and ``model.quantization``; ``auto``
    ones are searched. Returns a dict with ``fits``, ``estimate_bytes`` (peak + runtime) and
    ``plan`` (the TrainingArguments values), plus ``options``: what each alternative needs.
    """
    arch, t = Arch.from_config(config), params.train
    runtime = RUNTIME_BYTES[device]
    dtype = dtype or resolve_dtype_name(params.model.dtype)
    allow = t.allow_quantization if allow_quantization is None else allow_quantization
    room = usable_bytes(budget)
    micros, gcs, quants = _search_space(params)
    chunked = t.loss == "chunked"

    def estimate(quant: str, gc: bool, micro: int, loss_chunked: bool = chunked) -> int:
        return (
            train_plan(
                arch, params, dtype, 4 if quant == "nf4" else None, gc, micro_batch=micro, chunked_loss=loss_chunked
            )["peak"]
            + runtime
        )

    def as_plan(quant: str, gc: bool, micro: int, loss_chunked: bool = chunked) -> dict:
        return _plan_values(t, quant, gc, micro, loss_chunked)

    allowed_quants = [q for q in quants if q == params.model.quantization or allow]
    fitting = ((q, g, m) for q in allowed_quants for g in gcs for m in micros if estimate(q, g, m) <= room)
    chosen = next(fitting, None)
    options = [
        {**as_plan(q, g, micros[-1], c), "estimate_bytes": estimate(q, g, micros[-1], c)}
        for q in quants
        for c in sorted({chunked, True})
        for g in (False, True)
    ]
    allowed = [o for o in options if allow or o["quantization"] == params.model.quantization]
    smallest = min(allowed, key=lambda o: o["estimate_bytes"])
    result = {
        "model": config.get("_name_or_path") or params.model.base,
        "dtype": dtype,
        "device": device,
        "runtime_bytes": runtime,
        "budget_bytes": budget,
        "usable_bytes": room,
        "fits": chosen is not None,
        "estimate_bytes": estimate(*chosen) if chosen else smallest["estimate_bytes"],
        "plan": as_plan(*chosen) if chosen else None,
        "options": options,
    }
    if chosen is None:
        result["fits_with_quantization"], result["needs"] = _why_nothing_fits(options, room, allow, smallest)
    return result


def format_choice(choice: dict) -> str:
    """The chosen plan (or why none fits) and the table of options, for logs and errors."""
    p = choice["plan"]
    head = (
        f"memory plan for {choice['model']} ({choice['dtype']}): budget {_gib(choice['budget_bytes'])}, "
        f"usable {_gib(choice['usable_bytes'])} ({MARGIN:.0%} kept free)"
    )
    if p:
        head += (
            f"\n  chosen: micro-batch {p['per_device_train_batch_size']} x "
            f"{p['gradient_accumulation_steps']} accumulation steps, gradient checkpointing "
            f"{'on' if p['gradient_checkpointing'] else 'off'}, {'chunked' if p['chunked_loss'] else 'full'} loss, "
            f"quantization {p['quantization']}: ~{_gib(choice['estimate_bytes'])} with "
            f"{_gib(choice['runtime_bytes'])} {choice['device']} runtime"
        )
    else:
        head += f"\n  {choice['needs']}"
    rows = ["  option (smallest micro-batch)                          estimate"]
    for o in choice["options"]:
        label = (
            f"{o['quantization']:>4}, {'chunked' if o['chunked_loss'] else 'full':>7} loss, "
            f"GC {'on ' if o['gradient_checkpointing'] else 'off'}, micro-batch {o['per_device_train_batch_size']}"
        )
        mark = "fits" if o["estimate_bytes"] <= choice["usable_bytes"] else "too big"
        rows.append(f"  {label:<54} {_gib(o['estimate_bytes']):>10}  {mark}")
    return "\n".join([head, *rows])


def candidate_counts(params: Params) -> dict[str, int] | None:
    """Questions, candidates and estimated answer tokens evaluate will score (None without data)."""
    path = Path(params.data.processed_dir) / "test_candidates.jsonl"
    if not path.is_file():
        return None
    questions = candidates = chars = 0
    cap = params.eval.max_questions
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if not row.get("candidates"):
                continue
            if cap and questions == cap:
                break
            questions += 1
            candidates += len(row["candidates"])
            # +1: the end token each candidate ends with; longer answers are cut as in evaluate
            chars += sum(
                min(len(c["content"]) * TOKENS_PER_CHAR + 1, params.eval.max_seq_length) for c in row["candidates"]
            )
    return {"questions": questions, "candidates": candidates, "answer_tokens": int(chars)}


def plan(config: dict, params: Params, dtype: str | None = None, weight_bits: int | None = None) -> dict:
    """Everything the stages log: train, serve and evaluate estimates (bytes and counts)."""
    arch = Arch.from_config(config)
    dtype = dtype or resolve_dtype_name(params.model.dtype)
    kv_per_token = 2 * arch.layers * arch.kv * DTYPE_BYTES[dtype]
    counts = candidate_counts(params)
    per_candidate = counts["answer_tokens"] / counts["candidates"] if counts and counts["candidates"] else None
    return {
        "dtype": dtype,
        "params": sum(param_counts(arch).values()),
        "train": train_plan(arch, params, dtype, weight_bits),
        "serve": {
            "weights": weight_bytes(arch, DTYPE_BYTES[dtype], weight_bits),
            "kv_per_token": kv_per_token,
            "kv_per_sequence": kv_per_token * params.serve.max_model_len,
            "max_model_len": params.serve.max_model_len,
        },
        "eval": {
            **(counts or {}),
            "official_answer_tokens": int(OFFICIAL_TEST[0] * OFFICIAL_TEST[1] * per_candidate)
            if per_candidate
            else None,
        },
    }


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def format_plan(p: dict, stage: str) -> str:
    """One compact block for the log of ``stage`` (train, evaluate or serve)."""
    t, s, e = p["train"], p["serve"], p["eval"]
    lines = [
        f"pre-flight plan ({stage}, {p['dtype']}, {p['params'] / 1e6:,.1f}M params):",
        f"  weights {_gib(t['weights'])}",
    ]
    if stage == "train":
        lines += [
            f"  LoRA {t['lora_params'] / 1e6:,.2f}M params + grads + AdamW {_gib(t['lora_state'])}",
            f"  activations {_gib(t['activations_no_gc'])} without / {_gib(t['activations_gc'])} with "
            f"gradient checkpointing; logits {_gib(t['logits'])}; eval logits {_gib(t['eval_logits'])}",
            f"  peak ~{_gib(t['peak'])} (no GC {_gib(t['peak_no_gc'])}, GC {_gib(t['peak_gc'])}) + runtime",
        ]
    elif stage == "serve":
        lines.append(
            f"  KV cache {s['kv_per_token'] / 1024:.1f} KiB/token, {_gib(s['kv_per_sequence'])} per "
            f"{s['max_model_len']}-token sequence"
        )
    else:
        if "candidates" in e:
            lines.append(
                f"  answer selection: {e['questions']} questions x {e['candidates'] / max(e['questions'], 1):.0f}"
                f" candidates, ~{e['answer_tokens']:,} answer tokens to score "
                f"(official test 4,000 x 100: ~{e['official_answer_tokens']:,})"
            )
        else:
            lines.append("  answer selection: no test_candidates.jsonl yet")
    return "\n".join(lines)


def log_plan(params: Params, stage: str, log, dtype: str | None = None) -> dict | None:
    """Log the plan for the configured base when its config.json exists (else say so)."""
    path = params.model.path / "config.json"
    if not path.is_file():
        log.info("pre-flight plan: %s not found yet", path)
        return None
    p = plan(json.loads(path.read_text(encoding="utf-8")), params, dtype)
    log.info("%s", format_plan(p, stage))
    return p


def describe_plan(p: dict | None) -> str:
    if p is None:
        return "does not fit"
    return (
        f"{p['per_device_train_batch_size']}x{p['gradient_accumulation_steps']}"
        f"{', GC' if p['gradient_checkpointing'] else ''}"
        f"{'' if p['chunked_loss'] else ', full loss'}{', NF4' if p['quantization'] == 'nf4' else ''}"
    )


def table(params: Params, gpus=(24, 48, 80), plan_gb: int = 24) -> str:
    """Markdown: Qwen3 models x GPU sizes, LoRA bf16 at the configured batch and length, and
    the plan chosen on a ``plan_gb`` card (4-bit only where nothing else fits)."""
    t = params.train
    loss = "chunked" if t.loss == "chunked" else "full"
    head = (
        f"LoRA r={params.lora.r} on {len(params.lora.target_modules)} modules, bf16, {loss} loss, batch "
        f"{t.per_device_train_batch_size}, {t.max_seq_length} tokens, eval batch {t.per_device_eval_batch_size}; "
        f"estimate + {RUNTIME_BYTES['cuda'] // GIB} GiB runtime against {1 - MARGIN:.0%} of the card. yes = fits at the "
        f"full batch, GC = only with gradient checkpointing, no = not at the full batch. The last column is "
        f"the plan `mediagent preflight --memory-gb {plan_gb}` chooses: micro-batch x accumulation steps "
        f"(same effective batch), GC, NF4 = 4-bit base (QLoRA, needs train.allow_quantization)"
    )
    rows = [
        head,
        "",
        "| model | params | weights | peak, no GC | peak, GC | "
        + " | ".join(f"{g} GB" for g in gpus)
        + f" | plan at {plan_gb} GB | estimate |",
        "|---|---|---|---|---|" + "---|" * len(gpus) + "---|---|",
    ]
    at = with_overrides(params, train={"memory_budget": plan_gb})
    for name in QWEN3:
        config = qwen3_config(name)
        arch = Arch.from_config(config)
        tp = train_plan(
            arch, params, "bfloat16", gradient_checkpointing=False, micro_batch=t.per_device_train_batch_size
        )
        cells = []
        for g in gpus:
            room = usable_bytes(g * GIB) - RUNTIME_BYTES["cuda"]
            cells.append("yes" if tp["peak_no_gc"] <= room else "GC" if tp["peak_gc"] <= room else "no")
        choice = choose_plan(config, at, plan_gb * GIB, "bfloat16", allow_quantization=True)
        rows.append(
            f"| {name} | {sum(param_counts(arch).values()) / 1e9:.2f}B | {_gib(tp['weights'])} | "
            f"{_gib(tp['peak_no_gc'])} | {_gib(tp['peak_gc'])} | "
            + " | ".join(cells)
            + f" | {describe_plan(choice['plan'])} | {_gib(choice['estimate_bytes'])} |"
        )
    return "\n".join(rows)


def measured_peak_bytes() -> int:
    """This process's peak: reserved GPU memory where it ran on a GPU, else its peak RSS.

    VmHWM rather than ru_maxrss: Linux carries ru_maxrss over from a forking parent.
    """
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_reserved())
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def plan_training(params: Params, dtype: str) -> dict:
    """The train stage's memory plan for its base and budget; stop, with the table, if none fits."""
    config = json.loads((params.model.path / "config.json").read_text(encoding="utf-8"))
    budget, source = budget_bytes(params)
    choice = choose_plan(config, params, budget, dtype, device=training_device())
    choice["budget_source"] = source
    if not choice["fits"]:
        raise UserError(
            f"no training plan fits {_gib(choice['usable_bytes'])} of {source}: {choice['needs']}\n"
            + format_choice(choice)
        )
    return choice
