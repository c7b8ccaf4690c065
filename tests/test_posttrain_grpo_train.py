"""`dsv3 grpo` (dsv3.posttrain.grpo): the engine's sampled-token log-probs equal the trainer's (fp32: to 1e-5), also
after an in-process weight sync (stale prefix-cache latents would break it); one GRPO step raises the log-prob of
the positive-advantage samples and lowers the negative ones'; beta = 0 builds no reference; resume is exact."""

import copy
import json
import shutil

import pytest
import torch

from dsv3.config import ConfigError
from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.posttrain.base import load_model_and_tokenizer
from dsv3.posttrain.grpo import grpo_trainer
from dsv3.posttrain.grpo_loss import sequence_logprobs
from dsv3.train.metrics import read_metrics
from posttrain_fixture import make_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("grpo") / "base", seed=1)


def trainer_logprobs(model, prompt, outs):
    rows = [prompt + o.token_ids for o in outs]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    resp = torch.zeros(len(rows), T, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        resp[r, len(prompt):len(row)] = True
    with torch.no_grad():
        lp = sequence_logprobs(model, ids, resp)
    return [lp[r, len(prompt):len(row)].tolist() for r, row in enumerate(rows)]


def check_engine_matches(engine, model, prompt):
    params = [SamplingParams(temperature=1.0, max_tokens=10, seed=s, logprobs=0) for s in range(4)]
    outs = engine.generate([prompt] * 4, params)
    want = trainer_logprobs(model, prompt, outs)
    for o, w in zip(outs, want):
        got = [lp[0] for lp in o.logprobs]
        assert torch.allclose(torch.tensor(got), torch.tensor(w), atol=1e-5, rtol=0), (got, w)


def test_engine_logprobs_equal_the_trainers_also_after_a_weight_sync(base):
    model, tok = load_model_and_tokenizer(base)
    prompt = tok.encode("What is 12 + 30? The answer is")       # > 2 blocks of 4: prefix-cached
    shared = Engine(model, tok, EngineConfig(block_size=4, num_blocks=64, cuda_graphs=False))
    separate = Engine(copy.deepcopy(model), tok, EngineConfig(block_size=4, num_blocks=64, cuda_graphs=False))
    check_engine_matches(shared, model, prompt)
    check_engine_matches(separate, model, prompt)
    with torch.no_grad():                     # an update of the trainer's weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    shared.load_weights()                     # the same tensors: only the prefix cache goes
    separate.load_weights(model)              # a copy: weights copied in place
    hits = shared.blocks.prefix_hits
    check_engine_matches(shared, model, prompt)
    check_engine_matches(separate, model, prompt)
    assert shared.blocks.prefix_hits == hits  # no latent of the old weights was reused ...
    check_engine_matches(shared, model, prompt)
    assert shared.blocks.prefix_hits > hits   # ... though the prompt's blocks are reused without a sync


class LengthMod3:
    """A model-based reward stand-in (the RewardModel hook): any scores that differ within groups."""

    def __call__(self, prompts, responses):
        return [float(len(r) % 3) for r in responses]


def run_file(tmp, base, name, **grpo):
    d = {"run_dir": str(tmp / name),
         "grpo": {"init": str(base), "train_prompts": 40, "prompts_per_step": 2, "group_size": 4,
                  "max_new_tokens": 8, "overlong_filter": False, "correct_weight": 0.0, "format_weight": 0.0,
                  **grpo},
         "optim": {"lr": 3e-3}, "train": {"steps": 4, "micro_batch_size": 4, "device": "cpu", "dtype": "fp32"},
         "log": {"interval": 1, "tensorboard": False, "progress": False}, "checkpoint": {"interval": 2, "keep": 0}}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(d))
    return path


def test_one_step_raises_the_logprob_of_positive_advantage_samples(base, tmp_path):
    t = grpo_trainer(run_file(tmp_path, base, "one", scale_std=False), [], reward_model=LengthMod3())
    assert t.reference is None                       # beta = 0: no reference model
    t.train_step()
    ro = t.rollouts
    with torch.no_grad():
        after = sequence_logprobs(t.model, ro.ids, ro.response)
    change = ((after - ro.engine_logp) * ro.response).sum(1)    # engine_logp = the policy's before the step
    pos, neg = ro.advantages > 0, ro.advantages < 0
    assert pos.any() and neg.any()
    assert change[pos].mean() > 0 > change[neg].mean(), (change, ro.advantages)
    t.logger.close()


def test_beta_builds_a_frozen_reference_and_logs_kl(base, tmp_path):
    t = grpo_trainer(run_file(tmp_path, base, "kl", beta=0.1, updates_per_batch=2), [], reward_model=LengthMod3())
    assert t.reference is not None and not any(p.requires_grad for p in t.reference.parameters())
    t.run()
    recs = read_metrics(t.run_dir, kind="train")
    assert all(k in recs[-1] for k in ("reward", "kl", "clip_fraction", "entropy", "response_length",
                                       "zero_std_groups", "rollout_s", "train_s"))
    assert recs[-1]["kl"] > 0          # after updates the policy left the reference


