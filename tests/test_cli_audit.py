"""The command line as a user mistypes it (a helper's audit, thirty-third session): each mistake is one line and an
exit status, never a traceback, and nothing is written; overrides may follow an option."""

import json

import pytest

from dsv3.cli import main
from test_train_loop import small_run


@pytest.mark.parametrize("args, says", [
    (["model.model_type=[1]"], "model_type=[1]: expected one of"),            # was: unhashable type 'list'
    (["model.q_lora_rank=false"], "q_lora_rank=False: must be a positive integer or null"),   # was: taken as 0
    (["--resume-from", ""], "--resume-from needs a checkpoint"),               # was: a fresh start
])
def test_bad_training_arguments_are_one_line(tmp_path, capsys, args, says):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(small_run(tmp_path).to_dict()))
    try:
        status = main(["train", "--config", str(cfg), *args])
    except SystemExit as e:             # argparse's own refusals
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert says in err.splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, says", [("[1, 2]", "its top level is a list, not a table"), (b"\xff\xfe", "not valid")])
def test_a_config_file_that_is_not_a_table_is_one_line(tmp_path, capsys, text, says):
    cfg = tmp_path / ("run.json" if isinstance(text, str) else "run.toml")
    cfg.write_text(text) if isinstance(text, str) else cfg.write_bytes(text)
    assert main(["train", "--config", str(cfg)]) == 2
    assert says in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert "is a directory, not a file" in capsys.readouterr().err


def test_overrides_may_follow_an_option(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(small_run(tmp_path).to_dict()))
    assert main(["train", "--config", str(cfg), "train.steps=-1", "--quiet", "log.interval=1"]) == 2
    assert "train.steps" in capsys.readouterr().err                 # parsed (and refused), not "unrecognized"
    with pytest.raises(SystemExit):
        main(["train", "--config", str(cfg), "--quiet", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize("device, says", [("meta", "only cpu and cuda"), ("nonsense", "is not a device"),
                                          ("cuda:99", "CUDA device")])
def test_generate_checks_its_device_before_reading_the_model(tmp_path, capsys, device, says):
    assert main(["generate", "--model", str(tmp_path / "absent"), "--prompt", "x", "--device", device]) == 2
    assert says in capsys.readouterr().err
