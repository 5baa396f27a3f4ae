"""The size model: a decoder's architecture from ``config.json`` and the bytes a LoRA training
process holds at its peak. Pure arithmetic: no model, no tokenizer, no GPU. The plan search and
the logs built on it live in :mod:`mediagent.memory`, which re-exports these names.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mediagent.loss import CHUNK_TOKENS
from mediagent.params import Params

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LORA_STATE_BYTES = 16  # fp32 param + fp32 grad + AdamW exp_avg + exp_avg_sq
NF4_BITS = 4.127  # 4-bit NF4 + double-quantised block constants (QLoRA)
GIB = 1 << 30


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


def logits_bytes(
    arch: Arch, a: int, tokens: int, eval_tokens: int, chunked: bool, learned_tokens: int | None
) -> tuple[int, int]:
    """(training, in-training evaluation) bytes of the loss's float32 logits (see the module docstring)."""
    if chunked:
        # one chunk's float32 logits, log-softmax and gradient alive at once, plus the
        # learned positions' hidden states gathered for the head (all tokens, at worst)
        learned = tokens if learned_tokens is None else min(learned_tokens, tokens)
        logits = 3 * 4 * min(CHUNK_TOKENS, learned) * arch.vocab + a * learned * arch.hidden
        return logits, 2 * 4 * min(CHUNK_TOKENS, eval_tokens) * arch.vocab
    return 3 * 4 * tokens * arch.vocab, 2 * 4 * eval_tokens * arch.vocab


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
    logits, eval_logits = logits_bytes(arch, a, tokens, eval_tokens, chunked, learned_tokens)
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
