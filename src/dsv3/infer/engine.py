"""The inference engine: `step()` = schedule -> run -> postprocess (nano-vllm's shape).

    engine = Engine(model, tokenizer, EngineConfig(...))
    outs = engine.generate(["def f(x):", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))
    rid = engine.add_request("import os", params); engine.step(); engine.abort(rid)      # for a server

Requests are validated when added (a bad one raises ValueError and nothing is queued, so the engine keeps
serving the others). Finish reasons: "stop" (EOS, a stop token or a stop string), "length" (max_tokens or the
context), "abort". The text leaves out what stopped it (a stop string, a stop token's own text); `token_ids` keep a
stop token.

With the overlap schedule (EngineConfig.overlap_schedule; on by default where decode replays CUDA graphs) a step's
sampled tokens are applied, and returned, by the next `step()`, after it has launched its own batch
(dsv3.infer.overlap); every caller sees the same outputs, each request's in the same order, one call later.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field

import torch

from ..model import Transformer
from .block_manager import BlockManager
from .cache import PagedLatentCache, bytes_per_block
from .config import EngineConfig
from .fused_proj import fuse_projections
from .graphs import graphs_supported
from .overlap import PENDING, InFlight, to_device
from .penalties import PenaltyState
from .requests import RequestLimits, check_request
from .runner import ModelRunner, Row
from .sampling import SamplingParams, SamplingTensors, compute_logprobs, make_generators, sample
from .scheduler import Scheduler
from .sequence import Sequence, Status
from .speculation import SpecInFlight, Speculation
from .stop_rules import StopRules
from .structured import GRAMMAR_ERROR, StructuredOutputs


def device_memory_free(device: torch.device) -> int | None:
    """Bytes a new allocation on `device` can have: CUDA's free memory plus what PyTorch's caching allocator holds
    unused; on the CPU the machine's physical memory (an upper bound); None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def check_cache_fits(config: EngineConfig, nbytes: int, device: torch.device) -> None:
    """Refuse a cache the device cannot hold, naming the setting, before allocating it: the allocation would
    otherwise fail deep inside torch (or, on an overcommitting host, get the process killed)."""
    free = device_memory_free(device)
    if free is not None and nbytes > free:
        name = (f"num_blocks = {config.num_blocks}" if config.num_blocks
                else f"cache_memory_gib = {config.cache_memory_gib}")
        raise ValueError(f"EngineConfig.{name} needs {nbytes / 2**30:.3g} GiB of latent cache; the {device.type} "
                         f"device has {free / 2**30:.3g} GiB")


def is_decode_row(seq: Sequence, n: int) -> bool:
    """Whether a step's n tokens of seq are a decode row: its last token, a generated one. A one-token chunk of a
    prompt (a small token budget's, or its leftover at the end of a step) has num_cached_tokens > 0 too, but is
    prefill; so is a recomputation (after preemption) that has not reached the last token."""
    return n == 1 and seq.num_uncomputed == 1 and seq.num_cached_tokens >= seq.num_prompt_tokens


