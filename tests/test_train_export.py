"""`dsv3 export` never deletes what it did not write: the run itself, a directory containing it, the run's checkpoints
and any non-empty directory that is not an earlier export are refused; --overwrite replaces an earlier export's own
files only; the files get the user's umask."""

import os
from pathlib import Path

import pytest
import torch

from dsv3 import load_pretrained
from dsv3.cli import main
from dsv3.train import Trainer
from test_train_loop import small_run


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    t = Trainer(small_run(tmp_path_factory.mktemp("export"), "x", train={"steps": 2}, log={"val_interval": 0}))
    t.run()
    return t.run_dir


def test_export_refuses_the_run_its_parents_its_checkpoints_and_foreign_directories(run, tmp_path, monkeypatch,
                                                                                      capsys):
    before = tree(run.parent)
    mine = tmp_path / "dir"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    monkeypatch.chdir(mine)                                           # `cd dir && dsv3 export runs/x .`
    for out, says in [(run, "is or contains the run directory"), (run.parent, "is or contains the run directory"),
                      (run / "checkpoints" / "step_00000099", "inside the run's checkpoints"),
                      (Path("."), "non-empty directory (notes.txt) and not a dsv3 export"),
                      (mine / "notes.txt", "not a directory")]:
        for extra in ([], ["--overwrite"]):
            assert main(["export", str(run), str(out), *extra]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and says in err, (out, err)
    assert tree(run.parent) == before and tree(mine) == {"notes.txt": 4}


def test_export_to_an_empty_directory_then_overwrite_only_its_own_files(run, tmp_path, monkeypatch, capsys):
    old_umask = os.umask(0o027)
    try:
        out = tmp_path / "hf"
        out.mkdir()
        monkeypatch.chdir(out)                                        # exporting into the current directory
        assert main(["export", str(run), "."]) == 0
        assert Path.cwd().samefile(out) and (out / "config.json").exists() and (out / ".dsv3-export.json").exists()
        assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o640)}
        assert main(["export", str(run), "."]) == 2 and "pass --overwrite" in capsys.readouterr().err
        assert main(["export", str(run), ".", "--overwrite", "--dtype", "bfloat16"]) == 0
        assert load_pretrained(out).lm_head.weight.dtype == torch.bfloat16
        (out / "README.md").write_text("my notes")                    # the user's file in the export
        assert main(["export", str(run), ".", "--overwrite"]) == 2
        assert "did not write (README.md)" in capsys.readouterr().err and (out / "README.md").exists()
        fresh = tmp_path / "new" / "hf"                               # a new directory: built aside, renamed in
        assert main(["export", str(run), str(fresh)]) == 0
        assert oct(fresh.stat().st_mode & 0o777) == oct(0o750)
        assert {oct(p.stat().st_mode & 0o777) for p in fresh.iterdir()} == {oct(0o640)}
        assert [p.name for p in fresh.parent.iterdir()] == ["hf"]
        ckpt = run / "checkpoints" / "step_00000002"
        assert oct(ckpt.stat().st_mode & 0o777) != oct(0o700)        # checkpoints follow the umask too
    finally:
        os.umask(old_umask)
    torch.testing.assert_close(load_pretrained(fresh).lm_head.weight, load_pretrained(out).lm_head.weight.float(),
                               rtol=1e-2, atol=1e-2)


def test_a_killed_overwrite_never_leaves_a_directory_that_loads_old_and_new_files_as_one(run, tmp_path, monkeypatch,
                                                                                          capsys):
    """--overwrite moves the new files in one by one: killed between two of them, the directory held the new
    config.json beside the old weights, and loaded as a complete model (the earlier export's weights under the new
    one's config and marker). config.json now leaves first and comes back last."""
    import dsv3.train.export as export
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out), "--dtype", "bfloat16"]) == 0
    real = os.replace

    def killed(src, dst):
        if Path(src).parent.name == ".dsv3-export.new" and Path(src).name == "model.safetensors":
            raise KeyboardInterrupt("killed between two files")
        real(src, dst)

    monkeypatch.setattr(export.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        export.export_run(run, out, overwrite=True)
    with pytest.raises(ValueError, match="config.json"):         # not a model: ConfigError, no config.json
        load_pretrained(out)
    monkeypatch.setattr(export.os, "replace", real)
    assert main(["export", str(run), str(out), "--overwrite"]) == 0   # the marker lets --overwrite finish it
    assert main(["export", str(run), str(tmp_path / "fresh")]) == 0
    assert tree(out) == tree(tmp_path / "fresh")
    assert load_pretrained(out).lm_head.weight.dtype == torch.float32


def test_a_garbled_checkpoint_config_is_named_with_the_newest_valid_one(tmp_path):
    """The checkpoint's config.json was read before the checkpoint was verified: a garbled one was a bare JSON
    error (`dsv3 export` and `dsv3 generate --model RUN`), naming no file."""
    import shutil
    from dsv3.train.checkpoint import CheckpointError, checkpoint_dirs
    from dsv3.train.export import load_run_model
    t = Trainer(small_run(tmp_path, "y", train={"steps": 4}, log={"val_interval": 0}, checkpoint={"interval": 2}))
    t.run()
    newest = checkpoint_dirs(t.run_dir)[-1]
    (newest / "config.json").write_text('{"model":')
    with pytest.raises(CheckpointError, match=r"config\.json cannot be read .*newest valid checkpoint is step_0+2"):
        load_run_model(t.run_dir)
    shutil.rmtree(t.run_dir)
