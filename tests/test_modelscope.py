"""`make base` with ``model.source: modelscope``: the real ModelScope client over HTTP on 127.0.0.1.

The loopback stand-in (rehearsal/hosts.py) answers the routes the pinned client calls and
serves the Qwen3-8B-structured rehearsal checkpoint plus two files that must never be
fetched (a README and pickle weights). Faults are switched on per file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from mediagent.loading import BaseModelError
from tests.test_base import REPO, files_under, hub_model

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
SOURCE = "modelscope"
NOT_FETCHED = ("README.md", "pytorch_model.bin")


@pytest.fixture(scope="module")
def ms_checkpoint(tmp_path_factory) -> Path:
    """The rehearsal checkpoint as the ModelScope repository holds it, with files outside HUB_FILES."""
    from rehearsal.checkpoint import build_checkpoint

    repo = build_checkpoint(tmp_path_factory.mktemp("modelscope") / "repo")
    (repo / "README.md").write_text("# Qwen3-8B-small\n", encoding="utf-8")
    (repo / "pytorch_model.bin").write_bytes(b"pickle weights must never be fetched")
    return repo


@pytest.fixture
def ms(ms_checkpoint, tmp_path, monkeypatch):
    """The loopback ModelScope, with the client pointed at it; its cache and login outside models/."""
    from rehearsal.hosts import LoopbackModelScope

    with LoopbackModelScope(REPO, COMMIT, ms_checkpoint) as server:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
        monkeypatch.delenv("MODELSCOPE_DOMAIN", raising=False)
        monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
        monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
        monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms-home"))
        yield server


def test_fetches_the_needed_files_verified_and_once(tmp_path, ms, ms_checkpoint):
    from mediagent.pipeline.base_model import FETCH_RECORD, provision

    model = hub_model(tmp_path, COMMIT, SOURCE)
    path = provision(model, None)
    wanted = sorted(p.name for p in ms_checkpoint.iterdir() if p.name not in NOT_FETCHED)
    assert sorted(ms.downloads) == wanted  # each file once; no README, no pickle weights
    assert sorted(p.name for p in path.iterdir()) == sorted(wanted + [FETCH_RECORD])
    # The listing was asked at the pinned revision, once.
    listings = [p for _, p in ms.requests if "/repo/files" in p]
    assert len(listings) == 1 and f"Revision={COMMIT}" in listings[0]

    record = json.loads((path / FETCH_RECORD).read_text())
    assert (record["repo"], record["revision"], record["source"]) == (REPO, COMMIT, "modelscope")
    assert sorted(record["files"]) == wanted
    for name in wanted:
        data = (path / name).read_bytes()
        assert data == (ms_checkpoint / name).read_bytes()
        assert record["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "bfloat16"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp folder left

    before = ms.count()
    assert provision(model, None) == path  # a second `make base`
    assert ms.count() == before


def test_unknown_revision_fails_clearly_and_writes_nothing(tmp_path, ms):
    from mediagent.pipeline.base_model import provision

    # "main" is Hugging Face's default branch; on ModelScope it is unknown, and the hub lists
    # no files for it with HTTP 200 (the client alone would "download" an empty folder).
    with pytest.raises(BaseModelError, match=r"model.revision 'main' was not found.*branches and tags: master") as err:
        provision(hub_model(tmp_path, "main", SOURCE), None)
    assert "Nothing was written" in str(err.value)
    assert ms.downloads == []
    assert not files_under(tmp_path / "models")


def test_dropped_connection_names_the_file_and_leaves_nothing(tmp_path, ms, monkeypatch):
    from mediagent import compat
    from mediagent.pipeline.base_model import provision

    # The client's own retry count (MODELSCOPE_DOWNLOAD_MAX_RETRIES, read at its import):
    # one retry instead of five keeps its backoff from costing half a minute here.
    monkeypatch.setattr(compat.modelscope_download_module(), "DOWNLOAD_RETRY_TIMES", 1)
    shard = "model-00002-of-00003.safetensors"
    ms.drop.add(shard)
    with pytest.raises(BaseModelError, match=rf"{shard}: .*could not download {REPO}@{COMMIT} from ModelScope"):
        provision(hub_model(tmp_path, COMMIT, SOURCE), None)
    assert ms.downloads.count(shard) == 2  # the client resumed once, then gave up
    assert not files_under(tmp_path / "models")


def test_corrupted_shard_of_the_right_size_is_named(tmp_path, ms):
    from mediagent.pipeline.base_model import provision

    shard = "model-00003-of-00003.safetensors"
    ms.corrupt.add(shard)
    with pytest.raises(BaseModelError, match=rf"{shard}: .*Hash mismatch for {shard}"):
        provision(hub_model(tmp_path, COMMIT, SOURCE), None)
    assert not files_under(tmp_path / "models")


def test_own_check_catches_a_file_changed_after_the_client(tmp_path, ms_checkpoint):
    """verify_download does not rely on the client: same size, one byte changed, named."""
    from mediagent.pipeline.base_model import verify_download

    folder = tmp_path / "fetched"
    shutil.copytree(ms_checkpoint, folder)
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    assert sorted(verify_download(folder, digests, "modelscope")) == sorted(digests)

    shard = folder / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(
        BaseModelError,
        match=r"model-00001-of-00003.safetensors: downloaded bytes do not match "
        r"the ModelScope file listing's sha256",
    ):
        verify_download(folder, digests, "modelscope")
