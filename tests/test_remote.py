"""OSS as the DVC remote, rehearsed on loopback: `dvc push` / `dvc pull` of an adapter.

Alibaba OSS speaks the S3 API, so the remote is `dvc-s3` with `endpointurl` set to the
bucket's region endpoint (docs/real-job.md#team-storage-oss). Here moto's S3 server on
127.0.0.1 stands in for OSS; the real dvc CLI and its S3 client talk to it over HTTP. The
local cache is deleted between push and pull, so the bytes can only come back from the server.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from tests.test_pipeline import git_env, run_ok

BUCKET = "team-models"


@pytest.fixture
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def write_adapter(folder: Path) -> dict[str, str]:
    """An adapter-like folder (weights, config, tokenizer file); returns sha256 per file."""
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (folder / "adapter_config.json").write_text('{"r": 16, "lora_alpha": 32}\n', encoding="utf-8")
    (folder / "tokenizer_config.json").write_text('{"chat_template": "中文"}\n', encoding="utf-8")
    return digests(folder)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_push_pull_adapter_through_s3_endpoint(tmp_path, s3_endpoint):
    # Credentials and AWS config only from this test: never the machine's ~/.aws.
    env = {
        **git_env(),
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    keys = {"aws_access_key_id": "test-key", "aws_secret_access_key": "test-secret"}
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **keys).create_bucket(Bucket=BUCKET)
    repo = tmp_path / "repo"
    repo.mkdir()
    dvc = [sys.executable, "-m", "dvc"]
    run_ok(["git", "init", "-q"], repo, env)
    run_ok([*dvc, "init", "-q"], repo, env)
    # The commands docs/real-job.md gives for OSS, with the loopback endpoint for OSS's.
    run_ok([*dvc, "remote", "add", "-d", "oss", f"s3://{BUCKET}/mediagent"], repo, env)
    run_ok([*dvc, "remote", "modify", "oss", "endpointurl", s3_endpoint], repo, env)
    run_ok([*dvc, "remote", "modify", "oss", "region", "us-east-1"], repo, env)
    run_ok([*dvc, "remote", "modify", "--local", "oss", "access_key_id", "test-key"], repo, env)
    run_ok([*dvc, "remote", "modify", "--local", "oss", "secret_access_key", "test-secret"], repo, env)

    adapter = repo / "models" / "adapter"
    expected = write_adapter(adapter)
    run_ok([*dvc, "add", "models/adapter"], repo, env)
    run_ok([*dvc, "push"], repo, env)

    objects = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **keys)
    stored = objects.list_objects_v2(Bucket=BUCKET, Prefix="mediagent/")
    # three files and the directory listing DVC stores beside them
    assert stored["KeyCount"] == 4

    shutil.rmtree(adapter)
    shutil.rmtree(repo / ".dvc" / "cache")
    run_ok([*dvc, "pull"], repo, env)
    assert digests(adapter) == expected
