"""Loopback stand-ins for the remotes of the real job (the model hub, either source, and
the data host), all on 127.0.0.1.

``LoopbackHub`` answers the Hugging Face hub API for one model repository at one commit,
as the pinned ``huggingface_hub`` client calls it (read from its ``file_download.py``,
``_snapshot_download.py`` and ``hf_api.py``):

- ``GET /api/models/{repo}/revision/{rev}``: repo info (``sha``, ``siblings``);
- ``GET /api/models/{repo}/tree/{rev}?recursive=...``: the file listing (``oid`` = git
  blob id, ``lfs.oid`` = sha256 for weight files), used when the revision is a commit sha;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag`` (git blob id)
  or ``X-Linked-Etag`` + ``X-Linked-Size`` (sha256 and size of LFS files),
  ``Content-Length``, and ``Range`` on GET.

An unknown revision gets the hub's 404 with ``X-Error-Code: RevisionNotFound``.

``LoopbackModelScope`` answers ModelScope's ``/api/v1`` routes for the same kind of
repository, as the pinned ``modelscope`` client (1.40, which delegates to ``modelscope-hub``)
calls them when it downloads a model at a revision (read from ``modelscope_hub/_download.py``
and ``_legacy_api.py``):

- ``GET /api/v1/models/{repo}/repo/files?Revision=..&Recursive=True[&Root=..]``: the file
  listing in ModelScope's envelope (``Code``, ``Message``, ``Success``, ``Data.Files`` with
  ``Path``, ``Size``, ``Sha256``, ``Type``, ``IsLFS``). An unknown revision answers
  200 with ``Files: null``, as the live hub does: the client then downloads nothing
  without complaint, so the caller has to notice;
- ``GET /api/v1/models/{repo}/repo?Revision=..&FilePath=..``: the file (``Range`` honoured);
- ``GET /api/v1/models/{repo}/revisions``: ``Data.RevisionMap.Branches``/``Tags``, to tell
  an unknown revision from an empty repository;
- ``GET /api/v1/models/{repo}``: repository info (the client asks it when a listing
  root is missing);
- ``GET /api/v1/repos/internalAccelerationInfo``: the client's probe for an Alibaba Cloud
  intranet route; answered with none, as outside Alibaba Cloud.

Faults, for both stand-ins, can be switched on per file: ``drop`` (promise the whole body,
send half, hang up; resumed requests get nothing, so the client's retries run out) and
``corrupt`` (same size, one byte flipped: only a content check can catch it). Every request
is counted, so a caller can prove a second run fetched nothing.

``FileHost`` serves a folder of files by name (with Range), like the GitHub raw host that
`make data` downloads from.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from pathlib import Path

from mediagent.fileio import git_blob_id

LFS_SUFFIXES = (".safetensors",)  # stored in git LFS on the hub: sha256 etag, X-Linked-*


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1:<free port> in a daemon thread; a context manager."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]):
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.lock = threading.Lock()
        handler = type("Handler", (handler,), {"host": self})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def count(self, method: str | None = None) -> int:
        with self.lock:
            return sum(1 for m, _ in self.requests if method in (None, m))

    def record(self, method: str, path: str) -> None:
        with self.lock:
            self.requests.append((method, path))


class _Handler(http.server.BaseHTTPRequestHandler):
    host: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send_body(self, data: bytes, headers: dict[str, str], drop: bool = False, head: bool = False) -> None:
        start = 0
        rng = None if head else self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng.removeprefix("bytes=").split("-")[0] or 0)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if head:
            return
        body = data[start:]
        if drop:  # half the body on a first attempt, nothing on a resumed one: it never completes
            self.wfile.write(b"" if start else body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # hang up mid-body
            return
        self.wfile.write(body)

    def _error(self, code: int, error_code: str | None, message: str, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(code)
        if error_code:
            self.send_header("X-Error-Code", error_code)
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


class _ModelRepo(_Server):
    """One model repository at one commit, serving the files of ``folder``, with faults."""

    def __init__(self, handler: type[_Handler], repo_id: str, commit: str, folder: str | Path):
        super().__init__(handler)
        self.repo_id, self.commit = repo_id, commit
        self.files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        self.sha256 = {n: hashlib.sha256(d).hexdigest() for n, d in self.files.items()}
        self.drop: set[str] = set()  # files whose GET is cut in half (every time)
        self.corrupt: set[str] = set()  # files served with one byte flipped
        self.downloads: list[str] = []  # names of files whose body was sent

    def body(self, name: str) -> bytes:
        data = self.files[name]
        if name in self.corrupt:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        return data

    def sent(self, name: str) -> None:
        with self.lock:
            self.downloads.append(name)


class LoopbackHub(_ModelRepo):
    """The Hugging Face hub API for ``repo_id`` at ``commit``, serving the files of ``folder``."""

    def __init__(self, repo_id: str, commit: str, folder: str | Path):
        super().__init__(_HubHandler, repo_id, commit, folder)
        self.blob = {n: git_blob_id(d) for n, d in self.files.items()}

    def tree(self) -> list[dict]:
        out = []
        for name, data in self.files.items():
            entry = {"type": "file", "oid": self.blob[name], "size": len(data), "path": name}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": self.sha256[name], "size": len(data), "pointerSize": 134}
            out.append(entry)
        return out


class _ModelRepoHandler(_Handler):
    """HEAD and GET of a model repository's API, each request counted first."""

    host: _ModelRepo

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.host.record(self.command, self.path)
        self._handle(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self.host.record(self.command, self.path)
        self._handle(head=False)

    def _handle(self, head: bool) -> None:
        raise NotImplementedError


class _HubHandler(_ModelRepoHandler):
    host: LoopbackHub

    def _handle(self, head: bool) -> None:
        hub = self.host
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        api = f"/api/models/{hub.repo_id}/"
        resolve = f"/{hub.repo_id}/resolve/"
        if path.startswith(api):
            kind, _, rev = path[len(api) :].partition("/")
            rev = rev.rstrip("/")
            if rev not in (hub.commit, "main"):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            if kind == "revision":
                info = {
                    "id": hub.repo_id,
                    "modelId": hub.repo_id,
                    "sha": hub.commit,
                    "private": False,
                    "siblings": [{"rfilename": n} for n in hub.files],
                }
                return self._send_body(json.dumps(info).encode(), {"Content-Type": "application/json"}, head=head)
            if kind == "tree":
                return self._send_body(json.dumps(hub.tree()).encode(), {"Content-Type": "application/json"}, head=head)
            return self._error(404, None, f"no such endpoint {path}", head)
        if path.startswith(resolve):
            rev, _, name = path[len(resolve) :].partition("/")
            if rev not in (hub.commit, "main"):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            if name not in hub.files:
                return self._error(404, "EntryNotFound", f"{name} does not exist at {rev}", head)
            data = hub.body(name)
            headers = {"X-Repo-Commit": hub.commit, "Accept-Ranges": "bytes"}
            if name.endswith(LFS_SUFFIXES):
                headers |= {
                    "X-Linked-Etag": f'"{hub.sha256[name]}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{hub.sha256[name]}"',
                }
            else:
                headers["ETag"] = f'"{hub.blob[name]}"'
            if not head:
                hub.sent(name)
            return self._send_body(data, headers, drop=(not head and name in hub.drop), head=head)
        return self._error(404, "RepoNotFound", f"Repository not found: {path}", head)


class LoopbackModelScope(_ModelRepo):
    """ModelScope's API for ``repo_id``: branch ``master`` and ``commit``, serving ``folder``.

    Both name the same files; any other revision is unknown.
    """

    BRANCH = "master"  # ModelScope's default branch (not "main")

    def __init__(self, repo_id: str, commit: str, folder: str | Path):
        super().__init__(_ModelScopeHandler, repo_id, commit, folder)

    def listing(self, root: str = "") -> list[dict]:
        root = root.strip("/")
        return [
            {
                "Name": name.rsplit("/", 1)[-1],
                "Path": name,
                "Type": "blob",
                "Size": len(data),
                "Sha256": self.sha256[name],
                "IsLFS": name.endswith(LFS_SUFFIXES),
                "Revision": self.commit,
            }
            for name, data in self.files.items()
            if not root or name.startswith(root + "/")
        ]


def _envelope(data) -> bytes:
    """ModelScope's JSON envelope around a successful answer."""
    return json.dumps(
        {"Code": 200, "Message": "success", "Success": True, "RequestId": "loopback", "Data": data}
    ).encode()


class _ModelScopeHandler(_ModelRepoHandler):
    host: LoopbackModelScope

    def _fail(self, code: int, message: str, head: bool) -> None:
        body = json.dumps({"Code": code, "Message": message, "Success": False, "RequestId": "loopback"}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _handle(self, head: bool) -> None:
        ms = self.host
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        json_type = {"Content-Type": "application/json"}
        if path == "/api/v1/repos/internalAccelerationInfo":
            return self._send_body(_envelope({"InternalRegionQueryAddress": ""}), json_type, head=head)
        base = f"/api/v1/models/{ms.repo_id}"
        if path == base:
            owner, name = ms.repo_id.split("/")
            return self._send_body(
                _envelope({"Path": owner, "Name": name, "Revision": ms.BRANCH}), json_type, head=head
            )
        if path == f"{base}/revisions":
            created = 1735689600  # a fixed time: the answer is the same bytes every run
            revisions = {"Branches": [{"Revision": ms.BRANCH, "CreatedAt": created}], "Tags": []}
            return self._send_body(_envelope({"RevisionMap": revisions}), json_type, head=head)
        revision = query.get("Revision") or ms.BRANCH
        known = revision in (ms.commit, ms.BRANCH)
        if path == f"{base}/repo/files":
            files = ms.listing(query.get("Root", "")) if known else None
            return self._send_body(_envelope({"Files": files}), json_type, head=head)
        if path == f"{base}/repo":
            name = query.get("FilePath", "")
            if not known:
                return self._fail(404, f"revision {revision} not found", head)
            if name not in ms.files:
                return self._fail(404, f"file {name} not found at {revision}", head)
            if not head:
                ms.sent(name)
            headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
            return self._send_body(ms.body(name), headers, drop=(not head and name in ms.drop), head=head)
        return self._fail(404, f"no such route: {path}", head)


class FileHost(_Server):
    """Serves ``files`` (name -> bytes) under ``/<prefix>/<name>``, with Range."""

    def __init__(self, files: dict[str, bytes], prefix: str = "cMedQA2/pinned"):
        super().__init__(_FileHandler)
        self.files, self.prefix = files, prefix.strip("/")
        self.base_url = f"{self.url}/{self.prefix}"


class _FileHandler(_Handler):
    host: FileHost

    def do_GET(self) -> None:  # noqa: N802
        self.host.record("GET", self.path)
        name = self.path.removeprefix(f"/{self.host.prefix}/")
        if name not in self.host.files:
            return self._error(404, None, f"{self.path} not found")
        self._send_body(self.host.files[name], {"Content-Type": "application/octet-stream"})
