"""Rows of a jsonl or parquet file, each with where it came from ("file:line"): the one reader of record files for
chat data (SFT), evaluation tasks and the like. A line that is not JSON comes out as a `RecordError` in place of its
row, so a caller decides whether a bad row is skipped and counted or fatal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


class RecordError(ValueError):
    """A file that is not a record file, or a row that is not JSON; the message names it."""


def iter_records(path: str | Path, what: str = "records") -> Iterator[tuple[str, object]]:
    path = Path(path)
    if not path.is_file() or path.suffix not in (".jsonl", ".parquet"):
        raise RecordError(f"{what} must be a .jsonl or .parquet file, got {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        for k, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}:{k}", row
        return
    with path.open(encoding="utf-8") as f:
        for k, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield f"{path}:{k}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{k}", RecordError(f"not JSON ({e.msg})")
