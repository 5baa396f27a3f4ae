"""The official cMedQA2 layout rebuilt from the real sample, through `make data` and `process`.

The real download code fetches the four archives from a loopback host (blob ids given by
params), unzips them, and `process` turns them into lists of the official 100 candidates
per test question: what `make rehearse` relies on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mediagent.commands import data as data_command
from mediagent.fileio import git_blob_id, read_jsonl
from mediagent.params import with_overrides
from mediagent.pipeline import process
from rehearsal.data import official_layout
from rehearsal.hosts import FileHost
from tests.conftest import ROOT


def test_official_layout_downloads_and_gives_lists_of_100(tmp_path, shared_sample, shared_candidates, repo_params):
    files, summary = official_layout(shared_sample, shared_candidates)
    assert summary["questions"] == 500 and summary["dev_test_questions"] == 32
    blobs = {name: git_blob_id(data) for name, data in files.items()}
    # The real candidate archives are served byte for byte: their pinned ids still hold.
    for name in ("dev_candidates.zip", "test_candidates.zip"):
        assert blobs[name] == repo_params.download.files[name]
    raw = tmp_path / "raw"
    with FileHost(files) as host:
        params = with_overrides(
            repo_params,
            download={"mirrors": [host.base_url], "out_dir": str(raw), "files": blobs},
            data={"raw_dir": str(raw), "processed_dir": str(tmp_path / "processed")},
            process={"metrics_file": str(tmp_path / "process.json")},
        )
        data_command.main(params)
        assert host.count() == 4
    assert {"question.csv", "answer.csv", "dev_candidates.txt", "test_candidates.txt"} <= {
        p.name for p in raw.iterdir()
    }

    process.main(params)
    metrics = json.loads((tmp_path / "process.json").read_text())
    assert metrics["split_method"] == "official"
    assert metrics["dropped"]["candidates_answer_missing"] == 0
    lists = read_jsonl(tmp_path / "processed" / "test_candidates.jsonl")
    assert lists and {len(r["candidates"]) for r in lists} == {100}
    assert all(any(c["label"] == 1 for c in r["candidates"]) for r in lists)
    # Filler negatives hang on a question nobody asked: they never become training pairs.
    train_answers = {r["ans_id"] for r in read_jsonl(tmp_path / "processed" / "train.jsonl")}
    negatives = {c["ans_id"] for r in lists for c in r["candidates"] if c["label"] == 0}
    assert not train_answers & negatives


def test_missing_data_folder_is_one_error_line_before_any_work(tmp_path):
    """`make rehearse` without the real files: one `error:` line naming them, nothing cloned or written."""
    data = tmp_path / "cmedqa2"
    (data / "sample").mkdir(parents=True)
    for name in ("question.csv", "answer.csv"):
        (data / "sample" / name).write_text("question_id,content\n", encoding="utf-8")
    report = tmp_path / "report.json"
    report.write_text('{"previous": true}\n', encoding="utf-8")
    env = {**os.environ, "MEDQA_SHARED_DATA": str(data), "TMPDIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "rehearsal.run", "--report", str(report)],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cMedQA2 files missing in {data}: dev_candidates.zip, test_candidates.zip — "), last
    assert "https://github.com/zhangsheng93/cMedQA2" in last and "`make demo` needs none of this" in last
    assert "Traceback" not in out.stderr
    # checked before the temporary clone is made, and the previous report is kept
    assert report.read_text(encoding="utf-8") == '{"previous": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmedqa2", "report.json"]
