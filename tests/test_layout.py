"""The import direction between packages (docs/ARCHITECTURE.md): model <- kernels/fp8/parallel <- train/infer <-
serve/eval."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "dsv3"
# what each package may not import (absolute module prefixes, or dsv3 sub-packages)
FORBIDDEN = {
    "model": ["torch.distributed", "triton", "dsv3.train", "dsv3.infer", "dsv3.serve", "dsv3.eval",
              "dsv3.parallel", "dsv3.kernels", "dsv3.checkpoint", "dsv3.posttrain", "dsv3.data", "dsv3.cli",
              "os", "safetensors"],
    "config": ["torch"],
    "fp8": ["dsv3.checkpoint", "dsv3.train", "dsv3.infer", "dsv3.serve"],
    "checkpoint": ["dsv3.train", "dsv3.infer", "dsv3.serve", "dsv3.eval", "dsv3.parallel"],
    "data": ["dsv3.model", "dsv3.train", "dsv3.infer", "dsv3.serve", "dsv3.eval", "dsv3.cli", "torch.distributed"],
    "train": ["dsv3.infer", "dsv3.serve", "dsv3.eval", "dsv3.cli"],
    "kernels": ["dsv3.model", "dsv3.train", "dsv3.infer", "dsv3.checkpoint", "dsv3.data", "dsv3.cli"],
    "infer": ["dsv3.train", "dsv3.serve", "dsv3.eval", "dsv3.cli", "dsv3.data"],
    "eval": ["dsv3.train", "dsv3.serve", "dsv3.cli", "torch.distributed"],
    "posttrain": ["dsv3.serve", "dsv3.eval", "dsv3.cli"],
    # answers and code are judged by one set of functions in training (rewards) and evaluation
    "verify": ["torch", "dsv3.model", "dsv3.train", "dsv3.infer", "dsv3.serve", "dsv3.eval", "dsv3.posttrain",
               "dsv3.cli"],
    "serve": ["dsv3.train", "dsv3.eval", "dsv3.cli", "dsv3.model", "dsv3.kernels", "torch.distributed"],
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    package = "dsv3." + ".".join(path.relative_to(PKG).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolve against this file's package
                base = package.rstrip(".").split(".")
                base = base[: len(base) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_import_direction(part):
    files = [PKG / f"{part}.py"] if (PKG / f"{part}.py").exists() else sorted((PKG / part).rglob("*.py"))
    assert files
    for f in files:
        for mod in _imports(f):
            for bad in FORBIDDEN[part]:
                assert not (mod == bad or mod.startswith(bad + ".")), f"{f.relative_to(PKG)} imports {mod}"


def test_the_checker_sees_relative_imports():
    assert "dsv3.config" in _imports(PKG / "model" / "mla.py")
    assert "dsv3.model" in _imports(PKG / "checkpoint" / "hf.py")
