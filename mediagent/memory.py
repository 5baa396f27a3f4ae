"""Pre-flight memory and cost plan, from the base's ``config.json`` and params alone.

Shared by `train`, `evaluate` and `serve`, which log :func:`format_plan` before loading
anything, so a run that cannot fit says so in its first lines instead of after minutes of
loading. Pure arithmetic: no model, no tokenizer, no GPU.

    mediagent preflight            # the plan for params.yaml's base (make preflight)
    mediagent preflight --table    # Qwen3 0.6B..14B on 24/48/80 GB GPUs (README)

What is counted (bytes; b = per-device batch, s = train.max_seq_length, V = vocab,
h = hidden, q = heads x head_dim, kv = kv_heads x head_dim, I = intermediate, L = layers,
a = bytes of the compute dtype):

- weights: every parameter in the model dtype (embeddings once when tied, twice when the
  head is separate); with ``weight_bits=4`` the decoder's linear layers in NF4 with
  double-quantised constants (4.127 bits each, QLoRA paper), embeddings, head and norms in
  float32 (peft's prepare_model_for_kbit_training), plus the largest layer dequantized
  twice (bitsandbytes dequantizes for each matmul).
- LoRA: r x (in + out) per adapted linear; peft keeps adapters in float32 even on a
  bf16 base, and the Trainer's AdamW keeps a gradient and two float32 moments per
  parameter: 16 bytes per LoRA parameter (no separate master copy is needed).
- activations saved for backward, per token and decoder layer. This follows Korthikanti
  et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
  34·h bytes per token for a 16-bit GPT layer) but counts what a Qwen3 layer with LoRA on
  every linear keeps in transformers:
    * each RMSNorm upcasts its input to float32 and keeps it: 4·h per norm (2 norms; Gemma 3: 4),
      plus 4·(q + kv) for Qwen3's q/k norms when a < 4, a·(q + kv) in float32;
    * every LoRA-adapted linear keeps its input for the adapter's gradient (the frozen
      base weight needs none). In float32 q/k/v share one input and gate/up another:
      a·(2h + q); under bf16 autocast each adapter keeps its own copy: a·(5h + q + I);
    * attention (SDPA, memory-efficient/flash: no s x s matrix is kept) keeps q, k, v and
      its output; with a padding mask transformers repeats k/v to every head: a·4q;
    * the SwiGLU MLP keeps gate, silu(gate), up and their product: a·4I.
  Without gradient checkpointing all L layers keep this. With it, each layer keeps only
  its input (a·h) and one layer's full set exists again during its recomputation.
- logits: the loss upcasts b·s·V logits to float32; during backward the log-softmax
  output, its gradient and the gradient w.r.t. the logits are alive together:
  3 x 4 bytes x b·s·V. On small models with Qwen's 152k vocabulary this dominates.
  In-training evaluation (no grad) holds logits and log-softmax for the eval batch:
  2 x 4 bytes x b_eval·s; the peak is the larger of the two phases.
- serving: KV cache 2·L·kv_heads·head_dim·(dtype bytes) per token, x serve.max_model_len
  per full-length sequence.
- evaluation: candidate tokens to score = questions x candidates x answer tokens, read
  from ``test_candidates.jsonl`` when it exists (tokens estimated from characters at
  0.66 tokens per character, measured on cMedQA2 answers with Qwen's tokenizer).

Not counted: the framework itself (CUDA context and kernels, ~0.5-1 GB per GPU; on CPU
the interpreter and libraries, ~0.5 GB of RSS), allocator fragmentation and
temporary buffers of a single op. Checked in tests/test_preflight.py against
LLaMA-Factory's published table and against the measured peak RSS of a CPU training run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from mediagent.errors import UserError
from mediagent.loss import CHUNK_TOKENS
from mediagent.params import Params, with_overrides

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LORA_STATE_BYTES = 16  # fp32 param + fp32 grad + AdamW exp_avg + exp_avg_sq
NF4_BITS = 4.127  # 4-bit NF4 + double-quantised block constants (QLoRA)
TOKENS_PER_CHAR = 0.66  # Qwen tokenizer on cMedQA2 answers (data/sample and the real sample)
GIB = 1 << 30
# Not in the estimate: the CUDA context and kernels (~0.5-1 GB per GPU), or on a CPU the
# interpreter and libraries (~0.5-1 GB of RSS). A plan must fit estimate + this.
RUNTIME_BYTES = GIB
# Kept free of any budget: the allocator's fragmentation and one op's temporaries. A
# "24 GB" A10 reports 22.5 GiB to CUDA; 24 GiB x 0.9 = 21.6 GiB is what a plan may use.
MARGIN = 0.10
OFFICIAL_TEST = (4000, 100)  # cMedQA2 test set: questions x candidates

# Published config.json values of the Qwen3 dense models (Hugging Face model cards):
# vocab 151,936 and head_dim 128 for all; 0.6B/1.7B/4B tie the embeddings, 8B/14B do not.
QWEN3 = {
    "Qwen3-0.6B": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "Qwen3-1.7B": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "Qwen3-4B": dict(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "Qwen3-8B": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "Qwen3-14B": dict(
        hidden_size=5120,
        intermediate_size=17408,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}


def qwen3_config(name: str) -> dict:
    """A config.json dict of a published Qwen3 model (the fields this module reads)."""
    return {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "head_dim": 128,
        "torch_dtype": "bfloat16",
        "attention_bias": False,
        **QWEN3[name],
    }


# What config.json does not say about a decoder layer, by model_type prefix (others: Llama's
# layout, two norms, no q/k norm, attention bias as config says). Small parameter counts;
# the norms also keep float32 activations.
LAYER_TRAITS = {
    "qwen3": {"qk_norm": True},
    "qwen2": {"bias": True},  # q/k/v biases, which Qwen2's config does not list
    "gemma3": {"qk_norm": True, "norms": 4},
}


@dataclass(frozen=True)
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qk_norm: bool
    bias: bool
    dtype: str  # the checkpoint's own dtype (config torch_dtype / dtype)
    norms: int = 2  # RMSNorms per decoder layer (Gemma 3: 4, around attention and MLP)

    @classmethod
    def from_config(cls, config: dict) -> Arch:
        missing = [
            k
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if k not in config
        ]
        if missing:
            raise ValueError(f"config.json lacks {missing}: not a decoder-only transformer config this plan knows")
        heads = int(config["num_attention_heads"])
        traits = next(
            (t for prefix, t in LAYER_TRAITS.items() if str(config.get("model_type", "")).startswith(prefix)), {}
        )
        return cls(
            hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", False)),
            qk_norm=traits.get("qk_norm", False),
            bias=bool(config.get("attention_bias", traits.get("bias", False))),
            norms=traits.get("norms", 2),
            dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        )

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear of one decoder layer, by module name."""
        h, q, kv, i = self.hidden, self.q, self.kv, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def param_counts(arch: Arch) -> dict[str, int]:
    """Parameters by group: embeddings, head (0 when tied), decoder linears, norms and biases."""
    per_layer_linear = sum(i * o for i, o in arch.linears().values())
    per_layer_other = arch.norms * arch.hidden + (2 * arch.head_dim if arch.qk_norm else 0)
    if arch.bias:
        per_layer_other += arch.q + 2 * arch.kv
    return {
        "embed": arch.vocab * arch.hidden,
        "head": 0 if arch.tied else arch.vocab * arch.hidden,
        "linear": arch.layers * per_layer_linear,
        "other": arch.layers * per_layer_other + arch.hidden,  # + final norm
    }


