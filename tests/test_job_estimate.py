"""Disk estimates (mediagent/job_estimate.py) against files the real code writes.

The tiny base is saved by the `base` stage's own builder; the adapter by peft's
save_pretrained on that base with params.yaml's LoRA settings, float32 as on a 16-bit base.
"""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mediagent.commands.preflight import command as preflight
from mediagent.job_estimate import disk_bytes
from tests.conftest import ROOT


def tensor_bytes(path) -> tuple[int, int]:
    """(bytes of the tensors, bytes per element) of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118 (safe_open has no iterator)
    return sum(t.numel() * t.element_size() for t in tensors), tensors[0].element_size()


def test_disk_estimate_matches_saved_base_and_adapter(tmp_path, tiny_base, repo_params):
    config = json.loads((tiny_base / "config.json").read_text(encoding="utf-8"))
    base_bytes, per_weight = tensor_bytes(tiny_base / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
    lora = repo_params.lora
    peft_model = get_peft_model(
        model, LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, target_modules=list(lora.target_modules))
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter_bytes, adapter_per_weight = tensor_bytes(tmp_path / "adapter" / "adapter_model.safetensors")

    disk = disk_bytes(config, repo_params, weight_dtype_bytes=per_weight)
    assert adapter_per_weight == 4  # peft keeps LoRA weights in float32 on a bf16 base
    assert disk["adapter"] == adapter_bytes
    # tied embeddings are stored once; the estimate counts every parameter once
    assert disk["base"] == base_bytes == disk["merged"]
    assert disk["dvc_cache"] == 2 * base_bytes + adapter_bytes


def test_preflight_json_has_disk_bytes_for_a_hub_model(monkeypatch):
    monkeypatch.chdir(ROOT)  # params.yaml of the repository; nothing is downloaded
    result = CliRunner().invoke(preflight, ["--base", "Qwen/Qwen3-8B", "--memory-gb", "24", "--json"])
    assert result.exit_code == 0, result.output
    disk = json.loads(result.output.strip().splitlines()[-1])["disk_bytes"]
    # Qwen3-8B has 8.2B parameters (its model card): ~16.4 GB in bfloat16, the merged model as much
    assert 16.0e9 < disk["base"] == disk["merged"] < 16.8e9
    assert disk["total"] == disk["dvc_cache"] + disk["checkpoints"] and "link" in disk["assumes"]
    assert "disk: base 16.38 GB" in result.output
