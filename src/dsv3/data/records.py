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
    if path.suffix in (".jsonl", ".parquet") and not path.exists():
        raise RecordError(f"{what}: {path} does not exist")
    if not path.is_file() or path.suffix not in (".jsonl", ".parquet"):
        raise RecordError(f"{what} must be a .jsonl or .parquet file, got {path}")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise RecordError(f"{path} is not a readable parquet file ({str(e).splitlines()[0][:200]})") from None
        for k, row in enumerate(rows, start=1):
            yield f"{path}:{k}", row
        return
    with path.open("rb") as f:             # bytes: a line that is not UTF-8 is that row's error, not the file's
        for k, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{k}", RecordError(f"not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})")
                continue
            if line.strip():
                try:
                    yield f"{path}:{k}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{k}", RecordError(f"not JSON ({e.msg})")
