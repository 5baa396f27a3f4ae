"""`make data` against a loopback HTTP server.

The real download code runs end to end (HTTP, progress, blob-id check, unzip); only the
mirror URLs point at 127.0.0.1 (one of them a closed port: a mirror that cannot be reached).
Files copied by hand come from a folder or a zip built here (``--from``). The mechanics are tested on candidate zips in the official
layout built here (their blob ids computed here too); one test downloads the real official
dev_candidates.zip and checks it against the pinned blob id in params.yaml.
"""

from __future__ import annotations

import http.server
import io
import random
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import yaml

from mediagent.commands.data import DownloadError, main
from mediagent.fileio import git_blob_id
from mediagent.params import with_overrides

DEV = "dev_candidates.zip"
TEST = "test_candidates.zip"


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves state["files"] (name -> bytes), honours Range, can drop the first response."""

    state: dict = {}

    def do_GET(self):  # noqa: N802 - http.server's naming
        name = self.path.lstrip("/")
        self.state["requests"].append((name, self.headers.get("Range")))
        data = self.state["files"].get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.state.get("drop_first") and len(self.state["requests"]) == 1:
            body = body[: len(body) // 2]  # promise everything, send half, hang up
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    state = {"files": {}, "requests": []}
    handler = type("Handler", (_Files,), {"state": state})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/cMedQA2/pinned"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _serve(state: dict, name: str, data: bytes) -> None:
    # The handler sees the whole path, base URL's included.
    state["files"][f"cMedQA2/pinned/{name}"] = data


def _params(repo_params, state: dict, out_dir: Path, names: list[str], blobs: dict[str, str] | None = None):
    blobs = {n: (blobs or repo_params.download.files)[n] for n in names}
    return with_overrides(repo_params, download={"mirrors": [state["url"]], "out_dir": str(out_dir), "files": blobs})


def _candidates_zip(name: str, seed: int) -> bytes:
    """A candidates zip in the official layout: 100 rows per question, positives first."""
    rng = random.Random(seed)
    rows = ["question_id,ans_id,cnt,label"]
    for q in range(20):
        positives = rng.randint(1, 3)
        rows += [f"{1000 + q},{rng.randrange(226_266)},{c},{int(c < positives)}" for c in range(100)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name.replace(".zip", ".txt"), "\n".join(rows) + "\n")
    return buf.getvalue()


@pytest.fixture(scope="module")
def zips(tmp_path_factory) -> tuple[dict[str, bytes], dict[str, str]]:
    """(name -> bytes, name -> git blob id) of official-layout dev/test candidate zips."""
    data = {DEV: _candidates_zip(DEV, 1), TEST: _candidates_zip(TEST, 2)}
    folder = tmp_path_factory.mktemp("zips")
    blobs = {}
    for name, content in data.items():
        (folder / name).write_bytes(content)
        blobs[name] = git_blob_id(folder / name)
    return data, blobs


def test_real_official_file_matches_pinned_blob(tmp_path, shared_candidates, repo_params, server):
    real = (shared_candidates / DEV).read_bytes()
    _serve(server, DEV, real)
    out = tmp_path / "raw"
    main(_params(repo_params, server, out, [DEV]))
    # The same id git itself computes.
    git = subprocess.run(["git", "hash-object", str(out / DEV)], capture_output=True, text=True, check=True)
    assert git.stdout.strip() == repo_params.download.files[DEV]
    with (out / "dev_candidates.txt").open() as fh:
        assert fh.readline().strip() == "question_id,ans_id,cnt,label"
        assert sum(1 for _ in fh) == 400_000


def test_download_verifies_blob_and_unzips(tmp_path, zips, repo_params, server):
    data, blobs = zips
    real = data[DEV]
    _serve(server, DEV, real)
    out = tmp_path / "raw"
    main(_params(repo_params, server, out, [DEV], blobs))

    assert sorted(p.name for p in out.iterdir()) == ["dev_candidates.txt", DEV]
    git = subprocess.run(["git", "hash-object", str(out / DEV)], capture_output=True, text=True, check=True)
    assert git_blob_id(out / DEV) == blobs[DEV] == git.stdout.strip()
    with zipfile.ZipFile(io.BytesIO(real)) as zf:
        assert (out / "dev_candidates.txt").read_bytes() == zf.read("dev_candidates.txt")
    assert server["requests"] == [(f"cMedQA2/pinned/{DEV}", None)]

    # Rerun: verified files are skipped, nothing is fetched or rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    main(_params(repo_params, server, out, [DEV], blobs))
    assert len(server["requests"]) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_corrupted_download_is_rejected_and_leaves_nothing(tmp_path, zips, repo_params, server):
    data, blobs = zips
    bad = bytearray(data[DEV])
    bad[len(bad) // 2] ^= 0xFF
    _serve(server, DEV, bytes(bad))
    out = tmp_path / "raw"
    with pytest.raises(DownloadError) as err:
        main(_params(repo_params, server, out, [DEV], blobs))
    msg = str(err.value)
    assert "checksum mismatch" in msg and blobs[DEV] in msg and DEV in msg
    assert list(out.iterdir()) == []  # no zip, no partial file, nothing unzipped


def test_good_files_in_place_are_kept(tmp_path, zips, repo_params, server):
    data, blobs = zips
    out = tmp_path / "raw"
    out.mkdir()
    (out / DEV).write_bytes(data[DEV])
    good = (out / DEV).read_bytes()
    # The server only has damaged copies: the good file must be used as is, never replaced.
    bad_dev = bytearray(good)
    bad_dev[100] ^= 0xFF
    _serve(server, DEV, bytes(bad_dev))
    main(_params(repo_params, server, out, [DEV], blobs))
    assert server["requests"] == []
    assert (out / DEV).read_bytes() == good

    bad_test = bytearray(data[TEST])
    bad_test[-100] ^= 0xFF
    _serve(server, TEST, bytes(bad_test))
    with pytest.raises(DownloadError, match="checksum mismatch"):
        main(_params(repo_params, server, out, [DEV, TEST], blobs))
    assert (out / DEV).read_bytes() == good
    assert sorted(p.name for p in out.iterdir()) == ["dev_candidates.txt", DEV]  # no test_candidates.*


def test_dropped_connection_resumes_with_range(tmp_path, zips, repo_params, server):
    data, blobs = zips
    real = data[DEV]
    _serve(server, DEV, real)
    server["drop_first"] = True
    out = tmp_path / "raw"
    main(_params(repo_params, server, out, [DEV], blobs))
    assert (out / DEV).read_bytes() == real
    (first, r1), (second, r2) = server["requests"]
    assert r1 is None and r2 == f"bytes={len(real) // 2}-"


def test_offline_says_what_to_copy(tmp_path, repo_params):
    out = tmp_path / "raw"
    # A port nothing listens on: the connection is refused, as when offline.
    params = with_overrides(repo_params, download={"mirrors": ["http://127.0.0.1:9/x"], "out_dir": str(out)})
    with pytest.raises(DownloadError) as err:
        main(params)
    msg = str(err.value)
    assert "could not reach" in msg and f"copy these files by hand into {out}/" in msg
    for name, blob in repo_params.download.files.items():
        assert name in msg and blob in msg
    assert list(out.iterdir()) == []


def test_tracks_out_dir_with_dvc_inside_a_repo(tmp_path, zips, repo_params, server, capsys):
    data, blobs = zips
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    _serve(server, DEV, data[DEV])
    main(_params(repo_params, server, repo / "data" / "raw", [DEV], blobs))
    pointer = (repo / "data" / "raw.dvc").read_text()
    assert "path: raw" in pointer and "nfiles: 2" in pointer
    assert "git add data/raw.dvc data/.gitignore" in capsys.readouterr().out


# ---------------------------------------------------------------- mirrors and files copied by hand


def _closed_port_url() -> str:
    """A loopback URL nothing listens on (bound, then closed): a mirror that cannot be reached."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/unreachable"


