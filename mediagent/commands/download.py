"""`make data`: fetch the official cMedQA2 files, verify them and unzip them into data/raw/.

Reads  params ``download``: ``base_url`` (GitHub raw, pinned to one commit), ``files``
       (archive name -> git blob id), ``out_dir``, ``timeout_s``.
Writes ``<download.out_dir>/<name>.zip`` for each file, verified by git blob id (what
       ``git hash-object`` prints), and the tables inside them (question.csv, answer.csv,
       dev_candidates.txt, test_candidates.txt) next to them. Inside a DVC repository it
       then runs ``dvc add <out_dir>`` and prints the pointer file to commit.
Run    ``mediagent data`` (or ``make data``). Rerunning skips files that are
       already there with the right id. Offline: copy the zips into out_dir by hand and
       rerun; they are verified and unzipped the same way.

Every file is written to a temporary name, checked, then renamed, so a network failure or
a checksum mismatch never leaves a half-written or unverified file under a real name,
and a good file already in place is never replaced by a bad one.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import click
from tqdm import tqdm

from mediagent.errors import UserError, setup_logging
from mediagent.fileio import git_blob_id
from mediagent.params import DownloadParams, Params, load_params

log = logging.getLogger(__name__)

CHUNK = 1 << 16
ATTEMPTS = 3  # a dropped connection resumes where it stopped (HTTP Range) this many times
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError)


class DownloadError(UserError):
    """A file could not be fetched or verified; the message says what to do."""


def offline_help(params: DownloadParams) -> str:
    """What to do by hand when the files cannot be downloaded here."""
    base = params.base_url.rstrip("/")
    lines = [f"  {name}  git blob {blob}  ({base}/{name})" for name, blob in params.files.items()]
    return (
        f"Without network access here, copy these files by hand into {params.out_dir}/ "
        f"(from github.com/zhangsheng93/cMedQA2 at the commit in download.base_url):\n" + "\n".join(lines) +
        "\nthen run `make data` again: files already there are verified (`git hash-object FILE` "
        "must print the id above), unzipped and tracked, without any download."
    )


def _open(url: str, offset: int, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "medqa-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - URL comes from params


def fetch(url: str, dest: Path, blob: str, timeout: float, attempts: int = ATTEMPTS) -> None:
    """Download url to dest, verified by git blob id; nothing is left at dest unless it is right.

    The bytes go to a hidden ``.<name>.part`` beside dest. A dropped connection resumes from
    the bytes already received (HTTP Range) up to ``attempts`` times; any final failure
    removes the partial file.

    Raises:
        DownloadError: network failure (after the retries), HTTP error or blob id mismatch.
    """
    part = dest.parent / f".{dest.name}.part"
    part.unlink(missing_ok=True)
    last_error: Exception | None = None
    try:
        for attempt in range(1, attempts + 1):
            offset = part.stat().st_size if part.exists() else 0
            try:
                resp = _open(url, offset, timeout)
            except urllib.error.HTTPError as e:
                if e.code == 416 and offset:  # the partial file is already complete or longer: restart
                    part.unlink(missing_ok=True)
                    last_error = e
                    continue
                raise DownloadError(
                    f"{url}: HTTP {e.code} {e.reason}; check download.base_url and download.files in params.yaml"
                ) from e
            except NETWORK_ERRORS as e:
                # Not reachable at all (offline, DNS, refused): retrying would not help.
                raise DownloadError(f"could not reach {url} ({getattr(e, 'reason', e)}); offline or blocked?") from e
            try:
                with resp:
                    if offset and resp.status != 206:  # server ignored Range: start over
                        offset = 0
                    length = resp.headers.get("Content-Length")
                    total = offset + int(length) if length is not None else None
                    with part.open("ab" if offset else "wb") as fh, tqdm(
                        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=dest.name, leave=False, disable=None,
                    ) as bar:
                        while block := resp.read(CHUNK):
                            fh.write(block)
                            bar.update(len(block))
                    if total is not None and part.stat().st_size < total:
                        raise http.client.IncompleteRead(b"", total - part.stat().st_size)
                break
            except NETWORK_ERRORS as e:  # dropped mid-transfer: resume from what arrived
                last_error = e
                got_bytes = part.stat().st_size if part.exists() else 0
                log.warning("%s: %r after %d bytes (attempt %d/%d)", dest.name, e, got_bytes, attempt, attempts)
                if attempt < attempts:
                    time.sleep(attempt)
        else:
            raise DownloadError(f"download of {url} failed {attempts} times: {last_error!r}") from last_error
        got = git_blob_id(part)
        if got != blob:
            raise DownloadError(
                f"{dest.name}: checksum mismatch, git blob id {got} but params.yaml pins {blob} "
                f"(download.files.{dest.name}); the download was damaged or the file changed upstream. "
                f"Nothing was written; run `make data` again, or check download.base_url"
            )
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def ensure_file(name: str, blob: str, params: DownloadParams) -> bool:
    """Make ``out_dir/name`` present and verified; return True if it was downloaded."""
    dest = Path(params.out_dir) / name
    if dest.is_file():
        got = git_blob_id(dest)
        if got == blob:
            log.info("%s: present, git blob id verified", dest)
            return False
        # Kept in place until a verified copy replaces it: fetch() never touches dest on failure.
        log.warning("%s: git blob id %s, expected %s; downloading it again", dest, got, blob)
    url = f"{params.base_url.rstrip('/')}/{name}"
    log.info("downloading %s", url)
    fetch(url, dest, blob, params.timeout_s)
    log.info("%s: downloaded, git blob id verified", dest)
    return True


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def unzip(archive: Path, out_dir: Path) -> list[Path]:
    """Extract every file of archive flat into out_dir (atomically); return their paths.

    Member paths are reduced to their file name, so an archive cannot write outside
    out_dir. Members already there with the same size and CRC are left alone.
    """
    written = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = Path(info.filename).name
            if info.is_dir() or not name or info.filename.startswith("__MACOSX"):
                continue
            target = out_dir / name
            if target.is_file() and target.stat().st_size == info.file_size and _crc32(target) == info.CRC:
                written.append(target)
                continue
            tmp = out_dir / f".{name}.part"
            try:
                with zf.open(info) as src, tmp.open("wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)  # zipfile checks the CRC at the end
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            log.info("%s: extracted %s (%d bytes)", archive.name, target, info.file_size)
            written.append(target)
    return written


def dvc_root(path: Path) -> Path | None:
    """The DVC repository (folder with .dvc/) that contains path, if any."""
    for parent in [path.resolve(), *path.resolve().parents]:
        if (parent / ".dvc").is_dir():
            return parent
    return None


def track_with_dvc(out_dir: Path) -> None:
    root = dvc_root(out_dir)
    if root is None:
        log.info("%s is not inside a DVC repository; not running `dvc add`", out_dir)
        return
    rel = out_dir.resolve().relative_to(root).as_posix()
    try:
        subprocess.run([sys.executable, "-m", "dvc", "add", rel], cwd=root, check=True)
    except subprocess.CalledProcessError as e:
        raise DownloadError(f"`dvc add {rel}` failed (exit {e.returncode}); the files are in place, rerun it by hand") from e
    # dvc writes a .gitignore beside the pointer unless the root one already ignores the folder.
    to_commit = [f"{rel}.dvc"]
    gitignore = (root / rel).parent / ".gitignore"
    if gitignore.is_file():
        to_commit.append(gitignore.relative_to(root).as_posix())
    print(
        f"\n{rel} is tracked by DVC. Commit the pointer (the data itself stays out of git):\n"
        f"  git add {' '.join(to_commit)} && git commit -m 'Track cMedQA2 raw data'\n"
        f"Then use it: dvc exp run -S data.raw_dir={rel}"
    )


def main(params: Params) -> None:
    cfg = params.download
    log.info("download params: %s", cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, blob in cfg.files.items():
        try:
            ensure_file(name, blob, cfg)
        except DownloadError as e:
            raise DownloadError(f"{e}\n\n{offline_help(cfg)}") from e
    for name in cfg.files:
        if name.lower().endswith(".zip"):
            unzip(out_dir / name, out_dir)
    track_with_dvc(out_dir)



@click.command()
def command() -> None:
    """Download the official cMedQA2 files (download.files), verify and unzip them, track with DVC."""
    setup_logging()
    main(load_params())
