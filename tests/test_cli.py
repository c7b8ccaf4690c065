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


def _subparsers(parser, prefix: str = "dsv3"):
    """(name, parser) of every leaf subcommand."""
    import argparse
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
    for name, p in (subs[0].choices.items() if subs else ()):
        yield from _subparsers(p, f"{prefix} {name}")


def test_every_option_has_help_and_shows_its_default(monkeypatch):
    """`dsv3 X --help` documents each option, and each non-empty default is in its help line as the parser holds it
    (a help text's own "default: ..." counts); a key taken from the environment is never printed."""
    import re

    from dsv3.cli_args import build_parser
    monkeypatch.setenv("DSV3_API_KEY", "sekrit-key-in-env")
    for name, sub in _subparsers(build_parser()):
        text = sub.format_help()
        assert "sekrit-key-in-env" not in text, name
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[-1]} has no help"
            if action.default is None or action.default is False or "key" in action.dest:
                continue
            shown = ",".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            flag = action.option_strings[-1]
            # the option's block of the help: from its flag to the next option's
            block = re.search(rf"\n  {re.escape(flag)}\b(.*?)(?=\n  -|\Z)", text, re.DOTALL).group(1)
            block = " ".join(block.split())
            assert f"(default: {shown})" in block or "default" in action.help, \
                f"{name} {flag}: default {shown!r} not shown: {block!r}"


def test_compile_prefill_flag_reaches_the_engine_config(monkeypatch):
    """`--compile-prefill` (off by default) sets EngineConfig.compile_prefill of the engines `dsv3 serve` and
    `dsv3 bench decode | prefill | serve` build."""
    import pytest

    from dsv3.cli_args import build_parser
    from dsv3.launch import bench as launch_bench
    from dsv3.launch.serve import serve_engine_config
    from dsv3.serve import bench as serve_bench

    class Stop(Exception):
        """Raised by the fakes once they have what the flags made (no model is built, nothing is timed)."""

    seen = {}

    def record(name, compile_prefill):
        def fake(*args, **kwargs):
            seen[name] = compile_prefill(args, kwargs)
            raise Stop
        return fake
    monkeypatch.setattr(launch_bench, "bench_model", lambda *a, **k: None)
    monkeypatch.setattr(launch_bench, "bench_decode", record("decode", lambda a, k: k["compile_prefill"]))
    monkeypatch.setattr(launch_bench, "bench_prefill", record("prefill", lambda a, k: k["compile_prefill"]))
    # bench serve: its engines' factory is bench_engine(..., config); its tokenizer (trained: seconds) not needed
    serve_config = lambda a, k: a[0].args[-1].compile_prefill          # noqa: E731
    monkeypatch.setattr(serve_bench, "bench_serve_vs_engine", record("serve", serve_config))
    monkeypatch.setattr(launch_bench, "bench_tokenizer", lambda: type("Tok", (), {"vocab_size": 512})())
    parse = build_parser().parse_args
    for flags, want in (([], False), (["--compile-prefill"], True)):
        assert serve_engine_config(parse(["serve", "--model", "m", *flags]), []).compile_prefill is want
        seen.clear()
        for what in ("decode", "prefill", "serve"):
            with pytest.raises(Stop):
                launch_bench.run_bench(parse(["bench", what, "--batches", "1", *flags]), None)
        assert seen == {"decode": want, "prefill": want, "serve": want}, (flags, seen)
