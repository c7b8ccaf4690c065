"""Where documents come from: the CPython standard library, text and code files, JSONL, JSON and Parquet.

A document is the unit of packing, of FIM (code documents only, TR 4.1) and of the train/validation split.
Everything is yielded in a deterministic order, so the same sources always give the same token stream.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_EXTS = frozenset({".txt", ".md", ".rst"})
CODE_EXTS = frozenset({
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cu", ".cuh", ".rs", ".go", ".java", ".kt",
    ".scala", ".js", ".jsx", ".ts", ".tsx", ".mjs", ".rb", ".php", ".cs", ".swift", ".m", ".mm", ".sh", ".bash",
    ".lua", ".pl", ".r", ".jl", ".hs", ".ml", ".sql", ".zig", ".dart", ".ex", ".exs", ".erl", ".clj", ".el",
    ".vim", ".f90", ".s", ".asm", ".cmake", ".toml", ".yaml", ".yml", ".ini", ".cfg", ".html", ".css", ".xml",
    ".tex",
})
RECORD_EXTS = frozenset({".jsonl", ".json", ".parquet"})
SUPPORTED_EXTS = TEXT_EXTS | CODE_EXTS | RECORD_EXTS
_TEXT_KEYS = ("text", "content")
_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


@dataclass
class Document:
    text: str
    source: str      # a file path (":N" appended for the N-th record of a JSONL/JSON/Parquet file) or "stdlib:rel/path"
    is_code: bool


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files(include_tests: bool = True) -> list[Path]:
    """The standard library's .py files (never site-packages, never a virtualenv), sorted."""
    root = stdlib_root()
    venv = Path(sys.prefix).resolve() if sys.prefix != sys.base_prefix else None
    skip = _SKIP_DIRS if include_tests else _SKIP_DIRS | _TEST_DIRS
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if venv is not None and (here == venv or venv in here.parents):
            dirnames.clear()
            continue
        dirnames[:] = [d for d in dirnames if d not in skip]
        out += [here / f for f in filenames if f.endswith(".py")]
    return sorted(out)


