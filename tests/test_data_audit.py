"""Data sources as a user gets them wrong: a binary file among the text (trained on as replacement characters
before), an unreadable parquet file (a pyarrow traceback before), a record file with a line that is not UTF-8 (the
whole file failed with a UnicodeDecodeError naming neither file nor line), a tokenizer directory without its
tokenizer.json; and what stays accepted: Latin-1 text (bytes replaced), empty files (skipped)."""

import pytest

from dsv3.data import iter_documents
from dsv3.data.records import RecordError, iter_records
from dsv3.train.config import DataConfig
from dsv3.train.dataset import prepare_dataset


def test_a_binary_file_among_the_sources_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("words " * 50)
    (tmp_path / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    with pytest.raises(ValueError, match=r"photo\.txt holds NUL bytes: a binary file or UTF-16"):
        list(iter_documents([str(tmp_path)]))
    (tmp_path / "photo.txt").unlink()
    (tmp_path / "latin1.txt").write_bytes("café naïve".encode("latin-1"))   # not UTF-8, still text
    (tmp_path / "empty.md").write_text("")
    docs = {d.source.rsplit("/", 1)[1]: d.text for d in iter_documents([str(tmp_path)])}
    assert docs == {"latin1.txt": "caf\ufffd na\ufffdve", "notes.txt": "words " * 50}


def test_an_unreadable_parquet_file_is_named(tmp_path):
    bad = tmp_path / "rows.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=rf"{bad} is not a readable parquet file"):
        list(iter_documents([str(bad)]))
    with pytest.raises(RecordError, match=rf"{bad} is not a readable parquet file"):
        list(iter_records(bad))


def test_a_record_line_that_is_not_utf8_is_that_lines_error(tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\nnot json\n{"text": "fine"}\n')
    rows = list(iter_records(f))
    assert [w for w, _ in rows] == [f"{f}:1", f"{f}:2", f"{f}:3", f"{f}:4"]
    assert rows[0][1] == {"text": "ok"} and rows[3][1] == {"text": "fine"}
    assert isinstance(rows[1][1], RecordError) and "not UTF-8 (byte 13" in str(rows[1][1])
    assert isinstance(rows[2][1], RecordError) and "not JSON" in str(rows[2][1])


def test_a_tokenizer_directory_without_tokenizer_json_names_the_key(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "a.txt").write_text("words " * 50)
    cfg = DataConfig(sources=[str(tmp_path / "a.txt")], tokenizer=str(tmp_path / "tok"),
                     cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"data.tokenizer=.*tok' is neither a tokenizer.json nor"):
        prepare_dataset(cfg, 300, progress=False)
    assert not (tmp_path / "cache").exists()
