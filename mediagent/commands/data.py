"""`make data`: fetch the official cMedQA2 files, verify them and unzip them into data/raw/.

Reads  params ``download``: ``mirrors`` (base URLs tried in turn; GitHub raw pinned to one
       commit first), ``files`` (archive name -> git blob id), ``out_dir``, ``timeout_s``;
       or, with ``--from PATH``, a folder or zip holding the files copied there by hand.
Writes ``<download.out_dir>/<name>.zip`` for each file, verified by git blob id (what
       ``git hash-object`` prints), and the tables inside them (question.csv, answer.csv,
       dev_candidates.txt, test_candidates.txt) next to them. Inside a DVC repository it
       then runs ``dvc add <out_dir>`` and prints the pointer file to commit.
Run    ``mediagent data [--mirror URL ...] [--from PATH]`` (or ``make data [MIRROR=url]
       [FROM=path]``). Rerunning skips files that are already there with the right id.
       Offline: copy the zips into out_dir by hand (or give their folder or zip with
       ``--from``) and rerun; they are verified and unzipped the same way.

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
from dataclasses import replace
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
    base = params.mirrors[0].rstrip("/")
    lines = [f"  {name}  git blob {blob}  ({base}/{name})" for name, blob in params.files.items()]
    return (
        f"Without network access here, copy these files by hand into {params.out_dir}/ "
        f"(from github.com/zhangsheng93/cMedQA2 at the commit in download.mirrors), or give a "
        f"folder or zip holding them with `make data FROM=PATH`:\n"
        + "\n".join(lines)
        + "\nthen run `make data` again: files already there are verified (`git hash-object FILE` "
        "must print the id above), unzipped and tracked, without any download. "
        "`make data MIRROR=url` tries another base URL instead (docs/data.md)."
    )


def _open(url: str, offset: int, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "medqa-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - URL comes from params


def _receive(resp, part: Path, offset: int, name: str) -> None:
    """Write one response's body to ``part``, appended after ``offset`` bytes when the server honoured
    the Range request; raises IncompleteRead when the body ends before Content-Length."""
    with resp:
        if offset and resp.status != 206:  # server ignored Range: start over
            offset = 0
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with (
            part.open("ab" if offset else "wb") as fh,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=name,
                leave=False,
                disable=None,
            ) as bar,
        ):
            while block := resp.read(CHUNK):
                fh.write(block)
                bar.update(len(block))
        if total is not None and part.stat().st_size < total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)


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
                    f"{url}: HTTP {e.code} {e.reason}; check download.mirrors and download.files in params.yaml"
                ) from e
            except NETWORK_ERRORS as e:
                # Not reachable at all (offline, DNS, refused): retrying would not help.
                raise DownloadError(f"could not reach {url} ({getattr(e, 'reason', e)}); offline or blocked?") from e
            try:
                _receive(resp, part, offset, dest.name)
                break
            except NETWORK_ERRORS as e:  # dropped mid-transfer: resume from what arrived
                last_error = e
                got_bytes = part.stat().st_size if part.exists() else 0
                log.warning("%s: %r after %d bytes (attempt %d/%d)", dest.name, e, got_bytes, attempt, attempts)
                if attempt < attempts:
                    time.sleep(attempt)
        else:
            raise DownloadError(f"download of {url} failed {attempts} times: {last_error!r}") from last_error
        verify_and_place(part, dest, blob, url)
    finally:
        part.unlink(missing_ok=True)


def verify_and_place(part: Path, dest: Path, blob: str, source: str) -> None:
    """Rename ``part`` to ``dest`` if its git blob id is ``blob``; else raise, dest untouched."""
    got = git_blob_id(part)
    if got != blob:
        raise DownloadError(
            f"{dest.name} from {source}: checksum mismatch, git blob id {got} but params.yaml pins {blob} "
            f"(download.files.{dest.name}); the copy was damaged or is another version of the file. "
            f"Nothing was written; run `make data` again, or use another source"
        )
    os.replace(part, dest)


def copy_local(source: Path, name: str, dest: Path, blob: str) -> None:
    """Copy ``name`` from a folder, or from a zip holding it (any folder inside), to ``dest``,
    verified by git blob id like a download: through a hidden part file, dest untouched on failure."""
    part = dest.parent / f".{dest.name}.part"
    try:
        if source.is_dir():
            src = source / name
            if not src.is_file():
                raise DownloadError(f"{src}: not found; copy {name} there, or give the folder that holds it")
            shutil.copyfile(src, part)
            where = str(src)
        elif zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as zf:
                members = [m for m in zf.infolist() if not m.is_dir() and Path(m.filename).name == name]
                if not members:
                    raise DownloadError(f"{source}: holds no {name}; add it to the zip, or give its folder")
                with zf.open(members[0]) as src, part.open("wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            where = f"{source}:{members[0].filename}"
        else:
            raise DownloadError(
                f"{source}: neither a folder nor a zip; --from (FROM=) takes the folder "
                f"or zip holding the files of download.files"
            )
        verify_and_place(part, dest, blob, where)
    finally:
        part.unlink(missing_ok=True)


def ensure_file(name: str, blob: str, params: DownloadParams, source: Path | None = None) -> bool:
    """Make ``out_dir/name`` present and verified, from ``source`` (a folder or zip) when given,
    else from each of ``params.mirrors`` in turn; return True if it was fetched or copied."""
    dest = Path(params.out_dir) / name
    if dest.is_file():
        got = git_blob_id(dest)
        if got == blob:
            log.info("%s: present, git blob id verified", dest)
            return False
        # Kept in place until a verified copy replaces it: fetch() never touches dest on failure.
        log.warning("%s: git blob id %s, expected %s; fetching it again", dest, got, blob)
    if source is not None:
        copy_local(source, name, dest, blob)
        log.info("%s: copied from %s, git blob id verified", dest, source)
        return True
    failures = []
    for base in params.mirrors:
        url = f"{base.rstrip('/')}/{name}"
        log.info("downloading %s", url)
        try:
            fetch(url, dest, blob, params.timeout_s)
        except DownloadError as e:  # the next mirror may have it; every failure is reported if none does
            log.warning("%s", e)
            failures.append(str(e))
            continue
        log.info("%s: downloaded, git blob id verified", dest)
        return True
    raise DownloadError("\n".join(failures))


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
        raise DownloadError(
            f"`dvc add {rel}` failed (exit {e.returncode}); the files are in place, rerun it by hand"
        ) from e
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


def main(params: Params, mirrors: tuple[str, ...] = (), source: Path | None = None) -> None:
    """Fetch (or copy from ``source``), verify, unzip and track every file of ``download.files``;
    ``mirrors`` replace ``download.mirrors`` when given."""
    cfg = params.download
    if mirrors:
        cfg = replace(cfg, mirrors=list(mirrors))
        problems = cfg.problems()
        if problems:
            raise DownloadError(f"--mirror (MIRROR=): {'; '.join(problems)}")
    log.info("download params: %s", cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, blob in cfg.files.items():
        try:
            ensure_file(name, blob, cfg, source)
        except DownloadError as e:
            raise DownloadError(f"{e}\n\n{offline_help(cfg)}") from e
    for name in cfg.files:
        if name.lower().endswith(".zip"):
            unzip(out_dir / name, out_dir)
    track_with_dvc(out_dir)


@click.command()
@click.option(
    "--mirror",
    "mirrors",
    multiple=True,
    metavar="URL",
    help="Base URL to fetch from instead of download.mirrors; repeatable, tried in turn (make data MIRROR=).",
)
@click.option(
    "--from",
    "source",
    type=click.Path(exists=True, path_type=Path),
    help="Folder or zip holding the files copied by hand (make data FROM=); no download.",
)
def command(mirrors, source) -> None:
    """Download the official cMedQA2 files (download.files), verify and unzip them, track with DVC."""
    setup_logging()
    main(load_params(), mirrors, source)
