"""The pre-flight plan: exact arithmetic on published Qwen3 configs, ordering properties,
LLaMA-Factory's published memory table, and the measured peak RSS of real CPU training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mediagent import memory as pf
from mediagent.commands.preflight import main as preflight_main
from mediagent.params import with_overrides
from tests.adapter_kit import candidates, sample_pairs
from tests.conftest import ROOT

GB = 1e9


def _params(repo_params, **train):
    return with_overrides(repo_params, train=train) if train else repo_params


# ---------------------------------------------------------------- exact arithmetic


def test_qwen3_8b_weights_and_lora_params_exact(repo_params):
    arch = pf.Arch.from_config(pf.qwen3_config("Qwen3-8B"))
    n = pf.param_counts(arch)
    assert n["embed"] == n["head"] == 151936 * 4096  # untied: the head is a second matrix
    per_layer = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 12288
    assert n["linear"] == 36 * per_layer
    assert n["other"] == 36 * (2 * 4096 + 2 * 128) + 4096
    assert sum(n.values()) == 8_190_735_360  # Qwen3-8B's published 8.19B
    assert pf.weight_bytes(arch, 2) == 2 * 8_190_735_360
    # r x (in + out) per adapted linear, 36 layers
    r = repo_params.lora.r
    per_layer_lora = r * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 2 * (4096 + 12288) + (12288 + 4096))
    assert pf.lora_param_count(arch, r, repo_params.lora.target_modules) == 36 * per_layer_lora == 43_646_976
    assert pf.lora_param_count(arch, r, ["q_proj", "v_proj"]) == 36 * r * (8192 + 5120)


def test_tied_embeddings_count_once():
    tied = pf.param_counts(pf.Arch.from_config(pf.qwen3_config("Qwen3-0.6B")))
    assert tied["head"] == 0
    assert sum(tied.values()) == 596_049_920  # Qwen3-0.6B's published 0.6B (0.44B without embeddings)
    untied = pf.param_counts(pf.Arch.from_config({**pf.qwen3_config("Qwen3-0.6B"), "tie_word_embeddings": False}))
    assert sum(untied.values()) - sum(tied.values()) == 151936 * 1024


def test_kv_cache_per_token_and_dtype(repo_params):
    cfg = pf.qwen3_config("Qwen3-8B")
    bf16 = pf.plan(cfg, repo_params, "bfloat16")["serve"]
    assert bf16["kv_per_token"] == 2 * 36 * 8 * 128 * 2 == 147_456  # 144 KiB per token
    assert bf16["kv_per_sequence"] == 147_456 * repo_params.serve.max_model_len
    assert pf.plan(cfg, repo_params, "float32")["serve"]["kv_per_token"] == 2 * bf16["kv_per_token"]
    assert pf.plan(cfg, repo_params, "float32")["train"]["weights"] == 2 * bf16["weights"]


def test_config_without_size_fields_is_refused():
    with pytest.raises(ValueError, match="hidden_size"):
        pf.Arch.from_config({"model_type": "qwen3"})


# ---------------------------------------------------------------- ordering properties


def test_orderings(repo_params):
    p = _params(repo_params, per_device_eval_batch_size=1)
    peaks = [pf.train_plan(pf.Arch.from_config(pf.qwen3_config(n)), p, "bfloat16") for n in pf.QWEN3]
    assert [t["weights"] for t in peaks] == sorted(t["weights"] for t in peaks)
    assert [t["peak_gc"] for t in peaks] == sorted(t["peak_gc"] for t in peaks)
    for t in peaks:  # gradient checkpointing keeps far fewer activations
        assert t["activations_gc"] < t["activations_no_gc"] / 4
        assert t["peak_gc"] < t["peak_no_gc"]
    arch = pf.Arch.from_config(pf.qwen3_config("Qwen3-8B"))
    repo_params = _params(repo_params, loss="full")  # logits grow with the batch (the chunked loss caps them)
    small, big = (pf.train_plan(arch, _params(repo_params, per_device_train_batch_size=b), "bfloat16") for b in (1, 8))
    assert big["activations_no_gc"] == 8 * small["activations_no_gc"] and big["logits"] == 8 * small["logits"]
    long = pf.train_plan(arch, _params(repo_params, max_seq_length=2048), "bfloat16")
    assert long["activations"] > pf.train_plan(arch, repo_params, "bfloat16")["activations"]
    n = pf.param_counts(arch)  # QLoRA: NF4 linears; embeddings, head, norms upcast to float32 by peft;
    # the largest linear (gate/up, 4096 x 12288) dequantized to bf16 twice
    assert (
        pf.train_plan(arch, repo_params, "bfloat16", weight_bits=4)["weights"]
        == -(-n["linear"] * 4.127 // 8) + 4 * (n["embed"] + n["head"] + n["other"]) + 2 * 2 * 4096 * 12288
    )
    short = pf.train_plan(arch, repo_params, "bfloat16", seq_len=128)  # data shorter than the cap
    assert short["logits"] * 4 == pf.train_plan(arch, repo_params, "bfloat16")["logits"]
    assert pf.train_plan(arch, repo_params, "bfloat16", seq_len=4096) == pf.train_plan(arch, repo_params, "bfloat16")
    tiny = json.loads(_tiny_config(repo_params))
    assert (
        pf.train_peak_bytes(tiny, repo_params)
        == pf.train_plan(pf.Arch.from_config(tiny), repo_params, pf.resolve_dtype_name("auto"))["peak"]
    )
    gc = _params(repo_params, gradient_checkpointing=True)
    assert pf.train_plan(arch, gc, "bfloat16")["peak"] == pf.train_plan(arch, gc, "bfloat16")["peak_gc"]


def test_logits_dominate_small_models(repo_params):
    tiny = pf.train_plan(pf.Arch.from_config(json.loads(_tiny_config(repo_params))), repo_params, "float32")
    assert tiny["logits"] > 5 * (tiny["weights"] + tiny["activations"])


def _tiny_config(repo_params) -> str:
    t = repo_params.tiny
    return json.dumps(
        {
            "model_type": "qwen3",
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "vocab_size": 151936,
            "tie_word_embeddings": t.tie_word_embeddings,
            "torch_dtype": "float32",
        }
    )


# ---------------------------------------------------------------- published figures


def test_llama_factory_table_7b(repo_params):
    """LLaMA-Factory's README: LoRA 16-bit 7B ~16 GB, QLoRA 4-bit 7B ~6 GB.

    Its setting: a LLaMA-2-7B-shaped model, batch 1, 1024 tokens, gradient checkpointing
    on (its default); plus ~1 GB for the CUDA runtime the plan leaves out.
    """
    llama7b = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }
    p = _params(
        repo_params,
        per_device_train_batch_size=1,
        per_device_eval_batch_size=1,
        max_seq_length=1024,
        gradient_checkpointing=True,
    )
    arch = pf.Arch.from_config(llama7b)
    lora16 = pf.train_plan(arch, p, "bfloat16")["peak"] + 1 * GB
    qlora4 = pf.train_plan(arch, p, "bfloat16", weight_bits=4)["peak"] + 1 * GB
    # Our QLoRA upcasts embeddings, head and norms to float32 (peft's prepare_model_for_kbit_training);
    # the published figure keeps them in 16 bit.
    qlora4 -= pf.weight_bytes(arch, 2, 4, other_bytes=4) - pf.weight_bytes(arch, 2, 4)
    assert lora16 == pytest.approx(16 * GB, rel=0.15), lora16 / GB
    assert qlora4 == pytest.approx(6 * GB, rel=0.15), qlora4 / GB


# ---------------------------------------------------------------- evaluation counts


def test_candidate_counts_from_processed_file(repo_params, sample_data, tmp_path):
    pairs = sample_pairs(sample_data, 12)
    rows = candidates(pairs[:5], pairs, negatives=3)
    (tmp_path / "test_candidates.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    p = with_overrides(repo_params, data={"processed_dir": str(tmp_path)}, eval={"max_questions": 4})
    counts = pf.candidate_counts(p)
    assert counts["questions"] == 4 and counts["candidates"] == 16
    chars = sum(len(c["content"]) for r in rows[:4] for c in r["candidates"])
    assert counts["answer_tokens"] == pytest.approx(chars * pf.TOKENS_PER_CHAR + 16, abs=1)
    e = pf.plan(json.loads(_tiny_config(repo_params)), p, "float32")["eval"]
    assert e["official_answer_tokens"] == pytest.approx(400_000 * counts["answer_tokens"] / 16, rel=1e-6)
    assert pf.candidate_counts(with_overrides(repo_params, data={"processed_dir": str(tmp_path / "none")})) is None


# ---------------------------------------------------------------- measured on a real run

MEASURE = r"""
import json, resource, sys, tempfile
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from mediagent.loading import load_model
from mediagent.loss import use_chunked_loss
from mediagent.memory import measured_peak_bytes
from mediagent.params import parse_params
from mediagent.pipeline.train import attach_lora