@pytest.mark.parametrize("dtype", ["bf16-params", "fp32"])
def test_the_reference_has_the_policys_dtype_and_values(base, tmp_path, monkeypatch, dtype):
    """The reference is built as the policy is (bf16 with bf16-params, the routing bias fp32) and equals it before
    any update, so the KL starts at 0 (an fp32 reference beside a bf16 policy did not, at twice the memory); from a
    Hugging Face base it is read tensor by tensor, never loaded whole in fp32 on the host."""
    path = run_file(tmp_path, base, "ref", beta=0.1)
    d = json.loads(path.read_text())
    d["train"]["dtype"] = dtype
    path.write_text(json.dumps(d))
    want = dict(load_model_and_tokenizer(base)[0].named_parameters())       # independent: the whole fp32 load
    monkeypatch.setattr("dsv3.checkpoint.load_pretrained", lambda *a, **k: pytest.fail("loaded whole"))
    t = grpo_trainer(path, [], reward_model=LengthMod3())
    ref, pol = dict(t.reference.named_parameters()), dict(t.model.named_parameters())
    assert ref.keys() == pol.keys() == want.keys()
    for k, p in pol.items():
        assert ref[k].dtype == p.dtype and torch.equal(ref[k], p), k
        assert torch.equal(ref[k], want[k].to(ref[k].dtype)), k
    assert {p.dtype for p in ref.values()} == {torch.bfloat16 if dtype == "bf16-params" else torch.float32}
    biases = [b for k, b in t.reference.named_buffers() if k.endswith("correction_bias")]
    assert biases and all(b.dtype == torch.float32 for b in biases)
    t.logger.close()


def test_resume_is_exact(base, tmp_path):
    t = grpo_trainer(run_file(tmp_path, base, "full"), [], reward_model=LengthMod3())
    t.run()
    resumed = tmp_path / "resumed"
    shutil.copytree(t.run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    r = grpo_trainer(None, [], resume=True, run_dir=str(resumed), reward_model=LengthMod3())
    r.run()
    losses = lambda run: {m["step"]: (m["loss"], m["reward"]) for m in read_metrics(run, kind="train")}  # noqa
    assert losses(resumed) == losses(t.run_dir)
    from safetensors.torch import load_file
    a = load_file(str(t.run_dir / "checkpoints" / "step_00000004" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override,match", [
    ('grpo.aggregation="mean"', "grpo.aggregation='mean'"), ("grpo.group_size=1", "grpo.group_size=1"),
    ('grpo.ops="/"', "grpo.ops='/'"), ("grpo.max_new_tokens=600", "exceed the model's context"),
    ("train.micro_batch_size=3", "train.batch_size=8 is not a multiple of train.micro_batch_size=3"),
    ("train.cuda_graphs=true", "train.cuda_graphs is for dsv3 train and distill, not GRPO's rollouts")])
def test_config_errors_name_the_key(base, tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        grpo_trainer(run_file(tmp_path, base, "bad"), [override])


def test_torchrun_is_refused_before_anything_is_written(base, tmp_path, monkeypatch):
    """GRPO's step is not split over ranks (no batch shard, no gradient sync): under torchrun every rank would train
    on the whole batch, expert-parallel ranks counting each token's expert gradient once per rank. Refused in one
    line naming the command, before the run directory is written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = run_file(tmp_path, base, "ranks")
    with pytest.raises(ConfigError, match="dsv3 grpo runs in one process"):
        grpo_trainer(path, [])
    assert not (tmp_path / "ranks").exists()


def test_a_resume_keeps_the_kl_reference_of_the_start_when_the_base_run_moved_on(base, tmp_path, monkeypatch):
    """grpo.init a training run: the reference is the checkpoint the run started from. A resume read the base run's
    latest checkpoint again, so once the base had trained on (an SFT run continued) the resumed run's KL pulled
    towards another policy than the uninterrupted run's; and grpo.init could be changed on resume outright. The
    pinned checkpoint is the only one read (not the latest, then the pinned one)."""
    from dsv3.posttrain import grpo
    from dsv3.train import Trainer
    from test_train_loop import small_run
    sections = dict(train={"steps": 2}, checkpoint={"interval": 2, "keep": 0}, log={"val_interval": 0})
    Trainer(small_run(tmp_path, "sft", **sections)).run()
    t = grpo_trainer(run_file(tmp_path, tmp_path / "sft", "full", beta=0.5), [], reward_model=LengthMod3())
    t.run()
    resumed = tmp_path / "resumed"
    shutil.copytree(t.run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    Trainer(small_run(tmp_path, "sft", **{**sections, "train": {"steps": 4}}), resume=True).run()   # base moves on
    with pytest.raises(ConfigError, match=r"--resume cannot change grpo.init=.*sft' -> .*base'.*KL reference"):
        grpo_trainer(None, [f'grpo.init="{base}"'], resume=True, run_dir=str(resumed), reward_model=LengthMod3())
    steps, load_base = [], grpo.load_base

    def counted(*a, step=None, **k):
        steps.append(step)
        return load_base(*a, step=step, **k)
    monkeypatch.setattr(grpo, "load_base", counted)
    r = grpo_trainer(None, [], resume=True, run_dir=str(resumed), reward_model=LengthMod3())
    assert r.base_checkpoint.name == "step_00000002" and steps == [2]
    assert r.pins["reference"] == t.pins["reference"]
    r.run()
    kl = lambda run: {m["step"]: (m["loss"], m["kl"]) for m in read_metrics(run, kind="train")}  # noqa: E731
    assert kl(resumed) == kl(t.run_dir)


def test_a_resume_refuses_a_hugging_face_grpo_init_rewritten_in_place(base, tmp_path):
    """grpo.init a Hugging Face directory, rewritten in place (another model saved there) between the start and the
    resume: the resumed run's KL reference was the new model, without a word."""
    init = tmp_path / "init"
    shutil.copytree(base, init)
    t = grpo_trainer(run_file(tmp_path, init, "hf", beta=0.5), ["train.steps=2"], reward_model=LengthMod3())
    t.run()
    t.run_lock.close()
    shutil.rmtree(init)                      # another model saved there, the same way
    make_base(init, seed=7)
    with pytest.raises(ConfigError, match=f"grpo.init='{init}' changed since the run started"):
        grpo_trainer(None, [], resume=True, run_dir=str(t.run_dir), reward_model=LengthMod3())
