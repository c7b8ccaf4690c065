"""The fast sibling of benchmarks/eval_crosscheck.py (issue 19's cross-check; that script runs it on a trained tiny
model over 240 questions, numbers in benchmarks/RESULTS.md). Here: a random tiny model (float64) saved as a Hugging
Face directory, the first 24 of the shipped stdlib questions, the prompt written for lm-eval by `lm_eval_yaml`, and
five scorings of every choice:
  hf       lm-eval's `hf` backend: transformers' DeepseekV3 on the directory, BOS from the tokenizer (add_bos_token)
  lc+bos   lm-eval's `local-completions` against `dsv3 serve` with add_bos_token=True (the README's command)
  lc       the same without it (lm-eval's default: no BOS)
  dsv3     score_mc on a local engine, BOS as the tokenizer says (what `dsv3 eval mc` does)
  server   score_mc through the same server (OpenAIBackend)
hf, lc+bos, dsv3 and server agree per choice to 1e-4 (fp32 rounding of sums near -150 nats: the engine reports fp32
log-probabilities, transformers runs in fp32), so their acc and acc_norm are equal; lc equals dsv3 without BOS and
differs from hf."""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval  # noqa: F401  (pinned in requirements-ci.txt)
import pytest
from serve_fixture import start_server

from dsv3 import save_pretrained
from dsv3.eval import EngineBackend, OpenAIBackend, read_mc, score_mc
from dsv3.eval.multiple_choice import lm_eval_yaml

TASK = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "stdlib_mc.jsonl"
TOL = 1e-4      # sums of ~25 log-probs of ~-6 each: transformers runs in fp32 (its grouped MoE GEMM has no fp64)


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:       # read by datasets at import: set before lm_eval imports it
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(k, "1")
        import datasets.config
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        yield


def lm_eval_lls(model: str, model_args: str, task_dir: Path, name: str) -> tuple[dict, list[list[float]]]:
    import lm_eval.tasks
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[name], batch_size=4,
                                  task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir),
                                                                         include_defaults=False),
                                  log_samples=True, bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
                                  torch_random_seed=None)
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return out["results"][name], [[r[0] for r in s["filtered_resps"]] for s in samples]


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for p, q in zip(a, b) for x, y in zip(p, q))


def test_lm_eval_hf_local_completions_and_dsv3_eval_agree(offline, tmp_path):
    srv = start_server()
    try:
        tok, hf_dir = srv.tokenizer, tmp_path / "hf"
        save_pretrained(srv.reference.model, hf_dir)
        tok.save(hf_dir)
        assert json.loads((hf_dir / "tokenizer_config.json").read_text())["add_bos_token"]
        task = tmp_path / "mc24.jsonl"
        task.write_text("".join(TASK.read_text().splitlines(keepends=True)[:24]))
        (tmp_path / "tasks").mkdir()
        (tmp_path / "tasks" / "mc24.yaml").write_text(lm_eval_yaml("mc24", task, "text", tmp_path / "cache"))
        qs = read_mc(task)

        hf_res, hf = lm_eval_lls("hf", f"pretrained={hf_dir},dtype=float32,device=cpu", tmp_path / "tasks", "mc24")
        lc_args = (f"base_url={srv.url}/v1/completions,model=dsv3-tiny,tokenized_requests=True,"
                   f"tokenizer_backend=huggingface,tokenizer={hf_dir},num_concurrent=1,max_retries=1")
        bos_res, lc_bos = lm_eval_lls("local-completions", lc_args + ",add_bos_token=True", tmp_path / "tasks", "mc24")
        _, lc = lm_eval_lls("local-completions", lc_args, tmp_path / "tasks", "mc24")
        ours, ours_recs = score_mc(EngineBackend(srv.reference), tok, qs, add_bos=True, continuation="text")
        remote, remote_recs = score_mc(OpenAIBackend(srv.url, "dsv3-tiny"), tok, qs, add_bos=True,
                                       continuation="text")
        _, nobos_recs = score_mc(EngineBackend(srv.reference), tok, qs, add_bos=False, continuation="text")
    finally:
        srv.stop()
    dsv3 = [r["loglikelihoods"] for r in ours_recs]
    assert max_diff(dsv3, hf) < TOL and max_diff(lc_bos, hf) < TOL
    assert max_diff([r["loglikelihoods"] for r in remote_recs], hf) < TOL
    assert max_diff(lc, [r["loglikelihoods"] for r in nobos_recs]) < TOL
    bos_effect = max_diff(lc, hf)
    assert bos_effect > 1e-3, bos_effect          # without BOS the numbers are another model's
    for res in (hf_res, bos_res):
        assert res["acc,none"] == ours["acc"] == remote["acc"]
        assert res["acc_norm,none"] == ours["acc_norm"] == remote["acc_norm"]
    print(f"\nper-choice |ll - hf|: dsv3 {max_diff(dsv3, hf):.1e}, lc+bos {max_diff(lc_bos, hf):.1e}, "
          f"lc (no BOS) {bos_effect:.3f} nats; acc {ours['acc']:.3f}, acc_norm {ours['acc_norm']:.3f}")
