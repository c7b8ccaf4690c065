"""/metrics in the Prometheus text format (prometheus_client, one registry per server).

Counters: requests by endpoint and status, prompt and generated tokens, aborted requests
(`dsv3_num_requests_aborted_total`); advanced at scrape time by what the engine's running totals grew since the last
one: preemptions, MTP draft tokens proposed and accepted, expert rebalances (`..._total`; they only count up, and
rate() reads a gauge that a restart resets as a huge negative rate).
Gauges (read at scrape time): running and waiting sequences, pending requests, KV-cache usage, speculative acceptance
ratio, the engine's torch threads; with expert parallelism, the expert placement (slot -> logical expert per MoE
layer) and the last window's expert loads. Histograms: time to first token, time per output token (a
request's decode time / (tokens - 1)).

The endpoint label is a route's template (`/v1/models/{model_id:path}`), and "unmatched" for every path no route
has: a raw path would let any client create series without bound.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from starlette.routing import Match
from starlette.types import Scope

from ..infer.engine import RequestOutput

disable_created_metrics()      # no `*_created` series: they double the output and no dashboard reads them
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self, aengine):
        self.aengine = aengine
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dsv3_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("dsv3_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("dsv3_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("dsv3_time_to_first_token_seconds", "submit -> first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("dsv3_time_per_output_token_seconds", "decode time per output token after the first",
                              buckets=_LATENCY, registry=r)
        self.running = Gauge("dsv3_num_requests_running", "sequences the engine is running", registry=r)
        self.waiting = Gauge("dsv3_num_requests_waiting", "sequences waiting for the engine", registry=r)
        self.pending = Gauge("dsv3_num_requests_pending", "requests accepted and not finished", registry=r)
        self.cache = Gauge("dsv3_kv_cache_usage_ratio", "fraction of latent-cache blocks in use", registry=r)
        # a Counter (`_total` appended), not a Gauge: it only counts up, and rate() over a gauge misreads a restart
        self.aborted = Counter("dsv3_num_requests_aborted", "requests aborted (client disconnected)", registry=r)
        self.preemptions = Counter("dsv3_num_preemptions", "sequences preempted", registry=r)
        self.spec_proposed = Counter("dsv3_spec_decode_draft_tokens", "MTP draft tokens proposed", registry=r)
        self.spec_accepted = Counter("dsv3_spec_decode_accepted_tokens", "MTP draft tokens accepted", registry=r)
        self._totals: dict[str, int] = {}      # the engine's running totals at the last scrape
        self.spec_rate = Gauge("dsv3_spec_decode_acceptance_ratio", "accepted / proposed draft tokens", registry=r)
        self.threads = Gauge("dsv3_engine_torch_threads", "torch intra-op threads of the engine", registry=r)
        # expert parallelism (dsv3 serve --ep): the EPLB placement and the loads it was computed from
        self.expert_slot = Gauge("dsv3_expert_slot_logical_expert", "logical expert held by each physical slot",
                                 ["layer", "slot"], registry=r)
        self.expert_load = Gauge("dsv3_expert_window_load_tokens", "routed tokens per logical expert in the last "
                                 "rebalance window, summed over the EP group", ["layer", "expert"], registry=r)
        self.rebalances = Counter("dsv3_eplb_rebalances", "expert placements applied while serving", registry=r)
        aengine.on_output = self.output

    def request(self, endpoint: str, prompt_lengths: list[int]) -> None:
        """A request accepted by the engine: its prompt tokens. Its status is counted once it is known (`answered`,
        or `error` for a refusal or a failure): counted here as 200, a request that then failed counted twice (200
        and 500), and one whose client left counted as answered."""
        self.prompt_tokens.inc(sum(prompt_lengths))

    def answered(self, endpoint: str, status: int = 200) -> None:
        """A request's status, counted once: 200, 499 (the client left) or, as `error`, a refusal or failure."""
        self.requests.labels(endpoint, str(status)).inc()

    error = answered

    def output(self, handle, out: RequestOutput) -> None:
        self.generation_tokens.inc(len(out.new_token_ids))
        if out.finished and out.finish_reason == "abort":
            self.aborted.inc()
        if out.finished and handle.first_token is not None and out.finish_reason != "abort":
            self.ttft.observe(handle.first_token - handle.submitted)
            if len(out.token_ids) > 1:
                self.tpot.observe((time.perf_counter() - handle.first_token) / (len(out.token_ids) - 1))

    def render(self, s: dict) -> bytes:
        """The exposition, with the gauges set from the engine's `stats()` `s`."""
        self.running.set(s["running"])
        self.waiting.set(s["waiting"])
        self.pending.set(self.aengine.num_pending)
        self.cache.set(s["cache_usage"])
        self._advance(self.preemptions, "preemptions", s["preemptions"])
        self._advance(self.spec_proposed, "spec_proposed", s["spec_proposed"])
        self._advance(self.spec_accepted, "spec_accepted", s["spec_accepted"])
        self.spec_rate.set(s["spec_accepted"] / s["spec_proposed"] if s["spec_proposed"] else 0.0)
        self.threads.set(s["torch_threads"])
        if "expert_placement" in s:
            self._experts(s)
        return generate_latest(self.registry)

    def _experts(self, s: dict) -> None:
        for layer, row in enumerate(s["expert_placement"]):
            for slot, expert in enumerate(row):
                self.expert_slot.labels(str(layer), str(slot)).set(expert)
        for layer, row in enumerate(s["expert_loads"]):
            for expert, load in enumerate(row):
                self.expert_load.labels(str(layer), str(expert)).set(load)
        self._advance(self.rebalances, "ep_rebalances", s["ep_rebalances"])

    def _advance(self, counter: Counter, key: str, total: int) -> None:
        """`counter` advanced by what the engine's running `total` grew since the last scrape (all of it when the
        total went down: a new engine counting from 0)."""
        last = self._totals.get(key, 0)
        grown = total - last if total >= last else total
        if grown:
            counter.inc(grown)
        self._totals[key] = total


def route_label(scope: Scope) -> str:
    """The endpoint label of a request: its route's template, found by the router (after routing) or here (for a
    request refused before it)."""
    route = scope.get("route")
    if route is None and "app" in scope:
        route = next((r for r in scope["app"].routes if r.matches(scope)[0] is not Match.NONE), None)
    return getattr(route, "path", None) or "unmatched"
