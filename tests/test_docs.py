"""The user-facing docs name only what exists: every repository path, `dsv3.x.y` name, `section.key` config key and
`--flag` in backticks in README.md and docs/*.md, every `dsv3 ...` command in their code blocks (it parses), and
docs/ARCHITECTURE.md's file map (each file it lists exists, each module of src/dsv3 is listed). Text only: no model
is built, nothing runs."""

import argparse
import dataclasses
import importlib
import re
import shlex
from pathlib import Path

import pytest
from test_cli import _subparsers

from dsv3.cli_args import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/ARCHITECTURE.md", "docs/distributed.md", "docs/parallel-plan.md"]


def backticked(name: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", (ROOT / name).read_text())


def config_sections() -> dict[str, set[str]]:
    """section -> its keys, for the run sections and the post-training tables."""
    from dsv3.posttrain.config import DistillConfig, GRPOConfig, SFTConfig
    from dsv3.train.config import RunConfig
    sections = {f.name: {g.name for g in dataclasses.fields(getattr(RunConfig(), f.name))}
                for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(getattr(RunConfig(), f.name))}
    sections.update({name: {f.name for f in dataclasses.fields(cls)}
                     for name, cls in (("sft", SFTConfig), ("grpo", GRPOConfig), ("distill", DistillConfig))})
    sections["model"].add("preset")          # [model] preset = "tiny": the base the other keys change
    return sections


def resolves(dotted: str) -> bool:
    """dsv3.a.b.C.d: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS)
def test_backticked_paths_names_and_keys_exist(doc):
    sections, missing = config_sections(), []
    for tok in backticked(doc):
        if m := re.match(r"((?:src|configs|benchmarks|tests|docs)/[\w./*-]+)", tok):
            path = m.group(1).rstrip(".")
            if not (list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
                missing.append(path)
        elif (m := re.match(r"(dsv3(?:\.\w+)+)", tok)) and not resolves(m.group(1)):
            missing.append(m.group(1))
        elif ((m := re.match(r"([a-z]+)\.([a-z_0-9]+)\b(?!\.)", tok)) and m.group(1) in sections
              and m.group(2) not in sections[m.group(1)] | {"key"} and not tok.endswith((".safetensors", ".json"))):
            # `checkpoint.keep`, `grpo.task = "code"`; not file names (`model.safetensors`), module paths or the
            # `parallel.key=value` pattern
            missing.append(tok)
    assert not missing, f"{doc} names what does not exist: {missing}"


def _options(parser: argparse.ArgumentParser) -> set[str]:
    out = set()
    for a in parser._actions:
        out.update(a.option_strings)
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                out |= _options(sub)
    return out


TORCHRUN = {"--standalone", "--nproc-per-node", "--nproc_per_node", "--nnodes"}


@pytest.mark.parametrize("doc", DOCS)
def test_backticked_flags_are_dsv3_options(doc):
    known = _options(build_parser()) | TORCHRUN
    unknown = [f for tok in backticked(doc) if "benchmarks/" not in tok
               for f in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", tok) if f not in known]
    assert not unknown, f"{doc}: {unknown}"


def commands(doc: str) -> list[list[str]]:
    """argv of every `dsv3 ...` / `-m dsv3.cli ...` in the code blocks (fenced or indented), optional-argument
    brackets, `...` and trailing comments removed."""
    text = (ROOT / doc).read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL) + re.findall(r"^    (\S.*)$", text, re.MULTILINE)
    out = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        line = re.split(r"\s#", line)[0]
        for seg in re.split(r"&&|&\s*$", line):
            m = re.search(r"(?:^|\s)(?:\S*/)?dsv3(?:\.cli)?\s+(.*)$", seg.strip())
            if m and "import" not in seg:
                argv = shlex.split(re.sub(r"[\[\]]|\.\.\.", "", m.group(1)))
                out.append([a for a in argv if a != "&"])
    return out


@pytest.mark.parametrize("doc", ["README.md", "docs/distributed.md", "docs/parallel-plan.md"])
def test_every_documented_command_parses(doc):
    """... and its `section.key=value` overrides name existing keys."""
    argvs, sections = commands(doc), config_sections()
    assert argvs
    for argv in argvs:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{doc}: `dsv3 {' '.join(argv)}` does not parse")
        for override in getattr(args, "overrides", []):
            section, _, key = override.partition("=")[0].partition(".")
            assert key == "key" or key in sections.get(section, {key}), f"{doc}: {override} in `dsv3 {argv[0]}`"


def test_architecture_map_lists_every_module_and_only_existing_ones():
    text = (ROOT / "docs/ARCHITECTURE.md").read_text()
    tree = text.split("```")[1]
    listed, package = set(), ""
    for line in tree.splitlines():
        if m := re.match(r"^  ([\w/]+\.py)\b", line):                # a top-level file, or package/file.py
            listed.add(m.group(1))
            package = m.group(1).split("/")[0] if "/" in m.group(1) else ""
        elif m := re.match(r"^  (\w+)/", line):                     # a package: its files follow, indented
            package = m.group(1)
        elif m := re.match(r"^    ([\w]+\.py)(?: / ([\w]+\.py))?\s", line):
            listed.update(f"{package}/{name}" for name in m.groups() if name)
    src = ROOT / "src/dsv3"
    modules = {p.relative_to(src).as_posix() for p in src.rglob("*.py") if p.name != "__init__.py"}
    assert not (listed - modules - {"fp8/__init__.py"}), f"listed, not in src/dsv3: {listed - modules}"
    assert not (modules - listed), f"in src/dsv3, not in docs/ARCHITECTURE.md: {sorted(modules - listed)}"


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "configs").iterdir()))
def test_every_shipped_config_validates_and_its_comments_name_existing_keys(path):
    """configs/: model presets load, run files validate (post-training ones with their table and a base model's
    shape, as `dsv3 sft` would build them), and a `section.key` named in a comment exists."""
    from dsv3.config import load_model_config
    from dsv3.posttrain.config import KINDS, read_posttrain_dict, split_config
    from dsv3.train import load_run_config
    file = ROOT / "configs" / path
    if file.suffix == ".json":
        load_model_config(file)
        return
    kind = file.stem if file.stem in KINDS else None
    if kind:
        d = read_posttrain_dict(kind, file, [])
        table = {**dataclasses.asdict(KINDS[kind][0]()), **d[kind]}
        # GRPO sets train.batch_size to a step's rollouts (dsv3.posttrain.grpo), as `dsv3 grpo` does
        rows = ({"batch_size": table["prompts_per_step"] * table["group_size"], "batch_size_start": 0}
                if kind == "grpo" else {})
        split_config(kind, d, load_model_config("tiny").to_dict(), train=rows)
    else:
        load_run_config(file, [])
    sections = config_sections()
    comments = " ".join(line.split("#", 1)[1] for line in file.read_text().splitlines() if "#" in line)
    named = re.findall(r"\b([a-z]+)\.([a-z_0-9]+)\b(?!\.)", comments.replace(f"{file.stem}.toml", ""))
    assert not [f"{s}.{k}" for s, k in named if s in sections and k not in sections[s]]


def _dsv3_imports(path: Path, package: list[str]) -> set[str]:
    """The dsv3 sub-packages (or top-level modules) a file imports, relative imports resolved."""
    import ast
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names = [".".join(base + [node.module])] if node.module else [".".join(base + [a.name]) for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n.split(".")[1] for n in names if n.startswith("dsv3.") and n.count(".") >= 1}
    return out


def test_import_direction_is_the_one_architecture_draws():
    """docs/ARCHITECTURE.md's chain `config <- kernels <- ... <- cli`: a package imports only from its left (or its
    own level), and `verify` only into the packages its line names."""
    text = (ROOT / "docs/ARCHITECTURE.md").read_text().split("## Import direction")[1].split("```")[1]
    chain, verify = text.strip().splitlines()[:2]
    rank = {name.strip(): i for i, level in enumerate(chain.split("<-")) for name in level.split("/")}
    rank["cli_args"] = rank["cli"]
    verify_users = {name.strip() for name in verify.split("<-")[1].split("/")} | {"verify"}
    src, wrong = ROOT / "src/dsv3", []
    for path in src.rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        me = parts[0]
        if me == "__init__":
            continue
        for other in _dsv3_imports(path, ["dsv3", *parts[:-1]]) - {me}:
            if other == "verify" and me not in verify_users:
                wrong.append(f"{path.relative_to(src)} -> verify")
            elif other in rank and me in rank and rank[other] > rank[me]:
                wrong.append(f"{path.relative_to(src)} -> {other}")
    assert set(rank) - {"cli_args"} >= {p.name for p in src.iterdir() if p.is_dir() and p.name != "__pycache__"} - {
        "verify"}, "a package missing from the chain"
    assert not wrong, wrong


def test_the_run_sections_named_in_the_readme_and_the_help_are_runconfigs():
    sections = [s for s in config_sections() if s not in ("sft", "grpo", "distill")]
    readme = re.search(r"# sections: ([a-z ]+)", (ROOT / "README.md").read_text()).group(1).split()
    train = next(p for name, p in _subparsers(build_parser()) if name == "dsv3 train")
    text = " ".join(next(a.help for a in train._actions if "--config" in a.option_strings).split())
    helped = re.search(r"sections ([a-z, ]+)\)", text).group(1).replace(",", " ").split()
    assert readme == helped == sections

