"""Run config validation through the command line: every field of every run section (taken from the dataclasses, so
a field added without a rule fails here) given a value of the wrong type and one out of its range is refused with one
line naming `section.key`, the value and what is allowed, before any file or directory is written."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dsv3.cli import main
from dsv3.train.config import RUN_DIR, SECTIONS, Flag, Int, Items, OneOf, Real, Text

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml")


def bad_values(rule) -> list:
    """[a value of the wrong type, a value of the right type outside the rule's range] (booleans and free strings
    have no range: a second wrong type instead)."""
    if isinstance(rule, Int):
        return [float(rule.lo + 1), rule.lo - 1 if rule.hi is None else rule.hi + 1]
    if isinstance(rule, Real):
        return ["abc", (rule.lo if rule.lo_open else rule.lo - 1) if rule.lo is not None else rule.hi + 1]
    if isinstance(rule, Flag):
        return ["yes", 1]
    if isinstance(rule, OneOf):
        return [7, "bogus"]
    if isinstance(rule, Text):
        return [7, "" if rule.nonempty else ["a", "list"]]
    if isinstance(rule, Items):
        inner = bad_values(rule.item)[1]
        return ["stdlib", [inner] * max(rule.n, 1) if rule.n or not isinstance(inner, str) else []]
    raise AssertionError(f"no bad values for the rule {rule!r}: teach bad_values about it")


def cases() -> list[tuple[str, object, object]]:
    out = [("run_dir", RUN_DIR, v) for v in bad_values(RUN_DIR)]
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            rule = f.metadata.get("rule")
            assert rule is not None, f"{section}.{f.name} has no rule: declare it with setting(default, rule)"
            out += [(f"{section}.{f.name}", rule, v) for v in bad_values(rule)]
    return out


def test_every_field_refuses_a_wrong_type_and_an_out_of_range_value_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                   # the default data.cache_dir (out/data) is relative
    run, cache = tmp_path / "run", tmp_path / "cache"
    all_cases = cases()
    assert len(all_cases) >= 2 * 40
    for key, rule, value in all_cases:
        override = f"{key}={json.dumps(value)}"
        base = [f"{k}={json.dumps(str(v))}" for k, v in (("run_dir", run), ("data.cache_dir", cache)) if k != key]
        rc = main(["train", "--config", TINY, *base, override, "--quiet"])     # each key given once
        err = capsys.readouterr().err
        assert rc == 2, (override, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (override, err)
        assert f"{key}={value!r}: must be {rule.allowed}" in err, (override, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == [], (override, "wrote", list(tmp_path.iterdir()))


def test_the_issue_examples_and_relations_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for override, says in [("train.steps=1.5", "train.steps=1.5: must be an integer >= 1"),
                           ("train.batch_size=4.0", "train.batch_size=4.0: must be an integer >= 1"),
                           ("optim.grad_clip=-1", "optim.grad_clip=-1: must be a number > 0"),
                           ("train.ema_decay=2", "train.ema_decay=2: must be a number in [0, 1)"),
                           ("optim.lr=abc", "optim.lr='abc': must be a number > 0"),
                           ("log.interval=0", "log.interval=0: must be an integer >= 1"),
                           ('data.sources="stdlib"', "data.sources='stdlib': must be a list"),
                           ("data.val_fraction=1.5", "data.val_fraction=1.5: must be a number in [0, 1)"),
                           ("train.device=bogus", "train.device='bogus': must be one of 'auto', 'cpu', 'cuda'"),
                           ("optim.warmup=0.9", "need optim.warmup=0.9 <= constant_until=0.676"),
                           ("train.micro_batch_size=3", "train.batch_size=16 is not a multiple of"),
                           ("train.cuda_graphs=true", "train.cuda_graphs needs train.compile=true, parallel.pp=1")]:
        assert main(["train", "--config", TINY, override, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, (override, err)
    assert list(tmp_path.iterdir()) == []


def test_cuda_graphs_refuse_fsdp_a_pipeline_and_a_cpu_device_before_any_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    graphs = ["train.cuda_graphs=true", "train.compile=true"]
    for extra, says in [(["parallel.fsdp=true"], "train.cuda_graphs needs train.compile=true, parallel.pp=1 and "
                                                  "parallel.fsdp=false"),
                        (["parallel.pp=2"], "train.cuda_graphs needs train.compile=true, parallel.pp=1"),
                        (['train.device="cpu"'], "train.cuda_graphs needs a CUDA device; train.device='cpu' is cpu")]:
        assert main(["train", "--config", TINY, *graphs, *extra, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, (extra, err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_refused_before_any_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for device in ("cuda", "cuda:1"):
        assert main(["train", "--config", TINY, f"train.device={json.dumps(device)}", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"train.device={device!r}: this machine has no CUDA device" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["tiny.toml", "small-gpu.toml", "lite-8L.toml", "lite.toml"])
def test_shipped_configs_validate(name):
    """Every config in configs/ reads and validates (a typo there would only surface on the GPU)."""
    from dsv3.train.config import load_run_config
    cfg = load_run_config(Path(TINY).parent / name)
    assert cfg.train.steps > 0