def lora_param_count(arch: Arch, r: int, targets) -> int:
    """r x (in + out) for every adapted linear (a target matches by module-name suffix)."""
    names = {t.rsplit(".", 1)[-1] for t in targets}
    return arch.layers * sum(r * (i + o) for name, (i, o) in arch.linears().items() if name in names)


def weight_bytes(arch: Arch, dtype_bytes: int, weight_bits: int | None = None, other_bytes: int | None = None) -> int:
    """Bytes of the weights; ``weight_bits``: the decoder linears quantised (+ constants),
    embeddings, head and norms in ``other_bytes`` (default 16 bit)."""
    n = param_counts(arch)
    if weight_bits is None:
        return dtype_bytes * sum(n.values())
    bits = NF4_BITS if weight_bits == 4 else weight_bits
    return math.ceil(n["linear"] * bits / 8) + (other_bytes or 2) * (n["embed"] + n["head"] + n["other"])


def layer_activation_bytes(arch: Arch, a: int, targets) -> int:
    """Bytes one decoder layer keeps for backward per token (see the module docstring)."""
    h, q, kv, i = arch.hidden, arch.q, arch.kv, arch.intermediate
    names = {t.rsplit(".", 1)[-1] for t in targets}
    norms = arch.norms * 4 * h + ((4 if a < 4 else a) * (q + kv) if arch.qk_norm else 0)
    if a < 4:  # autocast: each adapter (down_proj's too) casts and keeps its own copy of its input
        lora_inputs = a * sum(fan_in for name, (fan_in, _) in arch.linears().items() if name in names)
    else:  # one saved tensor per distinct input: attention in, o_proj in, MLP in
        groups = [({"q_proj", "k_proj", "v_proj"}, h), ({"o_proj"}, q), ({"gate_proj", "up_proj"}, h)]
        lora_inputs = a * sum(size for members, size in groups if members & names)
    attention = a * 4 * q
    mlp = a * 4 * i  # gate, silu(gate), up, product (= down_proj's input)
    return norms + lora_inputs + attention + mlp