def test_unreachable_first_mirror_then_the_second(tmp_path, zips, repo_params, server):
    data, blobs = zips
    for name in (DEV, TEST):
        _serve(server, name, data[name])
    out = tmp_path / "raw"
    params = with_overrides(
        repo_params, download={"mirrors": [_closed_port_url(), server["url"]], "out_dir": str(out), "files": blobs}
    )
    main(params)
    assert {git_blob_id(out / n) for n in (DEV, TEST)} == set(blobs.values())
    assert sorted(p.name for p in out.iterdir()) == sorted([DEV, TEST, "dev_candidates.txt", "test_candidates.txt"])
    assert sorted(r[0] for r in server["requests"]) == [f"cMedQA2/pinned/{DEV}", f"cMedQA2/pinned/{TEST}"]


def test_mirror_option_replaces_params_and_a_corrupted_copy_names_both_ids(tmp_path, zips, repo_params, server):
    data, blobs = zips
    bad = bytearray(data[DEV])
    bad[10] ^= 0xFF
    _serve(server, DEV, bytes(bad))
    (tmp_path / "bad.zip").write_bytes(bytes(bad))
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("already here\n", encoding="utf-8")
    params = with_overrides(
        repo_params, download={"mirrors": [_closed_port_url()], "out_dir": str(out), "files": {DEV: blobs[DEV]}}
    )
    with pytest.raises(DownloadError) as err:
        main(params, mirrors=(server["url"],))  # --mirror: only this one is asked
    msg = str(err.value)
    url = f"{server['url']}/{DEV}"
    assert f"{DEV} from {url}: checksum mismatch" in msg
    assert git_blob_id(tmp_path / "bad.zip") in msg and blobs[DEV] in msg
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # nothing written, nothing lost
    with pytest.raises(DownloadError, match=r"--mirror \(MIRROR=\): download.mirrors: 'ftp://x' must be an http"):
        main(params, mirrors=("ftp://x",))


