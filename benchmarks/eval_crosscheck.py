"""Cross-check `dsv3 eval mc` against lm-evaluation-harness on one trained tiny model (issue 19's acceptance).

Five scorings of the same multiple-choice task (default benchmarks/data/stdlib_mc.jsonl: 240 four-way questions,
made by `make_task` from the CPython standard library's source, which the tiny model is trained on):
  hf          lm-eval's `hf` backend on the exported HF directory (transformers' DeepseekV3, its own forward)
  lc          lm-eval's `local-completions` against `dsv3 serve`, as lm-eval runs it by default (no BOS)
  lc+bos      the same with `add_bos_token=True` (the README's command)
  dsv3        `dsv3 eval mc` on the local engine (BOS as the tokenizer's add_bos_token says: yes)
  dsv3-server `dsv3 eval mc --server` against the same `dsv3 serve`
The prompt is the same for all: dsv3's MMLU layout (mc_prompt) written as an lm-eval YAML (doc_to_text builds the
same string; continuations " <choice>"). Per choice it compares log-likelihoods with hf's, and the accuracies.

    python benchmarks/eval_crosscheck.py --run-dir /tmp/tiny       # trains one first when the run dir is empty
    python benchmarks/eval_crosscheck.py --run-dir runs/tiny --json out/crosscheck.json

Training (when asked): `dsv3 train --config configs/tiny.toml train.steps=300` (~6 min on 2 busy CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from dsv3.eval.multiple_choice import lm_eval_yaml  # noqa: E402
TASK = ROOT / "benchmarks" / "data" / "stdlib_mc.jsonl"


def make_task(path: Path, n: int = 240, seed: int = 0) -> None:
    """n questions: the first half of a stdlib source line; choices: its real second half and three others'."""
    rng = random.Random(seed)
    lib = Path(sysconfig.get_paths()["stdlib"])
    lines = []
    for f in sorted(lib.glob("*.py"))[:120]:
        for line in f.read_text(errors="replace").splitlines():
            s = line.strip()
            if 40 <= len(s) <= 90 and s.isascii() and not s.startswith(("#", '"', "'")) and " " in s[15:-10]:
                lines.append(s)
    rng.shuffle(lines)
    def split(s: str) -> tuple[str, str]:        # at the first space past the middle
        cut = s.find(" ", len(s) // 2 - 5)
        return s[:cut], s[cut:].strip()
    rows, seen = [], set()
    for s in lines:
        head, tail = split(s)
        if head in seen or not tail:
            continue
        seen.add(head)
        others = [t for t in rng.sample(lines, 8) if t != s]
        choices = [tail] + [split(o)[1] for o in others[:3]]
        if len(set(choices)) < 4:
            continue
        rng.shuffle(choices)
        rows.append(dict(question=f"Complete the line: {head}", choices=choices, answer=choices.index(tail)))
        if len(rows) == n:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def dsv3(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "dsv3.cli", *args], env=env, check=True, **kw)


def lm_eval_run(model: str, model_args: str, task_dir: Path, name: str) -> tuple[float, float, list[list[float]]]:
    import lm_eval
    import lm_eval.tasks
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[name], batch_size=8,
                                  task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir),
                                                                         include_defaults=False),
                                  log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    res = out["results"][name]
    return res["acc,none"], res["acc_norm,none"], [[r[0] for r in s["filtered_resps"]] for s in samples]


def dsv3_eval(args: list[str], out: Path, name: str) -> tuple[float, float, list[list[float]]]:
    dsv3("eval", "mc", "--continuation", "text", "--overwrite", "--out", str(out), *args, stdout=subprocess.DEVNULL)
    res = json.loads((out / "results.json").read_text())[name]["metrics"]
    recs = [json.loads(line) for line in (out / f"samples_{name}.jsonl").read_text().splitlines()]
    return res["acc"], res["acc_norm"], [r["loglikelihoods"] for r in recs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(hf: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "dsv3.cli", "serve", "--model", str(hf), "--port", str(port),
                             "--served-model-name", "tiny", "--dtype", "float32", "--threads", "1",
                             "--block-size", "16"], env=env)
    import httpx
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("dsv3 serve exited")
        time.sleep(0.5)
    raise RuntimeError("dsv3 serve did not come up")