def resolve_dtype_name(requested: str) -> str:
    """model.dtype as mediagent.pipeline.base_model resolves it: auto is bfloat16 on a bf16 GPU, else float32."""
    if requested != "auto":
        return requested
    import torch  # only for auto: which device this process will train on

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def _resolved(params: Params) -> tuple[int, bool, bool, str]:
    """(micro-batch, gradient checkpointing, chunked loss, quantization) as params fix them;
    ``auto`` entries take the plan's first choice (the whole batch, no checkpointing)."""
    t = params.train
    micro = t.micro_batch_size if isinstance(t.micro_batch_size, int) else t.per_device_train_batch_size
    gc = t.gradient_checkpointing if isinstance(t.gradient_checkpointing, bool) else False
    return micro, gc, t.loss == "chunked", params.model.quantization


def train_plan(
    arch: Arch,
    params: Params,
    dtype: str,
    weight_bits: int | None = None,
    gradient_checkpointing: bool | None = None,
    seq_len: int | None = None,
    micro_batch: int | None = None,
    chunked_loss: bool | None = None,
    learned_tokens: int | None = None,
) -> dict[str, int]:
    """Bytes of one training process at its peak (see the module docstring).

    The knobs default to what params fix (``auto`` as the plan's first choice); pass them to
    price another plan. ``seq_len``: the longest padded batch (default
    ``train.max_seq_length``). Batches are padded to their own longest example, so data
    shorter than the cap peaks lower: pass the longest encoded example to compare with a
    measured run; likewise ``learned_tokens``, the tokens per micro-batch whose label is not
    masked (default: all of them, the worst case for the chunked loss). ``weight_bits=4``: the QLoRA base (NF4 linears; the rest upcast to float32
    by peft's ``prepare_model_for_kbit_training``).
    """
    t, a = params.train, DTYPE_BYTES[dtype]
    micro0, gc0, chunked0, quant0 = _resolved(params)
    gc = gc0 if gradient_checkpointing is None else gradient_checkpointing
    micro = micro_batch or micro0
    chunked = chunked0 if chunked_loss is None else chunked_loss
    if weight_bits is None and quant0 == "nf4":
        weight_bits = 4
    seq_len = min(seq_len or t.max_seq_length, t.max_seq_length)
    tokens = micro * seq_len
    eval_tokens = t.per_device_eval_batch_size * seq_len
    layer = layer_activation_bytes(arch, a, params.lora.target_modules)
    full = arch.layers * layer * tokens
    checkpointed = (arch.layers * a * arch.hidden + layer) * tokens
    lora = lora_param_count(arch, params.lora.r, params.lora.target_modules)
    if chunked:
        # one chunk's float32 logits, log-softmax and gradient alive at once, plus the
        # learned positions' hidden states gathered for the head (all tokens, at worst)
        learned = tokens if learned_tokens is None else min(learned_tokens, tokens)
        logits = 3 * 4 * min(CHUNK_TOKENS, learned) * arch.vocab + a * learned * arch.hidden
        eval_logits = 2 * 4 * min(CHUNK_TOKENS, eval_tokens) * arch.vocab
    else:
        logits = 3 * 4 * tokens * arch.vocab
        eval_logits = 2 * 4 * eval_tokens * arch.vocab
    # bitsandbytes dequantizes a 4-bit layer's weight to the compute dtype for each matmul
    # (forward, and backward for the input's gradient): the largest layer, twice, at a time.
    dequant = 2 * a * max(i * o for i, o in arch.linears().values()) if weight_bits else 0
    out = {
        "weights": weight_bytes(arch, a, weight_bits, other_bytes=4 if weight_bits else None) + dequant,
        "lora_params": lora,
        "lora_state": lora * LORA_STATE_BYTES,
        "activations": checkpointed if gc else full,
        "activations_no_gc": full,
        "activations_gc": checkpointed,
        "logits": logits,
        "eval_logits": eval_logits,
    }
    fixed = out["weights"] + out["lora_state"]
    out["peak"] = fixed + max(out["activations"] + logits, eval_logits)
    out["peak_no_gc"] = fixed + max(full + logits, eval_logits)
    out["peak_gc"] = fixed + max(checkpointed + logits, eval_logits)
    return out


