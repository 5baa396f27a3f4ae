"""The `merge` stage on the tiny base with a non-zero LoRA and real held-out data.

Parity must hold for a correct merge and fail for a tampered one (without touching a
previous merged model); the merged model must reload on its own, tied, with the training
chat template and the adapter's lineage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mediagent.artifacts import ArtifactError
from mediagent.fileio import md5_dir
from mediagent.loading import load_model, load_tokenizer
from mediagent.params import with_overrides
from mediagent.pipeline import merge
from tests.adapter_kit import write_adapter, write_processed
from tests.formats import MESSAGES, QWEN3_PROMPT


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, sample_data, tiny_base):
    """Processed sample data and a non-zero adapter on the tiny base, shared by the tests."""
    root = tmp_path_factory.mktemp("merge")
    write_processed(sample_data, root / "processed", n_train=4, n_val=2, n_test=4, negatives=3)
    write_adapter(tiny_base, root / "adapter")
    return root


def stage_params(repo_params, tiny_base: Path, root: Path, **merge_overrides):
    return with_overrides(
        repo_params,
        data={"processed_dir": str(root / "processed")},
        model={"dir": str(tiny_base.parent), "base": "tiny"},
        train={"output_dir": str(root / "adapter")},
        merge={
            "output_dir": str(root / "merged"),
            "metrics_file": str(root / "metrics" / "merge.json"),
            "parity_prompts": 2,
            **merge_overrides,
        },
    )


@pytest.fixture(scope="module")
def merged(repo_params, tiny_base, workdir):
    """One real run of the stage; returns its params."""
    params = stage_params(repo_params, tiny_base, workdir)
    merge.main(params)
    return params


def test_merge_parity_tied_reload_and_lineage(tiny_base, workdir, merged):
    params, out = merged, workdir / "merged"
    metrics = json.loads((workdir / "metrics" / "merge.json").read_text())
    assert set(metrics) == {
        "max_abs_diff",
        "mean_abs_diff",
        "prompts",
        "tokens",
        "tolerance",
        "dtype",
        "shards",
        "reference_max_abs_logit",
    }
    assert metrics["dtype"] == "float32" and metrics["shards"] == 1
    assert metrics["prompts"] == 2 and metrics["tokens"] > 40
    assert metrics["max_abs_diff"] <= params.merge.tolerance

    # The merge really changed the model (non-vacuous): merged logits differ from the base.
    seqs = merge.parity_sequences(workdir / "processed", load_tokenizer(out), 2)
    base = load_model(tiny_base, params.model, torch.float32)
    reloaded = load_model(out, params.model, torch.float32)
    base_logits, merged_logits = merge.sequence_logits(base, seqs), merge.sequence_logits(reloaded, seqs)
    assert merge.logits_parity(base_logits, merged_logits)["max_abs_diff"] > 100 * params.merge.tolerance

    # Standalone artifact: tied embeddings intact, no LoRA left, same dtype, template, lineage.
    assert reloaded.config.tie_word_embeddings
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(reloaded.lm_head.weight, base.lm_head.weight)  # LoRA never touches embeddings
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "lineage.json",
    } <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    tok = load_tokenizer(out)
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == QWEN3_PROMPT
    lineage = json.loads((out / "lineage.json").read_text())
    adapter_lineage = json.loads((workdir / "adapter" / "lineage.json").read_text())
    assert {k: v for k, v in lineage.items() if k != "merge"} == adapter_lineage
    assert lineage["merge"]["dtype"] == "float32" and len(lineage["merge"]["adapter_md5"]) == 32


def test_rerun_same_bytes_and_tampered_merge_fails_atomically(repo_params, tiny_base, workdir, merged):
    params = stage_params(repo_params, tiny_base, workdir, output_dir=str(workdir / "merged_again"))
    merge.main(params)
    before = md5_dir(workdir / "merged_again")
    assert before == md5_dir(workdir / "merged")  # same inputs, same bytes
    metrics_before = (workdir / "metrics" / "merge.json").read_bytes()

    def tamper(model):  # one output row of one layer nudged by 1% of its largest weight: a "slightly wrong" merge
        with torch.no_grad():
            w = model.model.layers[0].self_attn.o_proj.weight
            w[0] += 0.01 * w.abs().max()

    with pytest.raises(merge.ParityError, match="merge.tolerance"):
        merge.main(params, after_reload=tamper)
    assert md5_dir(workdir / "merged_again") == before  # the previous out survives
    assert (workdir / "metrics" / "merge.json").read_bytes() == metrics_before
    assert not [p for p in workdir.iterdir() if p.name.startswith(".merged_again")]  # no temp dirs left


def test_missing_adapter_names_train(repo_params, tiny_base, tmp_path, workdir):
    params = with_overrides(
        stage_params(repo_params, tiny_base, workdir, output_dir=str(tmp_path / "merged")),
        train={"output_dir": str(tmp_path / "no_adapter")},
    )
    with pytest.raises(ArtifactError, match="dvc repro train"):
        merge.main(params)
    assert not (tmp_path / "merged").exists()


def test_adapter_from_another_base_is_refused(repo_params, tiny_base, tmp_path, workdir):
    other = shutil.copytree(workdir / "adapter", tmp_path / "adapter")
    lineage = json.loads((other / "lineage.json").read_text())
    (other / "lineage.json").write_text(json.dumps({**lineage, "base": {**lineage["base"], "id": "Qwen/Qwen3-8B"}}))
    params = with_overrides(
        stage_params(repo_params, tiny_base, workdir, output_dir=str(tmp_path / "merged")),
        train={"output_dir": str(other)},
    )
    with pytest.raises(ArtifactError, match=r"model.base=Qwen/Qwen3-8B"):
        merge.main(params)

    # Same id, other bytes (e.g. other tiny params): the config md5 catches it.
    lineage = json.loads((other / "lineage.json").read_text())
    lineage["base"] = {**lineage["base"], "id": "tiny", "config_md5": "0" * 32}
    (other / "lineage.json").write_text(json.dumps(lineage))
    with pytest.raises(ArtifactError, match="config.json md5"):
        merge.main(params)


def test_quantized_base_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"dtype": "bfloat16", "quantization_config": {"quant_method": "bitsandbytes"}})
    )
    with pytest.raises(merge.MergeError, match="quantized"):
        merge.base_dtype(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert merge.base_dtype(tmp_path) == torch.bfloat16


# ------------------------------------------- the Qwen3-8B structure: untied, bf16, sharded


def test_untied_bf16_sharded_base_through_train_and_merge(tmp_path, monkeypatch, repo_params, sample_data):
    """The real train and merge stages on a Qwen3-8B-structured base (rehearsal checkpoint).

    Untied lm_head, bfloat16 weights in three shards and Qwen3's own chat template: the
    adapter and the merged model must render today's prompt from it, the merged model must be
    bfloat16 in several shards (safetensors headers say BF16), and the parity check runs
    in bfloat16 against its relative bound.
    """
    from safetensors import safe_open

    from mediagent.pipeline import train
    from rehearsal.checkpoint import QWEN3_CHAT_TEMPLATE, build_checkpoint

    base = build_checkpoint(tmp_path / "models" / "base" / "rehearsal" / "qwen3-8b-small")
    assert load_tokenizer(base).chat_template == QWEN3_CHAT_TEMPLATE  # the hub's, not ours
    write_processed(sample_data, tmp_path / "data" / "processed", n_train=8, n_val=2, n_test=2, negatives=3)
    monkeypatch.chdir(tmp_path)
    params = with_overrides(
        repo_params,
        model={"base": "rehearsal/qwen3-8b-small", "dtype": "bfloat16"},
        train={
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "max_seq_length": 96,
            "eval_steps": 2,
            "save_steps": 2,
            "logging_steps": 1,
            "warmup_steps": 0,
            "max_eval_examples": 2,
            "learning_rate": 0.01,
        },
        lora={"r": 8, "lora_alpha": 16},
        merge={"parity_prompts": 2, "max_shard_size": "30MB"},
    )
    train.main(params)
    merge.main(params)

    metrics = json.loads(Path(params.merge.metrics_file).read_text())
    assert metrics["dtype"] == "bfloat16" and metrics["shards"] >= 2
    assert 0 < metrics["max_abs_diff"] <= metrics["tolerance"]
    assert metrics["tolerance"] == pytest.approx(params.merge.relative_tolerance * metrics["reference_max_abs_logit"])
    out = Path(params.merge.output_dir)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == metrics["shards"] and (out / "model.safetensors.index.json").is_file()
    dtypes = set()
    names = set()
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                dtypes.add(f.get_slice(key).get_dtype())
                names.add(key)
    assert dtypes == {"BF16"}
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= names  # untied: both stored
    reloaded = load_model(out, params.model, torch.bfloat16)
    assert not reloaded.config.tie_word_embeddings
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()
    for where in (Path(params.train.output_dir), out):
        tok = load_tokenizer(where)  # the hub template with enable_thinking=false frozen in: today's prompt
        assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == QWEN3_PROMPT

    # A slightly wrong bf16 merge still fails the relative bound.
    def tamper(model):
        with torch.no_grad():
            model.lm_head.weight[:, :8] *= 4

    with pytest.raises(merge.ParityError, match="relative_tolerance"):
        merge.main(params, after_reload=tamper)