@dataclass
class RequestOutput:
    """One request's progress after a step. The finished output is complete (`token_ids`, `text`, `logprobs`: the
    whole output, not the last step's part); an unfinished one carries only the step's delta (`new_token_ids`,
    `new_logprobs`, and `prompt_logprobs` in the first) and leaves the whole-output fields empty, `text` included:
    copying the whole output every step would be quadratic in its length. A stream's text is its caller's to decode
    from the deltas (dsv3.serve.responses.TextStream); the finished `text` is final, a stop string cut off."""
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str = ""                    # the whole output's text, in the finished output only ("" before)
    finished: bool = False
    finish_reason: str | None = None
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    new_logprobs: list = field(default_factory=list)    # the entries of `logprobs` for `new_token_ids`


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config = config or EngineConfig()
        cfg = model.config
        self.device = next(model.parameters()).device
        if config.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"EngineConfig.max_model_len = {config.max_model_len} exceeds the model's "
                             f"max_position_embeddings {cfg.max_position_embeddings}")
        if any(i >= cfg.vocab_size for i in config.eos_token_ids):
            raise ValueError(f"EngineConfig.eos_token_ids {config.eos_token_ids} reach past the model's vocabulary "
                             f"of {cfg.vocab_size}")
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        dtype = model.embed_tokens.weight.dtype
        self.speculative = config.num_speculative_tokens > 0
        if self.speculative and not len(model.mtp):
            raise ValueError("num_speculative_tokens > 0 needs a model with an MTP module (num_nextn_predict_layers)")
        n_layers = cfg.num_hidden_layers + self.speculative     # the MTP block keeps its own latents
        self.spec_stats = {"steps": 0, "proposed": 0, "accepted": 0}
        # steps that ran something: pure decode ones (every row a generated token, the sequence's last: graph
        # buckets), ones with prefill rows (eager, but for a budget's one-token chunks), and the sequences they
        # carried (a server's batches vs the offline engine's: dsv3.serve.bench); chained ones were launched before
        # the previous step's tokens were read (dsv3.infer.overlap)
        self.step_stats = {"steps": 0, "decode_steps": 0, "prefill_steps": 0, "seqs": 0, "chained_steps": 0}
        block_bytes = bytes_per_block(cfg, n_layers, config.block_size, dtype)
        num_blocks = config.num_blocks or max(1, int(config.cache_memory_gib * 2**30) // block_bytes)
        check_cache_fits(config, (num_blocks + 1) * block_bytes, self.device)
        # the cache owns the geometry from here on (and one scratch block beyond num_blocks, dsv3.infer.cache)
        self.cache = cache = PagedLatentCache(cfg, n_layers, num_blocks, config.block_size, dtype, self.device)
        self.blocks = BlockManager(cache.num_blocks, cache.block_size, config.prefix_caching)
        self.limits = RequestLimits(cfg.vocab_size, self.max_model_len, cache.block_size, cache.num_blocks)
        self.scheduler = Scheduler(config, self.blocks)
        self._fuse_projections()
        self.runner = ModelRunner(model, self.cache, config)
        self.speculation = Speculation(self) if self.speculative else None
        if config.cuda_graphs and graphs_supported(model):
            self.use_decode_graphs(capture=True)
            if config.capture_graphs_at_start:
                self.capture_all_graphs()
        # the tokenizer's EOS, else the config's: an id, a list of ids (HF allows one; any of them stops) or None;
        # and EngineConfig.eos_token_ids
        eos = tokenizer.eos_id if tokenizer is not None else cfg.eos_token_id
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos]) | set(
            config.eos_token_ids)
        self.stops = StopRules(tokenizer, self.eos_ids, self.max_model_len)
        self.structured = StructuredOutputs(tokenizer, cfg.vocab_size, self.eos_ids)   # constrained outputs
        self._ids = itertools.count()
        self.seqs: dict[int, Sequence] = {}
        self._generators: dict[int, torch.Generator] = {}
        self.penalties = PenaltyState(cfg.vocab_size, self.device)   # empty until a request adjusts its logits
        self._aborted: list[Sequence] = []
        self._in_flight: InFlight | SpecInFlight | None = None   # the last step, not read yet (overlap)
        self._unreturned: list[RequestOutput] = []     # read by a step that then raised: the next step returns them
        # the requests the last step ran (scheduled, or pending in the step it read): those a step that raised failed,
        # and all a server fails (the others wait, as they were, for the next step)
        self.step_request_ids: list[int] = []

    @property
    def overlap(self) -> bool:
        """Whether plain steps chain (dsv3.infer.overlap): EngineConfig.overlap_schedule, "auto" = with captured
        decode graphs; not in an engine with MTP speculation, whose fused steps chain instead (`spec_overlap`)."""
        return not self.speculative and self._overlap_on()

    @property
    def spec_overlap(self) -> bool:
        """Whether fused speculative steps chain: launched before the last one's accepted counts are read
        (dsv3.infer.speculation.can_chain), under the same switch as plain steps."""
        return self.speculative and self.config.speculative_fused and self._overlap_on()

    def _overlap_on(self) -> bool:
        mode, graphs = self.config.overlap_schedule, self.runner.graphs
        return mode == "on" or mode == "auto" and graphs is not None and graphs.capture

    def _fuse_projections(self) -> None:
        """The decode-time projection fusion and GEMV routing the config asks for (dsv3.infer.fused_proj)."""
        c = self.config
        fuse_projections(self.model, c.fuse_projections, c.dense_gemv, c.skinny_gemm)

    def use_decode_graphs(self, capture: bool = True) -> None:
        """Run decode batches from padded buckets, replayed from CUDA graphs (capture=False: the same padded
        batches, eagerly; any device)."""
        # verify and MTP rows are one-token decode rows too: B * (k + 1) of them
        max_batch = self.config.max_num_seqs
        if self.speculative:
            max_batch = max(max_batch, self.config.speculative_max_batch * (self.config.num_speculative_tokens + 1))
        self.runner.use_graphs(max_batch, -(-self.max_model_len // self.cache.block_size), capture)

    def capture_all_graphs(self) -> int:
        """Every bucket of the decode graphs this engine steps through captured now (EngineConfig.
        capture_graphs_at_start); the MTP module's and the fused speculative step's only with speculation: without
        it the cache holds no latents for the MTP block. Returns how many graphs were new."""
        r = self.runner
        graphs = [r.graphs] + ([g for g in (r.mtp_graphs, r.spec_graphs) if g is not None] if self.speculative else [])
        return sum(g.capture_all() for g in graphs if g is not None)

    @torch.no_grad()
    def load_weights(self, source: torch.nn.Module | None = None) -> None:
        """In-process weight sync (post-training rollouts: dsv3.posttrain.grpo): copy `source`'s parameters and
        buffers into the engine's model (cast to its dtype and device), or nothing when the engine runs on the
        trainer's model itself (source None or that model), and forget the prefix cache, whose latents the old
        weights computed. Between steps only: no request may be in flight."""
        if self.has_unfinished():
            raise RuntimeError("load_weights with requests in flight: their cached latents mix two sets of weights")
        if source is not None and source is not self.model:
            own = self.model.state_dict()
            theirs = source.state_dict()
            if set(own) != set(theirs):
                raise ValueError(f"load_weights: the source model's tensors differ: "
                                 f"{sorted(set(own) ^ set(theirs))[:5]}")
            for k, v in theirs.items():
                own[k].copy_(v)
        # re-links the fused pairs to weights something re-pointed (dsv3.infer.fused_proj)
        self._fuse_projections()
        self.blocks.forget_prefixes()

    # ---- requests -----------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> int:
        """Queue a request; raises ValueError (and queues nothing) for a bad one."""
        params = params or SamplingParams()
        return self._queue(self.check_request(prompt, params), params)

    def check_request(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids, after every check a request must pass before it is queued (ValueError names the
        problem). Reads only what does not change while serving, so a server may call it from another thread."""
        return check_request(prompt, params, self.limits, self.tokenizer)

    def _queue(self, ids: list[int], params: SamplingParams) -> int:
        rid = next(self._ids)
        # the request's own copy (lists included, by __post_init__): a caller reusing its object for the next
        # request must not rewrite this one in flight
        params = dataclasses.replace(params)
        seq = Sequence(rid, ids, params)
        self.seqs[rid] = seq
        generator = make_generators([params], self.device)[0]
        if generator is not None:
            self._generators[rid] = generator
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: int) -> None:
        seq = self.seqs.get(request_id)
        if seq is None or seq.finished:
            return
        # a token still in flight was never returned: the caller has seen what a synchronous engine would have
        # returned by now, and the abort's output holds exactly that (the in-flight row is skipped when applied)
        del seq.token_ids[len(seq.token_ids) - seq.num_pending:]
        seq.num_pending = 0
        self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        """Work left, or outputs the next step still has to return (aborted requests', a failed step's)."""
        return (self.scheduler.has_work() or bool(self._aborted) or self._in_flight is not None
                or bool(self._unreturned))

    def stats(self) -> dict:
        """Queue lengths, cache use, preemptions and speculation counts (for a server's /metrics)."""
        b = self.blocks
        return dict(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                    unfinished=Engine.has_unfinished(self), free_blocks=b.num_free_blocks, num_blocks=b.num_blocks,
                    referenced_blocks=b.num_blocks - b.num_free_blocks,    # a block is free exactly when unreferenced
                    cache_usage=1 - b.num_free_blocks / b.num_blocks, preemptions=self.scheduler.num_preemptions,
                    prefix_hits=b.prefix_hits, graph_captures=sum(g.captures for g in self.runner.all_graphs()),
                    graph_capture_seconds=sum(g.capture_seconds for g in self.runner.all_graphs()),
                    **{f"spec_{k}": v for k, v in self.spec_stats.items()},
                    **{f"step_{k}": v for k, v in self.step_stats.items()})

    # ---- one step -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that produced tokens or finished (aborted ones
        included). With the overlap schedule the tokens are those of the previous step (dsv3.infer.overlap)."""
        outputs = self._unreturned + [self._output(s, []) for s in self._aborted]
        self._unreturned, self._aborted = [], []
        self.step_request_ids = []
        try:
            self._step(outputs)
        except BaseException:
            # a step that raises (a forward out of memory) returns nothing: what it had read before (the last step's
            # tokens, finished and aborted requests) goes out with the next step instead of being lost
            self._unreturned = outputs
            raise
        return self._forget_finished(outputs)

    def _step(self, outputs: list[RequestOutput]) -> None:
        """step()'s body; adds its outputs to `outputs` as it reads them."""
        # the last step stays in flight until it is read or a launched step has taken its tokens: a step that raises
        # before that (a forward out of memory) leaves it to the next step, instead of dropping the tokens whose
        # placeholders (PENDING) its sequences hold
        prev = self._in_flight
        ran = self.step_request_ids = [s.seq_id for s in prev.seqs if not s.finished] if prev is not None else []
        if isinstance(prev, SpecInFlight) and not self.speculation.can_chain(prev):
            # read before scheduling, as a synchronous engine: its tokens may end sequences or need blocks
            outputs += self._read_in_flight()
            prev = None
        seqs, counts = self.scheduler.schedule()
        ran += [s.seq_id for s in seqs]          # (twice where chained)
        if prev is not None and not self._chains(seqs, counts, prev):
            # as the synchronous engine: the pending tokens first (some may end their sequences), then the batch
            outputs += self._read_in_flight()
            prev = None
            kept = [(s, n) for s, n in zip(seqs, counts) if not s.finished]
            seqs, counts = [s for s, _ in kept], [n for _, n in kept]
        if not seqs:
            self._idle_step()
            return
        st = self.step_stats
        decode = all(is_decode_row(s, n) for s, n in zip(seqs, counts))
        st["steps"] += 1
        st["decode_steps" if decode else "prefill_steps"] += 1
        st["seqs"] += len(seqs)
        if self.speculation is not None and self.speculation.applies(seqs, counts):
            st["chained_steps"] += prev is not None
            done, flight = self.speculation.step(seqs, prev)
            self._in_flight = None                 # prev, if any, was read in there (`done`)
            outputs += done
            if flight is not None:     # chained: read after the next step is launched; else now
                if self.spec_overlap:
                    self._in_flight = flight
                else:
                    outputs += self._apply(flight)
            return
        if self.speculation is not None:
            # a plain step: pending hidden states the MTP module has not seen stay bounded (Speculation.settle)
            self.speculation.settle(seqs)
        if prev is not None:
            # chained: every row's input is its token sampled by the previous step, still on the device
            st["chained_steps"] += 1
            rows = [Row([0], s.num_cached_tokens, s.block_table) for s in seqs]
            self._in_flight = self._run(seqs, counts, rows, prev.input_ids(seqs))
            outputs += self._apply(prev)           # the host waits here, while the device runs the new step
        else:
            rows = [Row(s.token_ids[s.num_cached_tokens:s.num_cached_tokens + n], s.num_cached_tokens, s.block_table)
                    for s, n in zip(seqs, counts)]
            self._in_flight = self._run(seqs, counts, rows)
        if self._in_flight is not None and not self.overlap:
            outputs += self._read_in_flight()

    def _read_in_flight(self) -> list[RequestOutput]:
        """Apply the step in flight; it is no longer in flight from the start (never applied twice)."""
        flight, self._in_flight = self._in_flight, None
        return self._apply(flight)

    def _chains(self, seqs: list[Sequence], counts: list[int], prev: InFlight | SpecInFlight) -> bool:
        """Whether this batch can run before the pending step is applied: decode rows whose input tokens are all
        pending (sampled by that step); after a fused speculative step, the same sequences speculating again."""
        if isinstance(prev, SpecInFlight):
            return seqs == prev.seqs and self.speculation.applies(seqs, counts)
        if any(s.params.structured_output is not None for s in seqs):
            return False         # a constrained row's mask needs its last token on the host (dsv3.infer.structured)
        return self.overlap and bool(seqs) and all(n == 1 and s.num_pending == 1 and s.num_cached_tokens > 0
                                                   for s, n in zip(seqs, counts))

    def _run(self, seqs: list[Sequence], counts: list[int], rows: list[Row],
             input_ids: torch.Tensor | None = None) -> InFlight | None:
        """Forward the rows (`input_ids` on the device replace their tokens), sample the next token of every
        sequence whose rows reached its end; those tokens stay pending (placeholders) until `_apply`."""
        batch = self.runner.prepare(rows, input_ids=input_ids)
        hidden = self.runner.forward(batch)
        done, last = [], []
        for i, (seq, n) in enumerate(zip(seqs, counts)):
            if seq.params.prompt_logprobs is not None:     # (a step run again skips the positions it has)
                self._prompt_logprobs(seq, hidden[batch.starts[i]:batch.starts[i] + n])
            if seq.num_uncomputed == n:            # the chunk reaches the sequence's end: sample its next token
                done.append(seq)
                last.append(batch.starts[i] + n - 1)
        sampled = self._sample(done, hidden, last) if done else None
        # a sequence's rows are kept for its MTP catch-up (Speculation.settle, draft): copied where the step ran
        # prefill rows besides them, which a view would keep alive until every sequence of the step has caught up
        mixed = len(seqs) < hidden.shape[0]
        # the sequences move on only now: a step that raised before this point (a forward or a head out of memory)
        # left each as it was, to run again; moved on, one would have had nothing left to run
        for i, (seq, n) in enumerate(zip(seqs, counts)):
            if self.speculative:
                rows = hidden[batch.starts[i]:batch.starts[i] + n]
                seq.pending_hidden.append(rows.clone() if mixed and n < hidden.shape[0] else rows)
            seq.num_cached_tokens += n
            self.blocks.mark_computed(seq)
        if not done:
            return None
        for seq in done:
            seq.token_ids.append(PENDING)
            seq.num_pending += 1
            # a token that ends the sequence whatever its value: no step for it after this one
            seq.stopping = seq.num_output_tokens >= seq.params.max_tokens or len(seq) >= self.max_model_len
        return InFlight.start(done, *sampled)

    def _sample(self, done: list[Sequence], hidden: torch.Tensor, last: list[int]) -> tuple:
        """The next token of each sequence in `done` from its row `last` of `hidden`, and the log-probability
        tensors asked for: (tokens, (logprob tensors))."""
        # a pure decode batch samples every row: no index tensor to build and copy to the device
        rows_h = hidden if last == list(range(hidden.shape[0])) else hidden[to_device(last, torch.long, self.device)]
        logits = self.runner.logits(rows_h)
        # penalties and logit_bias (dsv3.infer.penalties): `scores` is `logits` itself unless a request uses them
        scores, adjusted = self.penalties.apply(done, logits)
        scores = self.stops.suppress(done, scores)
        scores = self.structured.mask(done, scores)         # structured outputs (dsv3.infer.structured)
        if all(s.params.greedy for s in done):
            # what `sample` returns for greedy rows (the race over a one-hot), without building and sorting a
            # (B, V) top-k / top-p distribution: one kernel instead of ~20 on the decode step's host path
            tokens = scores.argmax(-1)
        else:
            temps, top_ks, top_ps = SamplingTensors.from_params([s.params for s in done], self.device)
            tokens = sample(scores, temps, top_ks, top_ps, [self._generators.get(s.seq_id) for s in done])
        # log-probabilities of the model's own distribution, never of the adjusted one (vLLM's default)
        want = max((s.params.logprobs for s in done if s.params.logprobs is not None), default=None)
        lp = compute_logprobs(logits, tokens, want) if want is not None else ()
        if adjusted is not None:                   # last: a step that raised must not have counted its tokens
            self.penalties.record(adjusted, tokens)
        return tokens, tuple(lp)

    def _apply(self, pending: InFlight | SpecInFlight) -> list[RequestOutput]:
        """A step's sampled tokens, read on the host: log-probabilities, stop conditions, outputs. A sequence the
        next step has already run (chained) keeps that step's token pending, or, if this token ended it, loses it
        (never emitted; its blocks go back with the rest)."""
        if isinstance(pending, SpecInFlight):
            return self.speculation.apply(pending)
        tokens, *lp = pending.wait()
        outputs = []
        for j, (seq, tok) in enumerate(zip(pending.seqs, tokens)):
            if seq.finished:                       # its previous token ended it: this one is the discarded extra
                continue
            ahead = seq.num_pending - 1            # 1: the chained step ran this sequence too
            del seq.token_ids[len(seq.token_ids) - seq.num_pending:]
            seq.num_pending = 0
            seq.num_cached_tokens -= ahead         # as before the chained step (what a prefill worker exports)
            if seq.params.logprobs is not None:
                n_top = seq.params.logprobs
                seq.logprobs.append((lp[0][j], lp[1][j][:n_top], lp[2][j][:n_top]))
            self._append(seq, tok)
            outputs.append(self._output(seq, [tok]))
            if not seq.finished:
                if ahead:
                    seq.token_ids.append(PENDING)
                    seq.num_pending = 1
                    seq.num_cached_tokens += 1
                self.blocks.mark_computed(seq)     # the blocks this token completes (chained: their latents are
                                                   # being written on the stream, ahead of any reader)
        return outputs

    def _idle_step(self) -> None:
        """A step that scheduled nothing: nothing to run here (an expert-parallel engine still joins its group's
        collectives, dsv3.infer.ep_engine)."""

    def _forget_finished(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        for out in outputs:
            if out.finished:
                self.seqs.pop(out.request_id, None)
        return outputs

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Log-probability of each prompt token given the ones before it (position p's logits score token p+1)."""
        start = seq.num_cached_tokens
        positions = [p for p in range(start, start + hidden.shape[0]) if p + 1 < seq.num_prompt_tokens
                     and p >= len(seq.prompt_logprobs)]
        if not positions:
            return
        logits = self.runner.logits(hidden[torch.tensor([p - start for p in positions], device=self.device)])
        targets = torch.tensor([seq.token_ids[p + 1] for p in positions], device=self.device)
        n_top = seq.params.prompt_logprobs
        # three device -> host copies per chunk, not three per position (each one a sync on the GPU)
        lp, top_ids, top_lp = (t.tolist() for t in compute_logprobs(logits, targets, n_top))
        seq.prompt_logprobs.extend(zip(lp, top_ids, top_lp))

    def _append(self, seq: Sequence, token: int) -> None:
        """Add a generated token; finish the sequence if it stops there (dsv3.infer.stop_rules)."""
        seq.token_ids.append(token)
        grammar = self.structured.advance(seq, token)      # a grammar that is complete (or failed) ends the output
        reason = self.stops.reason(seq)
        if grammar == GRAMMAR_ERROR or (grammar and not reason):
            reason = grammar
            if self.tokenizer is not None:
                seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        if reason:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if reason == "abort" and self.tokenizer is not None:
            # _append decodes only for a stop or the length: an aborted output's text is its tokens' (no stop
            # string was in them, or it would have stopped)
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        self.scheduler.remove(seq)
        self._generators.pop(seq.seq_id, None)
        self.penalties.release(seq.seq_id)
        self.structured.release(seq.seq_id)
        if reason == "abort":
            self._aborted.append(seq)

    def _output(self, seq: Sequence, new: list[int]) -> RequestOutput:
        new_lp = seq.logprobs[len(seq.logprobs) - len(new):] if new and seq.logprobs else []
        if not seq.finished:
            first = seq.num_output_tokens == len(new)          # the prompt log-probabilities go with the first output
            return RequestOutput(seq.seq_id, [], [], "", False, None, new, [],
                                 list(seq.prompt_logprobs) if first else [], new_lp)
        return RequestOutput(seq.seq_id, seq.prompt_ids, seq.output_ids, seq.text, True, seq.finish_reason, new,
                             list(seq.logprobs), list(seq.prompt_logprobs), new_lp)

    # ---- offline ------------------------------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order."""
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        checked = [self.check_request(p, sp) for p, sp in zip(prompts, params)]   # a bad prompt queues none
        ids = [self._queue(c, sp) for c, sp in zip(checked, params)]
        final: dict[int, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]