def compare(runs: dict, ref: str = "hf") -> dict:
    """Per run: accuracies, the largest per-choice |log-likelihood - ref's|, and how many predictions differ."""
    out = {}
    for name, (acc, acc_norm, lls) in runs.items():
        diffs = [abs(a - b) for q, r in zip(lls, runs[ref][2]) for a, b in zip(q, r)]
        preds = [max(range(len(q)), key=lambda i: (q[i], -i)) for q in lls]
        ref_preds = [max(range(len(q)), key=lambda i: (q[i], -i)) for q in runs[ref][2]]
        out[name] = dict(acc=acc, acc_norm=acc_norm, max_abs_ll_diff_vs_hf=max(diffs),
                         mean_abs_ll_diff_vs_hf=sum(diffs) / len(diffs),
                         predictions_differing_from_hf=sum(p != q for p, q in zip(preds, ref_preds)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="a trained tiny run (trained here when it has no checkpoint)")
    p.add_argument("--steps", type=int, default=300, help="training steps when training")
    p.add_argument("--task", default=str(TASK))
    p.add_argument("--work", default=None, help="scratch directory (default: RUN_DIR/crosscheck)")
    p.add_argument("--json", default=None, help="write the comparison here")
    args = p.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run, task = Path(args.run_dir), Path(args.task)
    if not task.exists():
        make_task(task)
    if not any((run / "checkpoints").glob("step_*")):
        dsv3("train", "--config", str(ROOT / "configs" / "tiny.toml"), f"train.steps={args.steps}",
             "checkpoint.interval=100", "--run-dir", str(run), "--quiet")
    work = Path(args.work or run / "crosscheck")
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf"
    dsv3("export", str(run), str(hf), "--overwrite")
    name = task.stem
    (work / "tasks").mkdir(exist_ok=True)
    (work / "tasks" / f"{name}.yaml").write_text(lm_eval_yaml(name, task, "text", work / "hf_datasets"))
    runs = {"hf": lm_eval_run("hf", f"pretrained={hf},dtype=float32,device=cpu", work / "tasks", name),
            "dsv3": dsv3_eval(["--task", str(task), "--model", str(hf), "--dtype", "float32", "--device", "cpu"],
                              work / "eval_local", name)}
    port = free_port()
    server = serve(hf, port)
    try:
        lc = (f"base_url=http://127.0.0.1:{port}/v1/completions,model=tiny,tokenized_requests=True,"
              f"tokenizer_backend=huggingface,tokenizer={hf},num_concurrent=1,max_retries=1")
        runs["lc"] = lm_eval_run("local-completions", lc, work / "tasks", name)
        runs["lc+bos"] = lm_eval_run("local-completions", lc + ",add_bos_token=True", work / "tasks", name)
        runs["dsv3-server"] = dsv3_eval(["--task", str(task), "--server", f"http://127.0.0.1:{port}",
                                         "--served-model-name", "tiny", "--tokenizer", str(hf)],
                                        work / "eval_server", name)
    finally:
        server.terminate()
        server.wait(60)
    table = compare(runs)
    n = len(runs["hf"][2])
    print(f"{name}: {n} questions, {sum(map(len, runs['hf'][2]))} choices")
    print(f"{'run':<12} {'acc':>7} {'acc_norm':>9} {'max|dll|':>10} {'mean|dll|':>10} {'preds != hf':>12}")
    for k, v in table.items():
        print(f"{k:<12} {v['acc']:>7.4f} {v['acc_norm']:>9.4f} {v['max_abs_ll_diff_vs_hf']:>10.2e} "
              f"{v['mean_abs_ll_diff_vs_hf']:>10.2e} {v['predictions_differing_from_hf']:>12d}")
    # the two scorings through the same server send the same token ids: their log-likelihoods should be identical
    same = max(abs(a - b) for q, r in zip(runs["dsv3-server"][2], runs["lc+bos"][2]) for a, b in zip(q, r))
    print(f"dsv3-server vs lc+bos: max |dll| = {same:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(task=str(task), n=n, runs=table,
                                                   server_vs_lc_bos_max_abs_ll_diff=same), indent=2) + "\n")


if __name__ == "__main__":
    main()
