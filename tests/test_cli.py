import subprocess
import sys

from dsv3.cli import main


def test_info_v3_671b_prints_the_spec_counts(capsys):
    assert main(["info", "v3-671b"]) == 0
    out = capsys.readouterr().out
    assert "671,026,404,352 (671.03B)" in out
    assert "37,552,282,624 (37.55B)" in out and "(36.63B)" in out and "(11.61B)" in out


def test_info_reads_a_checkpoint_directory(tmp_path, capsys):
    from conftest import build, tiny_config
    import dsv3
    dsv3.save_pretrained(build(tiny_config()), tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert "8 routed (top-2, 4 groups, top-2 groups)" in capsys.readouterr().out


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    assert main(["info", "no-such-model"]) == 2
    assert "error: no model config found" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v3", "topk_group": 99}')
    assert main(["info", str(tmp_path)]) == 2
    assert "topk_group=99" in capsys.readouterr().err


def test_demo_runs_as_a_console_script(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "demo", "--out", str(tmp_path / "ck")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "reload max|diff| 0.00e+00" in r.stdout and (tmp_path / "ck" / "config.json").exists()


def test_every_subcommand_the_parser_accepts_has_a_runner():
    """dsv3.cli_args parses, dsv3.cli.COMMANDS runs: a parser without a runner (or the reverse) is a dead end."""
    import argparse

    from dsv3.cli import COMMANDS
    from dsv3.cli_args import build_parser

    def leaves(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return {prefix}
        return {leaf for name, p in subs[0].choices.items() for leaf in leaves(p, f"{prefix} {name}".strip())}
    commands = leaves(build_parser())
    assert len(commands) == 15 and "tokenizer train" in commands
    assert commands == set(COMMANDS)
