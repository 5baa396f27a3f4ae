"""The `tiny` base: deterministic bytes, Qwen's real token ids, the project's chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mediagent.fileio import md5_dir
from mediagent.loading import BaseModelError, check_model_dir, load_tokenizer
from mediagent.pipeline.base_model import build_tiny
from tests.formats import MESSAGES, QWEN3_PROMPT


def test_same_params_same_bytes(tmp_path, repo_params, tiny_base):
    again = tmp_path / "tiny"
    build_tiny(repo_params.tiny, again)
    assert md5_dir(again) == md5_dir(tiny_base)
    assert sorted(p.name for p in again.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_other_seed_other_weights(tmp_path, repo_params, tiny_base):
    from mediagent.params import with_overrides

    other = tmp_path / "tiny"
    build_tiny(with_overrides(repo_params, tiny={"seed": 1}).tiny, other)
    assert (other / "model.safetensors").read_bytes() != (tiny_base / "model.safetensors").read_bytes()


def test_real_qwen_token_ids(tiny_base):
    tok = load_tokenizer(tiny_base)
    assert tok("你好", add_special_tokens=False)["input_ids"] == [108386]
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    assert ids == [151643, 151644, 151645, 151667, 151668]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_saved_chat_template_is_the_training_format(tiny_base):
    tok = load_tokenizer(tiny_base)
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == QWEN3_PROMPT


def test_missing_or_pickled_base_is_refused(tmp_path):
    with pytest.raises(BaseModelError, match="make base"):
        check_model_dir(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "tokenizer_config.json").write_text("{}")
    (bad / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(BaseModelError, match="only safetensors"):
        check_model_dir(bad)


# ---------------------------------------------------------------- `make base` from a hub


COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "rehearsal/Qwen3-8B-small"


@pytest.fixture(scope="module")
def hub_checkpoint(tmp_path_factory) -> Path:
    """The Qwen3-8B-structured rehearsal checkpoint (bf16, untied, 3 shards), as the hub holds it."""
    from rehearsal.checkpoint import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("hub") / "repo")


@pytest.fixture
def hub(hub_checkpoint, monkeypatch):
    """The loopback hub, with huggingface_hub pointed at it (its endpoint is read at import)."""
    from rehearsal.hosts import LoopbackHub

    with LoopbackHub(REPO, COMMIT, hub_checkpoint) as server:
        import huggingface_hub.constants as hf_constants

        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        yield server


def files_under(root: Path) -> list[Path]:
    """Every file under root: a failed download must leave none (no partial model dir, no temp)."""
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def hub_model(tmp_path, revision=COMMIT, source="huggingface"):
    """model params for REPO at revision from a hub (huggingface or modelscope), into tmp_path/models."""
    from mediagent.params import ModelParams

    return ModelParams(
        base=REPO,
        revision=revision,
        dir=str(tmp_path / "models"),
        source=source,
        dtype="bfloat16",
        trust_remote_code=False,
        quantization="none",
        gguf="",
        chat_template="auto",
        chat_template_kwargs={"enable_thinking": False},
    )


def test_hub_download_fetches_the_needed_files_once(tmp_path, hub, hub_checkpoint):
    from mediagent.pipeline.base_model import FETCH_RECORD, provision

    model = hub_model(tmp_path)
    path = provision(model, None)
    wanted = sorted(p.name for p in hub_checkpoint.iterdir())
    assert sorted(hub.downloads) == wanted  # each file once, nothing else
    assert sorted(p.name for p in path.iterdir()) == sorted(wanted + [FETCH_RECORD])  # no .cache, no temp
    record = json.loads((path / FETCH_RECORD).read_text())
    assert record["revision"] == COMMIT and sorted(record["files"]) == wanted
    assert (
        record["files"]["model-00001-of-00003.safetensors"]["sha256"] == hub.sha256["model-00001-of-00003.safetensors"]
    )
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "bfloat16"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]

    before = hub.count()
    provision(model, None)  # a second `make base`
    assert hub.count() == before


def test_unknown_revision_fails_clearly_and_writes_nothing(tmp_path, hub):
    from mediagent.pipeline.base_model import provision

    with pytest.raises(BaseModelError, match=r"model.revision.*Nothing was written") as err:
        provision(hub_model(tmp_path, revision="f" * 40), None)
    assert "RevisionNotFoundError" in str(err.value)
    assert not files_under(tmp_path / "models")


def test_dropped_connection_fails_and_leaves_no_partial_dir(tmp_path, hub):
    from mediagent.pipeline.base_model import provision

    hub.drop.add("model-00002-of-00003.safetensors")
    with pytest.raises(BaseModelError, match="could not download"):
        provision(hub_model(tmp_path), None)
    assert not files_under(tmp_path / "models")


def test_corrupted_shard_is_detected_by_name(tmp_path, hub):
    from mediagent.pipeline.base_model import provision

    hub.corrupt.add("model-00003-of-00003.safetensors")
    with pytest.raises(BaseModelError, match=r"model-00003-of-00003.safetensors: downloaded bytes do not match"):
        provision(hub_model(tmp_path), None)
    assert not files_under(tmp_path / "models")
