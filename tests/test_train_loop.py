"""The training loop end to end on a small real corpus (the stdlib `json` package): exact resume after SIGKILL,
gradient accumulation, loads summed over micro-batches, the bias update, NaN stops, EMA, export to transformers."""

import json as jsonlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsv3 import load_pretrained
from dsv3.train import RunConfig, Trainer, TrainingDiverged, export_run
from dsv3.train.checkpoint import latest_checkpoint
from dsv3.train.ema import CPUEma
from dsv3.train.metrics import read_metrics

CORPUS = str(Path(jsonlib.__file__).parent / "*.py")


def small_run(tmp_path: Path, name: str = "run", **sections) -> RunConfig:
    d = {"run_dir": str(tmp_path / name),
         "model": {"preset": "tiny", "num_hidden_layers": 2, "vocab_size": 384},
         "data": {"sources": [CORPUS], "cache_dir": str(tmp_path.parent / "data-cache"), "seq_len": 32,
                  "val_fraction": 0.2, "fim_rate": 0.5},
         "optim": {"lr": 3e-3, "warmup": 0.1},
         "train": {"steps": 12, "batch_size": 4, "micro_batch_size": 2, "batch_size_start": 2, "batch_ramp": 0.25,
                   "device": "cpu", "dtype": "fp32"},     # the CPU semantics, also on a GPU machine
         "log": {"interval": 1, "val_interval": 4, "val_batches": 2, "tensorboard": False, "progress": False},
         "checkpoint": {"interval": 4, "keep": 0}}
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return RunConfig.from_dict(d)


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, kind="train")}