cfg, params, knobs = json.loads(sys.argv[1]), parse_params(json.loads(sys.argv[2])), json.loads(sys.argv[3])
torch.manual_seed(0)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
def load(cfg):
    with tempfile.TemporaryDirectory() as tmp:
        # through the project's loader, from safetensors, as the train stage loads a base
        Qwen3ForCausalLM(Qwen3Config(**cfg)).float().save_pretrained(tmp)
        open(f"{tmp}/tokenizer_config.json", "w").write("{}")  # the loader checks for a whole checkpoint
        return load_model(tmp, params.model, torch.float32, quantization=knobs["quantization"])
# Loading imports more libraries on first use (bitsandbytes, deepspeed where installed):
# a throw-away model of 1 small layer loads them first, so that they count as runtime.
warm = load({**cfg, "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 256,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32})
del warm
before = rss()  # interpreter + torch + transformers + peft + what loading imports: the runtime the plan leaves out
t = params.train
model = load(cfg)
# On a CPU, weights loaded in their file's dtype stay views of the mmapped checkpoint,
# which keeps every page read while quantizing mapped (file-backed RSS a GPU never
# holds). Copies make the weights this process's own memory, counted as a GPU counts them.
for p in model.parameters():
    if type(p).__name__ != "Params4bit":
        p.data = p.data.clone()
if knobs["quantization"] != "none":
    from peft import prepare_model_for_kbit_training
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
if knobs["chunked"]:
    use_chunked_loss(model)
model = attach_lora(model, params.lora)
if knobs["gc"]:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.train()
# Loading reads the checkpoint through mmap; those pages are gone once loaded. Reset the
# high-water mark so that it measures training (Linux: 5 > clear_refs resets VmHWM).
open("/proc/self/clear_refs", "w").write("5")
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
micro, accumulation = knobs["micro"], t.per_device_train_batch_size // knobs["micro"]
ids = torch.randint(0, cfg["vocab_size"], (t.per_device_train_batch_size, t.max_seq_length))
labels = ids.clone()
labels[:, : int(t.max_seq_length * knobs["prompt_share"])] = -100  # the prompt: no loss
for _ in range(2):
    for k in range(accumulation):
        rows = slice(k * micro, (k + 1) * micro)
        loss = model(input_ids=ids[rows], labels=labels[rows]).loss / accumulation
        loss.backward()
        del loss
    opt.step()
    opt.zero_grad(set_to_none=True)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (a pytest
# process holding models), while VmHWM is this program's own high-water mark.
peak = measured_peak_bytes()
print(json.dumps({"before": before, "peak": peak}))
"""


def measure(config: dict, params, knobs: dict) -> dict:
    # glibc's malloc raises its mmap threshold after large frees and then keeps freed
    # tensors' pages in its heap: default RSS stays at 1.6-2.6x the live bytes on the
    # layer-heavy cases below. A fixed threshold returns freed tensors to the OS, so the
    # peak RSS measures what was alive at once, which is what the plan (and a GPU) counts.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(config), json.dumps(params.to_dict()), json.dumps(knobs)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


VOCAB152K = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}
LAYERS = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 4096,
    "tie_word_embeddings": False,
}
# weights dominate: where a 4-bit base shows
WIDE = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 4096,
    "tie_word_embeddings": False,
}
BATCH8 = dict(per_device_train_batch_size=8, max_seq_length=256)
CASES = {
    # the tiny default's shape (152k vocab, tied): the fp32 logits are nearly everything
    "vocab152k-full-8x1": (VOCAB152K, BATCH8, dict(chunked=False, micro=8)),
    "vocab152k-chunked-8x1": (VOCAB152K, BATCH8, dict(chunked=True, micro=8)),
    "vocab152k-full-2x4": (VOCAB152K, BATCH8, dict(chunked=False, micro=2)),
    "vocab152k-chunked-2x4": (VOCAB152K, BATCH8, dict(chunked=True, micro=2)),
    # small vocab, more and wider layers: the per-layer activation formula dominates
    "layers-vocab4k": (LAYERS, dict(per_device_train_batch_size=4, max_seq_length=512), dict(chunked=False, micro=4)),
    "layers-vocab4k-gc": (
        LAYERS,
        dict(per_device_train_batch_size=4, max_seq_length=512),
        dict(chunked=False, micro=4, gc=True),
    ),
    # QLoRA vs LoRA on the same weights-heavy model (float32 compute on a CPU)
    "wide-lora": (WIDE, dict(per_device_train_batch_size=2, max_seq_length=128), dict(chunked=True, micro=2)),
    "wide-qlora-nf4": (
        WIDE,
        dict(per_device_train_batch_size=2, max_seq_length=128),
        dict(chunked=True, micro=2, quantization="nf4"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_within_20_percent_of_measured_cpu_training(case, repo_params):
    config, train, knobs = CASES[case]
    knobs = {"gc": False, "quantization": "none", "prompt_share": 0.5, **knobs}
    params = _params(repo_params, per_device_eval_batch_size=1, **train)
    got = measure(config, params, knobs)
    used = got["peak"] - got["before"]
    learned = knobs["micro"] * (train["max_seq_length"] - int(train["max_seq_length"] * knobs["prompt_share"]))
    estimate = pf.train_plan(
        pf.Arch.from_config({"model_type": "qwen3", **config}),
        params,
        "float32",
        weight_bits=4 if knobs["quantization"] == "nf4" else None,
        gradient_checkpointing=knobs["gc"],
        micro_batch=knobs["micro"],
        chunked_loss=knobs["chunked"],
        learned_tokens=learned,
    )["peak"]
    print(
        f"{case}: estimate {estimate / 2**20:.0f} MiB, measured peak RSS {got['peak'] / 2**20:.0f} MiB "
        f"- runtime {got['before'] / 2**20:.0f} MiB = {used / 2**20:.0f} MiB ({estimate / used:.2f}x)"
    )
    assert estimate == pytest.approx(used, rel=0.20)


# ---------------------------------------------------------------- a machine you do not have


def _preflight_json(*args: str) -> dict:
    out = subprocess.run(
        ["make", "-s", "preflight", *args, "JSON=1"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_qwen3_8b_fits_one_24gb_gpu_without_quantization():
    got = _preflight_json("BASE=Qwen/Qwen3-8B", "MEMORY_GB=24")
    assert got["model"] == "Qwen/Qwen3-8B" and got["budget_bytes"] == 24 * 2**30 and got["fits"] is True
    assert got["plan"]["quantization"] == "none" and got["plan"]["chunked_loss"] is True
    assert got["estimate_bytes"] <= 22 * 2**30  # the runtime included
    assert (got["device"], got["runtime_bytes"]) == ("cuda", 2**30)  # priced as the GPU it names
    plan = got["plan"]  # the effective batch is the params' own
    assert plan["per_device_train_batch_size"] * plan["gradient_accumulation_steps"] == 8


def test_qwen3_14b_on_24gb_needs_quantization_and_says_so():
    got = _preflight_json("BASE=Qwen/Qwen3-14B", "MEMORY_GB=24")
    assert got["fits"] is False and got["plan"] is None and got["fits_with_quantization"] is True
    assert "train.allow_quantization" in got["needs"]
    allowed = _preflight_json("BASE=Qwen/Qwen3-14B", "MEMORY_GB=24", "ALLOW_QUANTIZATION=1")
    assert allowed["fits"] is True and allowed["plan"]["quantization"] == "nf4"
    assert allowed["estimate_bytes"] <= 0.9 * 24 * 2**30


def test_runtime_reserve_follows_the_device(repo_params, tiny_base, capsys):
    """The same plan costs 1 GiB more on a GPU (CUDA context) and 0.5 GiB more on a CPU
    (interpreter and libraries) than the model estimate; this machine's preflight prices
    the device the train stage would run on here."""
    config = pf.qwen3_config("Qwen3-0.6B")
    gpu = pf.choose_plan(config, repo_params, 80 * 2**30, "bfloat16", device="cuda")
    cpu = pf.choose_plan(config, repo_params, 80 * 2**30, "bfloat16", device="cpu")
    assert gpu["plan"] == cpu["plan"]
    assert gpu["estimate_bytes"] - cpu["estimate_bytes"] == 2**30 - 2**29
    assert "0.50 GiB cpu runtime" in pf.format_choice(cpu)
    preflight_main(with_overrides(repo_params, model={"dir": str(tiny_base.parent)}), as_json=True)
    here = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert here["device"] == pf.training_device() and here["runtime_bytes"] == pf.RUNTIME_BYTES[here["device"]]


def test_plan_order_and_explicit_values_win(repo_params):
    config = pf.qwen3_config("Qwen3-8B")
    gib = 2**30
    auto = pf.choose_plan(config, repo_params, 80 * gib, "bfloat16")
    assert auto["plan"]["per_device_train_batch_size"] == 8 and not auto["plan"]["gradient_checkpointing"]
    # a fixed micro-batch and checkpointing are kept even where the plan would choose otherwise
    fixed = _params(repo_params, micro_batch_size=2, gradient_checkpointing=True)
    got = pf.choose_plan(config, fixed, 80 * gib, "bfloat16")["plan"]
    assert (got["per_device_train_batch_size"], got["gradient_accumulation_steps"], got["gradient_checkpointing"]) == (
        2,
        4,
        True,
    )
    # nothing fits 8 GiB without 4-bit: the error names the options
    small = pf.choose_plan(config, repo_params, 8 * gib, "bfloat16")
    assert not small["fits"] and "too big" in pf.format_choice(small)
