"""Where evaluation gets its numbers: a local model through the inference engine, or any OpenAI-compatible server.

Both score token ids, never text, so the tokenisation (and the BOS choice) is the caller's and identical for both:
- `EngineBackend`: the engine's prompt log-probabilities (prompt_logprobs[j] scores prompt token j + 1); requests
  are batched by the engine, and few-shot prefixes shared by the choices of a question hit its prefix cache.
- `OpenAIBackend`: `/v1/completions` with token-id prompts, `echo`, `logprobs` and `max_tokens=0`, through the
  `openai` client, as lm-evaluation-harness's `local-completions` asks (our server and vLLM answer it);
  `choices[i].logprobs.token_logprobs[j]` scores prompt token j (None for the first).
"""

from __future__ import annotations

from typing import Protocol

Pairs = list[tuple[list[int], list[int]]]


class LoglikBackend(Protocol):
    def loglikelihoods(self, pairs: Pairs) -> list[float]: ...


class GenerateBackend(Protocol):
    def generate(self, prompts: list[list[int]], k: int, temperature: float, max_tokens: int, stop: list[str],
                 seed: int) -> list[list[str]]:
        """k completions (text) per token-id prompt; sample j of prompt i is seeded seed + j."""


class EngineBackend:
    def __init__(self, engine):
        self.engine = engine

    def loglikelihoods(self, pairs: Pairs) -> list[float]:
        from ..infer import SamplingParams
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outs = self.engine.generate([ctx + cont for ctx, cont in pairs], params)
        return [sum(e[0] for e in out.prompt_logprobs[len(ctx) - 1:len(ctx) - 1 + len(cont)])
                for (ctx, cont), out in zip(pairs, outs)]


    def generate(self, prompts: list[list[int]], k: int, temperature: float, max_tokens: int, stop: list[str],
                 seed: int) -> list[list[str]]:
        from ..infer import SamplingParams
        params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, stop=stop, seed=seed + j)
                  for _ in prompts for j in range(k)]
        outs = self.engine.generate([p for p in prompts for _ in range(k)], params)
        return [[o.text for o in outs[i * k:(i + 1) * k]] for i in range(len(prompts))]


class OpenAIBackend:
    def __init__(self, base_url: str, model: str, api_key: str | None = None, batch: int = 16, timeout: float = 600):
        import openai           # the serving extra; a local evaluation does not need it
        self.client = openai.OpenAI(base_url=base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith("/v1")
                                                                      else "/v1"),
                                    api_key=api_key or "none", timeout=timeout, max_retries=2)
        self.model, self.batch = model, batch

    def loglikelihoods(self, pairs: Pairs) -> list[float]:
        out = []
        for i in range(0, len(pairs), self.batch):
            chunk = pairs[i:i + self.batch]
            r = self.client.completions.create(model=self.model, prompt=[c + x for c, x in chunk], echo=True,
                                               logprobs=0, max_tokens=0, temperature=0.0)
            for (ctx, cont), choice in zip(chunk, sorted(r.choices, key=lambda c: c.index)):
                lps = choice.logprobs.token_logprobs
                out.append(sum(lps[len(ctx):len(ctx) + len(cont)]))
        return out

    def generate(self, prompts: list[list[int]], k: int, temperature: float, max_tokens: int, stop: list[str],
                 seed: int) -> list[list[str]]:
        out = []
        for p in prompts:
            r = self.client.completions.create(model=self.model, prompt=[p], n=k, temperature=temperature,
                                               max_tokens=max_tokens, stop=stop or None, seed=seed)
            out.append([c.text for c in sorted(r.choices, key=lambda c: c.index)])
        return out