def source_files(source: str) -> list[Path]:
    """The files one non-stdlib source names: a file, a directory (recursed) or a glob; sorted."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_EXTS:
            raise ValueError(f"data source {source!r} has unsupported extension {path.suffix!r}; supported: "
                             f"{' '.join(sorted(SUPPORTED_EXTS))}")
        return [path]
    if path.is_dir():
        found = _walk(path)
        if not found:
            raise FileNotFoundError(f"data source {source!r} is a directory without supported files (extensions: "
                                    f"{' '.join(sorted(SUPPORTED_EXTS))})")
        return found
    if any(c in source for c in "*?["):
        found: list[Path] = []
        for m in sorted(glob.glob(os.path.expanduser(source), recursive=True)):
            p = Path(m)
            found += _walk(p) if p.is_dir() else [p] if p.suffix.lower() in SUPPORTED_EXTS else []
        if found:
            # "dir/**" matches a directory and the files under it too: each file once, where it first came
            return list(dict.fromkeys(found))
        raise FileNotFoundError(f"data source {source!r}: the glob matches no supported files")
    raise FileNotFoundError(f"data source {source!r} does not exist (expected 'stdlib', a file, a directory "
                            f"or a glob)")


def reads_under(source: str, directory: str | Path) -> bool:
    """Whether `source` (source_files' rules) reads files under `directory`, now or once files appear there: a
    directory the source is or a glob matches (one not there yet included) that the walk descends into `directory`
    from (no dot or _SKIP_DIRS name on the way), or a supported file the glob matches inside it now."""
    if source == "stdlib":
        return False
    inner = Path(directory).expanduser().resolve()
    path = Path(source).expanduser()
    if path.exists() or not any(c in source for c in "*?["):
        return path.is_dir() and _walks_into(path.resolve(), inner)
    pattern = Path(os.path.abspath(os.path.expanduser(source))).parts
    if any(_walks_into(Path(*inner.parts[:n]), inner) for n in _glob_depths(pattern, inner.parts)):
        return True
    return any(inner in f.resolve().parents and f.suffix.lower() in SUPPORTED_EXTS
               for f in map(Path, glob.glob(os.path.expanduser(source), recursive=True)))


def _walks_into(root: Path, inner: Path) -> bool:
    """Whether walking the directory `root` (_walk) reaches `inner`."""
    return (root == inner or root in inner.parents) and \
        not any(p.startswith(".") or p in _SKIP_DIRS for p in inner.relative_to(root).parts)


def _glob_depths(pattern: tuple[str, ...], parts: tuple[str, ...], i: int = 0) -> set[int]:
    """The n for which glob's `pattern` components match parts[:n] (a directory the glob would name): "**" any
    number of names, and no wildcard a leading dot (glob's rules)."""
    if not pattern:
        return {i}
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        out = _glob_depths(rest, parts, i)
        for j in range(i, len(parts)):
            if parts[j].startswith("."):
                break
            out |= _glob_depths(rest, parts, j + 1)
        return out
    if i < len(parts) and fnmatch.fnmatchcase(parts[i], head) and \
            (not parts[i].startswith(".") or head.startswith(".")):
        return _glob_depths(rest, parts, i + 1)
    return set()


def sources_fingerprint(sources: list[str]) -> str:
    """A hash of what `sources` hold now: every file's path, size and modification time. Caches of tokenised data
    key on it, so a file added, removed or edited in a corpus directory is a new corpus, not a stale cache hit."""
    if isinstance(sources, (str, Path)):
        raise TypeError(f"sources must be a list of strings, got the single string {sources!r}")
    h = hashlib.sha256()
    for s in sources:
        h.update(b"source\n")
        for f in stdlib_files() if s == "stdlib" else source_files(str(s)):
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def iter_documents(sources: list[str]) -> Iterator[Document]:
    """Documents of every source in order; empty and whitespace-only ones are skipped.

    Each source is "stdlib", a file, a directory or a glob. All sources are resolved before the first document
    is yielded, so a typo fails at once rather than after an hour of tokenising.
    """
    if isinstance(sources, (str, Path)):
        raise TypeError(f"sources must be a list of strings, got the single string {sources!r}")
    resolved = [None if s == "stdlib" else source_files(str(s)) for s in sources]
    for files in resolved:
        if files is None:
            root = stdlib_root()
            docs = (Document(_read(f, text_only=False), f"stdlib:{f.relative_to(root).as_posix()}", True)
                    for f in stdlib_files())
        else:
            docs = (d for f in files for d in _file_documents(f))
        yield from (d for d in docs if d.text.strip())


def _walk_error(e: OSError) -> None:
    # os.walk's default skips a directory it cannot list without a word: its files would silently be missing
    raise type(e)(e.errno, f"cannot list {e.filename} ({e.strerror}): its files would be left out of the corpus")


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_walk_error):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        out += [Path(dirpath) / f for f in filenames if Path(f).suffix.lower() in SUPPORTED_EXTS]
    return sorted(out)


def _read(path: Path, text_only: bool = True) -> str:
    # Undecodable bytes become U+FFFD: one odd file must not kill a multi-hour build. A NUL byte, which UTF-8 text
    # does not hold, marks a binary file (an image or archive saved as .txt) or UTF-16: training on its bytes is
    # never meant, so it is named (the standard library's own test fixtures are taken as they are). The whole file
    # is searched (memchr: cheap beside decoding it): a text header followed by binary data is still binary
    data = path.read_bytes()
    if text_only and b"\0" in data:
        raise ValueError(f"{path} holds NUL bytes: a binary file or UTF-16 text, not UTF-8; remove it from the data "
                         f"sources (or convert it to UTF-8)")
    return data.decode("utf-8", errors="replace")


def _valid_utf8(text: str) -> str:
    # JSON may escape lone surrogates ("\ud800"), which the Rust tokenizer cannot accept.
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8")


def _file_documents(path: Path) -> Iterator[Document]:
    ext = path.suffix.lower()
    if ext == ".jsonl":
        yield from _jsonl_documents(path)
    elif ext == ".json":
        yield from _json_documents(path)
    elif ext == ".parquet":
        yield from _parquet_documents(path)
    else:
        yield Document(_read(path), str(path), ext in CODE_EXTS)


def _record(rec: Any, where: str) -> Document:
    if isinstance(rec, str):
        return Document(_valid_utf8(rec), where, False)
    if isinstance(rec, dict):
        for key in _TEXT_KEYS:
            if isinstance(rec.get(key), str):
                flag = rec.get("is_code", False)
                if not isinstance(flag, bool):     # 1 / "true" would silently mean prose (no FIM), as Parquet's check
                    raise ValueError(f"{where}: 'is_code' must be true or false, got {flag!r}")
                return Document(_valid_utf8(rec[key]), where, flag)
    raise ValueError(f"{where}: expected a string or an object with a string 'text' or 'content' field")


def _jsonl_documents(path: Path) -> Iterator[Document]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from None
            yield _record(rec, f"{path}:{lineno}")


def _json_documents(path: Path) -> Iterator[Document]:
    """A list of records (or one record) with a text field is a dataset; any other JSON is itself a code file."""
    raw = _read(path)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    # a list is a data set when any of its records has text (then a record without is an error naming it); a list
    # of objects none of which has text (a code tree's fixtures) is code
    if (isinstance(data, list) and data and all(isinstance(r, (str, dict)) for r in data)
            and any(isinstance(r, str) or any(isinstance(r.get(k), str) for k in _TEXT_KEYS) for r in data)):
        yield from (_record(r, f"{path}:{i}") for i, r in enumerate(data))
    elif isinstance(data, dict) and any(isinstance(data.get(k), str) for k in _TEXT_KEYS):
        yield _record(data, str(path))
    else:
        yield Document(raw, str(path), True)


def _is_string_type(t) -> bool:
    import pyarrow as pa
    view = getattr(pa.types, "is_string_view", lambda _: False)     # pyarrow >= 16
    return pa.types.is_string(t) or pa.types.is_large_string(t) or view(t)


def _parquet_documents(path: Path, batch_rows: int = 1024) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
    import pyarrow as pa
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path} is not a readable parquet file ({str(e).splitlines()[0][:200]})") from None
    names = pf.schema_arrow.names
    col = next((k for k in _TEXT_KEYS if k in names), None)
    if col is None:
        raise ValueError(f"{path}: no 'text' or 'content' column (columns: {', '.join(names)})")
    cols = [col] + (["is_code"] if "is_code" in names else [])
    # a column of another type (UTF-8 stored as binary, numbers) would give no document and no word: every row
    # skipped as a null is, the whole file lost from the corpus; an integer is_code would silently turn FIM off
    for name, ok, what in ((col, _is_string_type, "strings"), ("is_code", pa.types.is_boolean, "booleans")):
        if name in cols and not ok(typ := pf.schema_arrow.field(name).type):
            raise ValueError(f"{path}: column {name!r} holds {typ}, not {what}")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
        texts = batch.column(0).to_pylist()
        codes = batch.column(1).to_pylist() if len(cols) > 1 else [False] * len(texts)
        for text, code in zip(texts, codes):
            if isinstance(text, str):
                yield Document(text, f"{path}:{row}", code is True)
            row += 1