def train_peak_bytes(config: dict, params: Params, seq_len: int | None = None) -> int:
    """Estimated peak bytes of the train stage for this base config and params (framework
    not included), for batches of ``seq_len`` tokens (default ``train.max_seq_length``)."""
    return train_plan(Arch.from_config(config), params, resolve_dtype_name(params.model.dtype), seq_len=seq_len)["peak"]


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


def usable_bytes(budget: int) -> int:
    """What a plan may use of a budget: MARGIN kept free for the allocator's fragmentation."""
    return int(budget * (1 - MARGIN))


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def choose_plan(
    config: dict, params: Params, budget: int, dtype: str | None = None, allow_quantization: bool | None = None
) -> dict:
    """The first plan, in ORDER, whose estimate (+ RUNTIME_BYTES) fits ``usable_bytes(budget)``.

    Knobs params fix stay fixed: an int ``train.micro_batch_size``, a bool
    ``train.gradient_checkpointing``, ``train.loss`` and ``model.quantization``; ``auto``
    ones are searched. Returns a dict with ``fits``, ``estimate_bytes`` (peak + runtime) and
    ``plan`` (the TrainingArguments values), plus ``options``: what each alternative needs.
    """
    arch, t = Arch.from_config(config), params.train
    dtype = dtype or resolve_dtype_name(params.model.dtype)
    allow = t.allow_quantization if allow_quantization is None else allow_quantization
    room = usable_bytes(budget)
    batch = t.per_device_train_batch_size
    micros = _divisors_desc(batch) if t.micro_batch_size == "auto" else [t.micro_batch_size]
    gcs = [False, True] if t.gradient_checkpointing == "auto" else [t.gradient_checkpointing]
    chunked = t.loss == "chunked"
    quants = [params.model.quantization]
    if params.model.quantization == "none":
        quants.append("nf4")  # priced always; chosen only when allowed

    def estimate(quant: str, gc: bool, micro: int, loss_chunked: bool = chunked) -> int:
        return (
            train_plan(
                arch, params, dtype, 4 if quant == "nf4" else None, gc, micro_batch=micro, chunked_loss=loss_chunked
            )["peak"]
            + RUNTIME_BYTES
        )

    def as_plan(quant: str, gc: bool, micro: int, loss_chunked: bool = chunked) -> dict:
        return {
            "per_device_train_batch_size": micro,
            "gradient_accumulation_steps": t.gradient_accumulation_steps * (batch // micro),
            "gradient_checkpointing": gc,
            "chunked_loss": loss_chunked,
            "quantization": quant,
        }

    chosen = None
    for quant in quants:
        if quant != params.model.quantization and not allow:
            continue
        for gc in gcs:
            for micro in micros:
                if estimate(quant, gc, micro) <= room:
                    chosen = (quant, gc, micro)
                    break
            if chosen:
                break
        if chosen:
            break
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
        "budget_bytes": budget,
        "usable_bytes": room,
        "fits": chosen is not None,
        "estimate_bytes": estimate(*chosen) if chosen else smallest["estimate_bytes"],
        "plan": as_plan(*chosen) if chosen else None,
        "options": options,
    }
    if chosen is None:
        fits_4bit = [o for o in options if o["quantization"] == "nf4" and o["estimate_bytes"] <= room]
        result["fits_with_quantization"] = bool(fits_4bit) and not allow
        result["needs"] = (
            "fits only with a 4-bit base: set train.allow_quantization: true (QLoRA, NF4)"
            if result["fits_with_quantization"]
            else f"nothing fits {_gib(room)} (the smallest option needs {_gib(smallest['estimate_bytes'])}): "
            f"a shorter train.max_seq_length, a smaller lora.r or fewer lora.target_modules, a bigger device, "
            f"or several (configs/accelerate)"
        )
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
            f"quantization {p['quantization']}: ~{_gib(choice['estimate_bytes'])} with runtime"
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
        f"estimate + {RUNTIME_BYTES // GIB} GiB runtime against {1 - MARGIN:.0%} of the card. yes = fits at the "
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
            room = usable_bytes(g * GIB) - RUNTIME_BYTES
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
    choice = choose_plan(config, params, budget, dtype)
    choice["budget_source"] = source
    if not choice["fits"]:
        raise UserError(
            f"no training plan fits {_gib(choice['usable_bytes'])} of {source}: {choice['needs']}\n"
            + format_choice(choice)
        )
    return choice