def test_files_from_a_local_folder(tmp_path, zips, repo_params):
    data, blobs = zips
    upload = tmp_path / "upload"
    upload.mkdir()
    for name in (DEV, TEST):
        (upload / name).write_bytes(data[name])
    out = tmp_path / "raw"
    # no mirror could be reached: the folder alone is used
    params = with_overrides(
        repo_params, download={"mirrors": [_closed_port_url()], "out_dir": str(out), "files": blobs}
    )
    main(params, source=upload)
    assert {n: git_blob_id(out / n) for n in (DEV, TEST)} == blobs
    with zipfile.ZipFile(io.BytesIO(data[TEST])) as zf:
        assert (out / "test_candidates.txt").read_bytes() == zf.read("test_candidates.txt")

    # a damaged copy in the folder: refused, naming the file, where it came from and both ids;
    # the verified file already in place is kept
    good = (out / DEV).read_bytes()
    bad = bytearray(data[DEV])
    bad[-50] ^= 0xFF
    (upload / DEV).write_bytes(bytes(bad))
    (out / DEV).write_bytes(b"stale")  # a wrong file in place makes it fetch again
    with pytest.raises(DownloadError) as err:
        main(params, source=upload)
    msg = str(err.value)
    assert f"{DEV} from {upload / DEV}: checksum mismatch" in msg
    assert git_blob_id(upload / DEV) in msg and blobs[DEV] in msg
    assert (out / DEV).read_bytes() == b"stale" and good != b"stale"
    assert not list(out.glob(".*.part"))


def data_from(source: Path, project: Path) -> subprocess.CompletedProcess:
    """`mediagent data --from source` in project, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "mediagent", "data", "--from", str(source)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_files_from_a_local_zip_through_the_command(tmp_path, zips, repo_params):
    data, blobs = zips
    upload = tmp_path / "cmedqa2-upload.zip"  # as a browser download or an OSS object: the zips in a folder
    with zipfile.ZipFile(upload, "w") as zf:
        for name in (DEV, TEST):
            zf.writestr(f"cMedQA2-master/{name}", data[name])
    project = tmp_path / "project"
    project.mkdir()
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text(encoding="utf-8"))
    params["download"].update(mirrors=[_closed_port_url()], out_dir="data/raw", files=blobs)
    (project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    out = data_from(upload, project)
    assert out.returncode == 0, out.stderr
    raw = project / "data" / "raw"
    assert {n: git_blob_id(raw / n) for n in (DEV, TEST)} == blobs
    assert (raw / "dev_candidates.txt").is_file() and (raw / "test_candidates.txt").is_file()

    missing = tmp_path / "only-dev.zip"
    with zipfile.ZipFile(missing, "w") as zf:
        zf.writestr(DEV, data[DEV])
    (raw / TEST).unlink()
    out = data_from(missing, project)
    assert out.returncode == 1
    assert f"{missing}: holds no {TEST}" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