def dsv3_cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from dsv3.cli import main; sys.exit(main())", *args]


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run_bitwise(tmp_path):
    (tmp_path / "run.json").write_text(jsonlib.dumps(small_run(tmp_path).to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    base = dsv3_cli("train", "--config", str(tmp_path / "run.json"), "--quiet")

    full = tmp_path / "full"
    subprocess.run(base + [f"run_dir={jsonlib.dumps(str(full))}"], check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(base + [f"run_dir={jsonlib.dumps(str(killed))}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(train_losses(killed)) >= 6 if (killed / "metrics.jsonl").exists() else False:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = latest_checkpoint(killed)
    assert last is not None and last.name != "step_00000012", "the kill must land mid-run, after a checkpoint"
    subprocess.run(base + [f"run_dir={jsonlib.dumps(str(killed))}", "--resume"], check=True, env=env,
                   capture_output=True)
    a, b = train_losses(full), train_losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a == b                                                          # bitwise: floats compared exactly
    va = [r["val_loss"] for r in read_metrics(full, kind="val")]
    vb = [r["val_loss"] for r in read_metrics(killed, kind="val")]
    assert va == vb and len(va) == 3


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    grads = []
    for micro in (4, 2, 1):
        t = Trainer(small_run(tmp_path, f"acc{micro}", train={"micro_batch_size": micro, "batch_size_start": 0},
                              balance={"seq_aux_alpha": 0.0}))
        t.optimizer.step = lambda: grads.append(torch.cat([p.grad.flatten() for p in t.model.parameters()]))
        t.train_step()
        t.logger.close()
    scale = grads[0].abs().max().item()
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(grads[2], grads[0], rtol=0, atol=1e-5 * scale)


def test_loads_are_summed_over_micro_batches_and_steer_the_bias(tmp_path):
    cfg = small_run(tmp_path, "bias", train={"batch_size_start": 0}, balance={"bias_update_speed": 0.01})
    t = Trainer(cfg)
    k, T, B = cfg.model.num_experts_per_tok, cfg.data.seq_len, cfg.train.batch_size
    _, loads = t.train_step()
    names = [n for n, _ in t.layers]
    assert names == ["layers.1", "mtp.0"]
    assert loads[0].sum().item() == B * T * k                         # every token of both micro-batches, k each
    assert loads[1].sum().item() == B * (T - 1) * k                   # the MTP module sees T-1 positions
    bias = t.layers[0][1].gate.e_score_correction_bias
    expected = 0.01 * torch.sign(loads[0].double().mean() - loads[0].double())
    torch.testing.assert_close(bias.double(), expected, rtol=0, atol=1e-9)
    t.logger.close()
    frozen = Trainer(small_run(tmp_path, "frozen", balance={"bias_update_speed": 0.0}))
    frozen.train_step()
    assert all(m.gate.e_score_correction_bias.abs().max() == 0 for _, m in frozen.layers)
    frozen.logger.close()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    t = Trainer(small_run(tmp_path, "nan"))
    t.train_step()
    good = t.save()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with torch.no_grad():
        t.model.layers[0].input_layernorm.weight[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="non-finite.*step_00000001"):
        t.train_step()
    t.logger.close()
    assert latest_checkpoint(t.run_dir) == good
    after = t.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "input_layernorm" not in k)  # no update applied
    events = [r["message"] for r in read_metrics(t.run_dir, kind="event")]
    assert any("non-finite" in m for m in events)
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(small_run(tmp_path, "nan"))


def test_cpu_ema_is_the_exponential_average():
    model = torch.nn.Linear(3, 2)
    ema = CPUEma(model, decay=0.9)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update(model)
        for n, p in model.named_parameters():
            ref[n] = 0.9 * ref[n] + 0.1 * p.detach()
    for n, v in ema.state_dict().items():
        torch.testing.assert_close(v, ref[n])


def test_export_loads_in_dsv3_and_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs the optional `hf` extra (CI pins it)")
    cfg = small_run(tmp_path, "exp", train={"steps": 3, "ema_decay": 0.5}, log={"val_interval": 0})
    t = Trainer(cfg)
    summary = t.run()
    assert summary["step"] == 3 and math.isfinite(t.loss_ema)
    out = export_run(t.run_dir, tmp_path / "hf")
    ours = load_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = t.model.eval()(ids)
        torch.testing.assert_close(ours(ids), ref)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        torch.testing.assert_close(hf(ids).logits, ref, rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("def f(x):", add_special_tokens=False)["input_ids"] == t.tokenizer.encode("def f(x):")
    ema = export_run(t.run_dir, tmp_path / "hf-ema", ema=True)
    assert not torch.equal(load_pretrained(ema).lm_head.weight, ours.lm_head.weight)


def test_cli_generate_plot_and_export(tmp_path, capsys):
    from dsv3.cli import main
    t = Trainer(small_run(tmp_path, "cli", train={"steps": 2}))
    t.run()
    assert main(["export", str(t.run_dir), str(tmp_path / "hf")]) == 0
    for model in (tmp_path / "hf", t.run_dir):                        # an exported directory or a run directory
        capsys.readouterr()
        assert main(["generate", "--model", str(model), "--prompt", "def f(x):", "--max-tokens", "5",
                     "--temperature", "0"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("def f(x):")
    assert main(["generate", "--model", str(model), "--prompt", "x", "--max-tokens", "99999"]) == 2
    assert "exceed the model's context" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--sources", CORPUS, "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").exists() and (tmp_path / "tok" / "tokenizer_config.json").exists()
    assert main(["plot", str(t.run_dir)]) == 0
    assert {p.name for p in (t.run_dir / "plots").iterdir()} >= {"loss.png", "lr.png", "maxvio.png"}


def test_cli_train_errors_are_clear(tmp_path):
    r = subprocess.run(dsv3_cli("train", "train.stepz=3", "--quiet"), capture_output=True, text=True)
    assert r.returncode == 2 and "unknown keys ['stepz']" in r.stderr
    r = subprocess.run(dsv3_cli("train", "--resume", "--run-dir", str(tmp_path / "none")), capture_output=True,
                       text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_a_resume_on_an_edited_corpus_is_refused_before_training(tmp_path):
    # an edited corpus builds new shards (the cache keys on the sources' files); the checkpoint's loader position
    # (document, offset) was applied to them and, where it still fit, training went on over other data without a word
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(150)) for i in range(6)]
    for i, t in enumerate(texts):
        (corpus / f"d{i}.txt").write_text(t)
    cfg = small_run(tmp_path, data={"sources": [str(corpus)], "val_fraction": 0.0, "fim_rate": 0.0},
                    train={"steps": 4}, log={"val_batches": 0}, checkpoint={"interval": 2}).to_dict()
    (tmp_path / "run.json").write_text(jsonlib.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    train = dsv3_cli("train", "--config", str(tmp_path / "run.json"), "--quiet", "train.steps=2")
    subprocess.run(train, check=True, env=env, capture_output=True)
    run_dir = Path(cfg["run_dir"])
    resume = dsv3_cli("train", "--resume", "--run-dir", str(run_dir), "--quiet", "train.steps=4")
    (corpus / "d3.txt").write_text(texts[3].replace("w1 ", "w2 "))    # as many documents, none shorter
    r = subprocess.run(resume, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "loader state was saved on other 'train' shards" in r.stderr, r.stderr
    assert "restore the corpus" in r.stderr and "train.init_from" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and sorted(train_losses(run_dir)) == [1, 2]  # no step ran
    # nor did the refused resume leave its overrides in the run's config.json for the next plain --resume
    assert jsonlib.loads((run_dir / "config.json").read_text())["train"]["steps"] == 2
    # the corpus as it was (its content, whatever the files' times): the run goes on
    (corpus / "d3.txt").write_text(texts[3])
    subprocess.run(resume, check=True, env=env, capture_output=True)
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]


def test_a_loader_state_without_the_shards_identity_loads_as_before(tmp_path):
    from test_data import EOS, make_shards, random_docs
    from dsv3.data import PackedLoader
    ss = make_shards(tmp_path, random_docs(5, code=None))
    loader = PackedLoader(ss, "train", 7, eos_id=EOS, seed=1)
    for _ in range(3):
        loader.next_batch(2)
    state = loader.state_dict()
    old = {k: v for k, v in state.items() if k != "shards"}   # a checkpoint from before the identity was recorded
    expect = loader.next_batch(2)
    for s in (state, old):
        fresh = PackedLoader(ss, "train", 7, eos_id=EOS, seed=1)
        fresh.load_state_dict(s)
        assert torch.equal(fresh.next_batch(2), expect)
    with pytest.raises(ValueError, match="loader state was saved on other 'train' shards"):
        fresh.load_state_dict(state | {"shards": "0123456789abcdef"})
