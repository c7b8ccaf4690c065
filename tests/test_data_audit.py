"""Data sources as a user gets them wrong (and, below, a corpus of one document, two runs sharing a cache, a killed
baselines write): a binary file among the text (trained on as replacement characters
before), an unreadable parquet file (a pyarrow traceback before), a record file with a line that is not UTF-8 (the
whole file failed with a UnicodeDecodeError naming neither file nor line), a tokenizer directory without its
tokenizer.json; and what stays accepted: Latin-1 text (bytes replaced), empty files (skipped)."""

import pytest

from dsv3.data import Tokenizer, iter_documents
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


def test_nul_bytes_past_the_first_8k_are_named(tmp_path):
    # a text header followed by binary data: the README says a file holding NUL bytes is not trained on
    (tmp_path / "dump.txt").write_bytes(b"a plain text header\n" * 500 + b"\0\0\x01\x02 binary tail")
    with pytest.raises(ValueError, match=r"dump\.txt holds NUL bytes"):
        list(iter_documents([str(tmp_path)]))


def test_a_corpus_of_one_document_is_trained_on(tmp_path):
    from dsv3.data import build_shards, train_tokenizer
    from dsv3.data.shards import val_score
    # a text the hash sends to validation: before, the only document went there and training had nothing
    text = next(f"one long book {k} " * 40 for k in range(1000) if val_score(f"one long book {k} " * 40, 0) < 0.5)
    (tmp_path / "book.txt").write_text(text)
    tok = train_tokenizer([text], 300)
    ss = build_shards(tok, [str(tmp_path / "book.txt")], tmp_path / "shards", val_fraction=0.5, progress=False)
    assert (ss.n_docs("train"), ss.n_docs("val")) == (1, 0)


def test_an_empty_validation_split_names_the_keys_before_writing_the_run(tmp_path):
    import torch

    from dsv3.train.config import RunConfig
    from dsv3.train.data_parallel import Layout
    from dsv3.train.run_data import prepare_run_data
    (tmp_path / "book.txt").write_text("one long book " * 200)
    cfg = RunConfig.from_dict({"run_dir": str(tmp_path / "run"), "model": {"preset": "tiny", "vocab_size": 384},
                               "data": {"sources": [str(tmp_path / "book.txt")], "cache_dir": str(tmp_path / "c"),
                                        "seq_len": 32, "val_fraction": 0.01},
                               "train": {"device": "cpu", "dtype": "fp32"}, "log": {"val_batches": 2}})
    with pytest.raises(ValueError, match=r"log\.val_batches=2 needs validation documents.*data\.val_fraction=0\.01"):
        prepare_run_data(cfg, Layout(torch.device("cpu"), cfg))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("racing", ["tokenizer", "shards"])
def test_two_runs_building_the_same_cache_at_once_both_go_on(tmp_path, monkeypatch, racing):
    # two runs sharing data.cache_dir: the other renames the same tokenizer and shards into place just before this
    # one does; before, this one's rename over the non-empty directory failed the run ("Directory not empty")
    import os
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("alpha beta gamma " * 50)
    (tmp_path / "src" / "b.txt").write_text("delta epsilon " * 50)
    cfg = DataConfig(sources=[str(tmp_path / "src")], cache_dir=str(tmp_path / "cache"), val_fraction=0.0)
    real_rename, raced = os.rename, []

    def rename(src, dst):
        name = os.path.basename(dst)
        if name == racing and not raced and ".tmp-" in os.path.basename(src):
            raced.append(name)
            monkeypatch.setattr(os, "rename", real_rename)
            prepare_dataset(cfg, 300, progress=False)      # the other run, start to finish
            monkeypatch.setattr(os, "rename", rename)
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    tok, ss, root = prepare_dataset(cfg, 300, progress=False)
    assert raced == [racing]
    assert ss.n_docs("train") == 2 and tok.fingerprint() == ss.meta["tokenizer"]
    assert sorted(p.name for p in root.iterdir()) == ["shards", "tokenizer"]      # no temporaries left


