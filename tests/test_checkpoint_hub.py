"""`--model ORG/NAME` as a Hugging Face Hub id (dsv3.checkpoint.hub): resolved from the Hub's own cache laid out as
huggingface_hub writes it, offline, through `dsv3 generate` (the output equals the same model's from its directory);
a local directory of the same name wins; an id the Hub cannot provide is one line naming it (exit code 2)."""

import os
import shutil
import subprocess
import sys

from conftest import build, tiny_config
from serve_fixture import TEXTS

from dsv3 import save_pretrained
from dsv3.data import train_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache(tmp_path):
    """A Hub cache holding org/tiny at COMMIT (refs/main -> snapshot), and the same files in a plain directory."""
    plain = tmp_path / "plain"
    save_pretrained(build(tiny_config(vocab_size=320, max_position_embeddings=512), seed=1), plain)
    train_tokenizer(TEXTS, vocab_size=320).save(plain)
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(plain, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return plain


def _generate(model: str, tmp_path, cwd=None):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dsv3.cli", "generate", "--model", model, "--prompt", "def f(x):",
                           "--max-tokens", "8", "--temperature", "0", "--device", "cpu"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_a_hub_id_resolves_from_the_cache(tmp_path):
    plain = _cache(tmp_path)
    by_id, by_dir = _generate("org/tiny", tmp_path), _generate(str(plain), tmp_path)
    assert by_id.returncode == 0 and by_dir.returncode == 0, by_id.stderr + by_dir.stderr
    assert by_id.stdout == by_dir.stdout and "def f(x):" in by_id.stdout
    missing = _generate("org/absent", tmp_path)
    assert missing.returncode == 2 and "org/absent is not a local directory" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    # a local directory named like an id is used as it is (here: no weights in it, so its own error); so is a path
    # whose parent exists here (a run not written yet)
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    local = _generate("org/tiny", tmp_path, cwd=tmp_path)
    assert local.returncode == 2 and "is not a local directory" not in local.stderr, local.stderr
    unwritten = _generate("org/later", tmp_path, cwd=tmp_path)
    assert unwritten.returncode == 2 and "Hugging Face Hub" not in unwritten.stderr, unwritten.stderr
