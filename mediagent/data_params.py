"""The ``data`` section of params.yaml: where the data lies and, optionally, the sources to read.

Kept apart from :mod:`mediagent.params` (which builds it like every other section) because
``data.sources`` is a list of sections of its own, one per source (docs/data.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

# data.sources formats (mediagent/sources.py reads them) and the keys each may map in `columns`.
SOURCE_COLUMNS = {
    "cmedqa2": (),
    "alpaca": ("question", "input", "answer", "system", "history", "id"),
    "table": ("question", "answer", "system", "id"),
    "sharegpt": ("messages", "role", "content", "user", "assistant", "system_role", "system", "id"),
    "messages": ("messages", "role", "content", "user", "assistant", "system_role", "system", "id"),
}
SourceFormat = Literal["cmedqa2", "alpaca", "table", "sharegpt", "messages"]  # checked at load, like every choice key
if set(get_args(SourceFormat)) != set(SOURCE_COLUMNS):
    raise AssertionError("SourceFormat and SOURCE_COLUMNS must name the same formats")


@dataclass(frozen=True)
class SourceParams:
    """One entry of data.sources: files of one format (docs/data.md)."""

    path: str  # a file, a folder (every file of the format's suffixes in it) or a glob
    format: SourceFormat
    columns: dict[str, str] = dataclasses.field(default_factory=dict)  # format key -> the file's field name
    limit: int = 0  # first N questions (cmedqa2) or records; 0 = process.limit
    system_prompt: str = ""  # for this source's examples without their own system turn ("" = process.system_prompt)
    sheet: str = ""  # .xlsx: the sheet to read (needed when a workbook has several)
    name: str = ""  # its key in metrics/process.json (default: the path)

    def check(self, where: str) -> list[str]:
        """Problems of this entry (its section, data, names it by index)."""
        out = [
            f"{where}.columns.{key}: unknown for format {self.format} (known: {', '.join(SOURCE_COLUMNS[self.format]) or 'none'})"
            for key in self.columns
            if key not in SOURCE_COLUMNS[self.format]
        ]
        out += [
            f"{where}.columns.{key}: {value!r} must be a non-empty field name"
            for key, value in self.columns.items()
            if not isinstance(value, str) or not value
        ]
        if not self.path:
            out.append(f"{where}.path: name a file, folder or glob")
        if self.limit < 0:
            out.append(f"{where}.limit: must be >= 0 (0 = process.limit)")
        return out


@dataclass(frozen=True)
class DataParams:
    raw_dir: str
    processed_dir: str
    # Optional, absent from params.yaml by default (so existing setups keep their DVC params
    # hash): the sources to read. Empty = one cmedqa2 source at raw_dir.
    sources: tuple[SourceParams, ...] = ()

    def problems(self) -> list[str]:
        out = [p for i, s in enumerate(self.sources) for p in s.check(f"data.sources[{i}]")]
        if sum(s.format == "cmedqa2" for s in self.sources) > 1:
            out.append("data.sources: at most one cmedqa2 source (its folder holds question.csv and answer.csv)")
        names = [s.name or s.path for s in self.sources]
        if len(set(names)) < len(names):
            out.append("data.sources: two sources share a path; give each a distinct name")
        return out