def test_a_killed_baselines_write_leaves_no_cache(tmp_path, monkeypatch):
    import pathlib

    from dsv3.data import ShardSet
    from dsv3.train.config import RunConfig
    from dsv3.train.run_data import set_up_run_dir
    (tmp_path / "a.txt").write_text("alpha beta gamma " * 50)
    (tmp_path / "b.txt").write_text("delta epsilon " * 50)
    cfg = RunConfig.from_dict({"run_dir": str(tmp_path / "run"), "model": {"preset": "tiny", "vocab_size": 384},
                               "data": {"sources": [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
                                        "cache_dir": str(tmp_path / "c"), "seq_len": 32, "val_fraction": 0.3}})
    tok, ss, data_dir = prepare_dataset(cfg.data, 384, progress=False)
    assert isinstance(ss, ShardSet)
    real = pathlib.Path.write_text

    def killed(self, text, *a, **kw):
        if self.name.endswith("baselines.json") or "baselines.json.tmp" in self.name:
            real(self, text[:5], *a, **kw)
            raise KeyboardInterrupt
        return real(self, text, *a, **kw)
    monkeypatch.setattr(pathlib.Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        set_up_run_dir(cfg, tok, ss, data_dir, resume=False, overwrite=False)
    monkeypatch.setattr(pathlib.Path, "write_text", real)
    assert not (data_dir / "baselines.json").exists()      # before: a truncated cache every later run copied
    set_up_run_dir(cfg, tok, ss, data_dir, resume=False, overwrite=False)
    import json
    assert set(json.loads((tmp_path / "run" / "baselines.json").read_text())) == {
        "unigram entropy", "unigram val cross-entropy"}


def test_a_recursive_glob_takes_each_file_once(tmp_path):
    # "corpus/**" matches the directory, its subdirectories and their files: each directory was walked and each
    # file taken again as a match, so a file two levels down was trained on three times
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text("alpha")
    (tmp_path / "corpus" / "sub" / "b.txt").write_text("beta")
    docs = [d.source for d in iter_documents([str(tmp_path / "corpus" / "**")])]
    assert docs == [str(tmp_path / "corpus" / "a.txt"), str(tmp_path / "corpus" / "sub" / "b.txt")]


def test_a_json_list_of_objects_without_text_is_a_code_file(tmp_path):
    # a code tree's fixtures ([{"id": 1}, ...]) are JSON code, as the reader's docstring says; the whole build
    # failed on them before. A list of records where some have text is still a data set, its bad rows named
    (tmp_path / "fixtures.json").write_text('[{"id": 1, "name": "a"}, {"id": 2}]')
    docs = list(iter_documents([str(tmp_path / "fixtures.json")]))
    assert [(d.text, d.is_code) for d in docs] == [('[{"id": 1, "name": "a"}, {"id": 2}]', True)]
    (tmp_path / "rows.json").write_text('[{"text": "one"}, {"id": 2}]')
    with pytest.raises(ValueError, match=r"rows\.json:1: expected a string or an object"):
        list(iter_documents([str(tmp_path / "rows.json")]))


def test_training_a_tokenizer_into_a_directory_never_replaces_one_it_did_not_write(tmp_path):
    # `dsv3 tokenizer train --out models/DeepSeek-V3` replaced the release's tokenizer.json and tokenizer_config.json
    # (its chat template) without a word; a directory a tokenizer training wrote is still retrained into
    from dsv3.data import train_tokenizer
    texts = ["words and more words " * 20, "other text here " * 20]
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text('{"theirs": 1}')
    (model / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=rf"{model} already holds tokenizer.json"):
        train_tokenizer(texts, 300, model)
    assert (model / "tokenizer.json").read_text() == '{"theirs": 1}'
    ours = tmp_path / "tok"
    train_tokenizer(texts, 300, ours)
    train_tokenizer(texts, 290, ours)
    assert Tokenizer.load(ours).vocab_size <= 290
    (ours / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        train_tokenizer(texts, 300, ours)


def test_a_loader_position_past_its_document_is_named(tmp_path):
    # a resume whose shards were rebuilt (a corpus file edited: same document count, a shorter document) failed in
    # the first batch with numpy's "could not broadcast input array"; the position is checked when loaded now
    from test_data import EOS, make_shards, random_docs
    from dsv3.data import PackedLoader
    loader = PackedLoader(make_shards(tmp_path, random_docs(5, code=None)), "train", 7, eos_id=EOS, seed=1)
    state = loader.state_dict() | {"offset": 10_000}
    with pytest.raises(ValueError, match=r"offset=10000 is past the end of document \d+ \(\d+ tokens with its EOS"):
        loader.load_state_dict(state)


def test_a_parquet_text_column_that_is_not_strings_is_named(tmp_path):
    # a text column of bytes (UTF-8 stored as binary) or numbers gave no documents and no word: the file's rows
    # were each skipped as a null would be, so a build over several sources silently lost the whole file
    pa = pytest.importorskip("pyarrow", reason="needs the optional `train` extra (CI pins it)")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": pa.array([b"hello", b"world"], pa.binary())}), tmp_path / "bytes.parquet")
    with pytest.raises(ValueError, match=r"bytes\.parquet: column 'text' holds binary, not strings"):
        list(iter_documents([str(tmp_path / "bytes.parquet")]))
    pq.write_table(pa.table({"text": ["x", "y"], "is_code": [1, 0]}), tmp_path / "flags.parquet")
    with pytest.raises(ValueError, match=r"flags\.parquet: column 'is_code' holds int64, not booleans"):
        list(iter_documents([str(tmp_path / "flags.parquet")]))
    pq.write_table(pa.table({"text": pa.array(["a", None], pa.large_string())}), tmp_path / "large.parquet")
    assert [d.text for d in iter_documents([str(tmp_path / "large.parquet")])] == ["a"]


def test_build_shards_never_replaces_a_directory_that_is_not_a_shard_set(tmp_path):
    # a directory holding some other meta.json was taken for an earlier build and replaced whole (the user's files
    # beside it deleted); only a directory of build_shards' own files is rebuilt in place
    from test_data import word_tokenizer
    from dsv3.data import build_shards
    (tmp_path / "a.txt").write_text("w1 w2 w3")
    out = tmp_path / "project"
    out.mkdir()
    (out / "meta.json").write_text('{"name": "my project"}')
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"project holds files build_shards did not write \(notes\.txt\)"):
        build_shards(word_tokenizer(), [str(tmp_path / "a.txt")], out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    build_shards(word_tokenizer(), [str(tmp_path / "a.txt")], tmp_path / "shards", progress=False)
    ss = build_shards(word_tokenizer(10), [str(tmp_path / "a.txt")], tmp_path / "shards", progress=False)
    assert ss.n_docs("train") == 1 and ss.doc("train", 0).tolist() == [9, 10, 11]


def test_a_directory_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    # os.walk skips a directory it cannot list (no read permission) without a word: its files were left out of
    # the corpus silently (simulated: the tests may run as root, whom permissions do not stop)
    import os
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.txt").write_text("alpha")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.txt").write_text("beta")
    scandir = os.scandir

    def refusing(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(PermissionError, match=r"cannot list .*locked \(Permission denied\): its files would be left"):
        list(iter_documents([str(tmp_path)]))


def test_a_jsonl_is_code_flag_that_is_not_a_boolean_is_named(tmp_path):
    # `"is_code": 1` silently meant prose (no FIM), as an integer Parquet is_code column did
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "def f(): pass", "is_code": true}\n{"text": "prose"}\n')
    assert [d.is_code for d in iter_documents([str(good)])] == [True, False]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "def f(): pass", "is_code": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl.*'is_code' must be true or false, got 1"):
        list(iter_documents([str(bad)]))
