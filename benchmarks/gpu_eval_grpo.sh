#!/usr/bin/env bash
# Issues 19 and 18 on one H200 (torch 2.11, no network, no Hub), in ONE device call; logs and JSON under $OUT
# (6 files: stages.txt gpu.txt eval_throughput.{log,json} grpo_gpu.{log,json}); generated task files and run
# directories go to /tmp. Random bf16 weights (throughput, not accuracy); the tokenizer is a real byte-level BPE
# (512 ids) trained offline on the standard library in stage 1 and shared by both stages.
#   1. `dsv3 eval` throughput on `lite` (benchmarks/eval_throughput.py: run.evaluate_mc / evaluate_generation over
#      EngineBackend, engine as `dsv3 eval` builds it): mc 0-shot on 240 four-way questions, 5-shot on 120 of
#      them, gen on 64 arithmetic questions (k=1 greedy, 64 new tokens); questions/s, tokens/s, wall times; a mode
#      that would start after 95 s is skipped (the JSON is rewritten after every mode).               ~2-3 min
#   2. GRPO on a lite-8L-shaped policy (benchmarks/grpo_gpu.py: configs/grpo.toml + overrides, GRPOTrainer.train_step):
#      8 prompts x G=8 rollouts of 64 tokens a step, bf16-params + bf16 AdamW moments (as configs/lite-8L.toml),
#      1 warm-up + 3 timed steps; steps/hour and the rollout / train / optimizer split.                    ~1-1.5 min
# Each stage has its own timeout (185 + 105 s); expected total under 5 min. The tail of stdout is a summary table.
# Usage (repo root):   bash benchmarks/gpu_eval_grpo.sh
# CPU dry run (tiny config, a few questions / steps, the same code): DRY_RUN=1 bash benchmarks/gpu_eval_grpo.sh
# Knobs: PYTHON (default python), MC_FEWSHOT (default 0,5), GRPO_ARGS (extra grpo_gpu.py flags, e.g. --compile).
set -u
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OUT=${OUT:-out/gpu_eval_grpo}
PY=${PYTHON:-python}
mkdir -p "$OUT"
TOK=$(mktemp -d /tmp/dsv3-bench-tokenizer-XXXXXX)
start=$(date +%s)
stamp() { echo "[gpu_eval_grpo $(( $(date +%s) - start )) s] $*" | tee -a "$OUT/stages.txt"; }
if [ "${DRY_RUN:-0}" = 1 ]; then
  EVAL=(--config tiny --device cpu --mc 12 --mc-fewshot "${MC_FEWSHOT:-0,1}" --gen 4 --max-tokens 8)
  GRPO=(--config tiny --device cpu --dtype fp32 --state-dtype fp32 --prompts 2 --group 4 --max-new-tokens 8
        --micro 8 --steps 2)
  T_EVAL=600 T_GRPO=400
else
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  EVAL=(--config lite --mc 240 --mc-fewshot "${MC_FEWSHOT:-0,5}" --gen 64 --max-tokens 64 --deadline-s 95)
  GRPO=(--config lite-8L --prompts 8 --group 8 --max-new-tokens 64 --micro 64 --warmup 1 --steps 3 --deadline-s 80)
  T_EVAL=185 T_GRPO=105
fi

stamp "1. dsv3 eval throughput (${EVAL[*]})"
timeout "$T_EVAL" "$PY" benchmarks/eval_throughput.py "${EVAL[@]}" --tokenizer-dir "$TOK" \
  --json "$OUT/eval_throughput.json" > "$OUT/eval_throughput.log" 2>&1
stamp "   exit $?"
grep -v "Warning" "$OUT/eval_throughput.log" | grep "^\[eval_throughput\]\|Error\|error:" | tail -12

stamp "2. GRPO steps (${GRPO[*]} ${GRPO_ARGS:-})"
# shellcheck disable=SC2086
timeout "$T_GRPO" "$PY" benchmarks/grpo_gpu.py "${GRPO[@]}" ${GRPO_ARGS:-} --tokenizer-dir "$TOK" \
  --json "$OUT/grpo_gpu.json" > "$OUT/grpo_gpu.log" 2>&1
stamp "   exit $?"
grep -v "Warning" "$OUT/grpo_gpu.log" | grep "^\[grpo_gpu\]\|Error\|error:" | tail -8
rm -rf "$TOK"
stamp "done"

"$PY" - <<'PY'
import json, os
out = os.environ["OUT"]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError) as e:
        print(f"{name}: missing ({e.__class__.__name__}); see the .log beside it")
e, g = load("eval_throughput.json"), load("grpo_gpu.json")
if e:
    print(f"\n== issue 19: dsv3 eval on {e['config']} ({e['params_b']:.1f} B, {e['dtype']}, "
          f"{e['gpu'] or e['device']}), "
          f"engine max_num_seqs={e['engine']['max_num_seqs']} max_num_batched_tokens="
          f"{e['engine']['max_num_batched_tokens']}, tokenizer {e['tokenizer_vocab']} ids, add_bos={e['add_bos']}")
    print(f"{'mode':<32} {'n':>4} {'wall s':>7} {'q/s':>8} {'prompt tok/s':>12} {'new tok/s':>9} {'warm s':>7} err")
    for r in e["rows"]:
        print(f"{r['mode']:<32} {r['questions']:>4} {r['wall_s']:>7.2f} {r['questions_per_s']:>8.2f} "
              f"{r['prompt_tok_per_s']:>12.0f} {r['new_tok_per_s']:>9.0f} {r['warmup_s']:>7.1f} {r['errors']}")
    for name in e.get("skipped", []):
        print(f"{name:<32} skipped (deadline)")
if g:
    print(f"\n== issue 18: GRPO on {g['config']} ({g['params_b']:.2f} B, {g['active_b']:.2f} B active; "
          f"{g['gpu'] or g['device']}), "
          f"{g['prompts_per_step']} prompts x G={g['group_size']} = {g['rollouts_per_step']} rollouts of "
          f"{g['max_new_tokens']} tokens/step, micro-batch {g['micro_batch_size']}, train.dtype={g['train_dtype']}, "
          f"moments {g['state_dtype']}, compile={g['compile']}, setup {g['setup_s']:.0f} s, peak "
          f"{g.get('peak_gib') or 0:.1f} GiB")
    for s in g["steps"]:
        print(f"  step {s['step']}{' (warm-up)' if s['warmup'] else '          '} {s['step_s']:7.2f} s = rollout "
              f"{s['rollout_s']:.2f} + train {s['train_s']:.2f} + optimizer/other {s['other_s']:.2f}")
    if "mean" in g:
        m = g["mean"]
        print(f"  {g['timed_steps']} timed steps: {g['steps_per_hour']:.0f} steps/hour, {m['step_s']:.2f} s/step: "
              f"rollout {100 * g['rollout_share']:.0f}%, train {100 * g['train_share']:.0f}%, "
              f"optimizer/other {100 * m['other_s'] / m['step_s']:.0f}%; rollout {g['rollout_tok_per_s']:.0f} "
              f"new tok/s")
PY
