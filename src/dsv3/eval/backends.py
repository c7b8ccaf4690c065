"""Where evaluation gets its numbers: a local model through the inference engine, or any OpenAI-compatible server.

Both score token ids, never text, so the tokenisation (and the BOS choice) is the caller's and identical for both:
- `EngineBackend`: the engine's prompt log-probabilities (prompt_logprobs[j] scores prompt token j + 1); requests
  are batched by the engine, and few-shot prefixes shared by the choices of a question hit its prefix cache.
- `OpenAIBackend`: `/v1/completions` with token-id prompts, `echo`, `logprobs` and `max_tokens=0`, through the
  `openai` client, as lm-evaluation-harness's `local-completions` asks (our server and vLLM answer it);
  `choices[i].logprobs.token_logprobs[j]` scores prompt token j (None for the first).

A request that fails (a prompt the engine refuses, a server that cannot be reached or answers an error) yields a
`Failure` in place of that sample's text or log-likelihood: the scorers record its message as the sample's error and
count it as wrong, and the rest of the run goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

Pairs = list[tuple[list[int], list[int]]]


@dataclass(frozen=True)
class Failure:
    """A backend's error in place of one output."""
    error: str

    def __str__(self) -> str:
        return f"<error: {self.error}>"


def failure(x) -> str | None:
    """The error message when `x` is a Failure, else None."""
    return x.error if isinstance(x, Failure) else None


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


class LoglikBackend(Protocol):
    def loglikelihoods(self, pairs: Pairs) -> list[float | Failure]: ...


class GenerateBackend(Protocol):
    def generate(self, prompts: list[list[int]], k: int, temperature: float, max_tokens: int, stop: list[str],
                 seed: int) -> list[list[str | Failure]]:
        """k completions (text) per token-id prompt; sample j of prompt i is seeded seed + j."""


class EngineBackend:
    def __init__(self, engine):
        self.engine = engine

    def _run(self, prompts: list[list[int]], params: list) -> list:
        """The engine's outputs, with a Failure for each request it refuses (checked first: the rest still run)."""
        errors = {}
        for i, (p, sp) in enumerate(zip(prompts, params)):
            try:
                self.engine.check_request(p, sp)
            except ValueError as e:
                errors[i] = Failure(_one_line(e))
        good = [i for i in range(len(prompts)) if i not in errors]
        outs = dict(zip(good, self.engine.generate([prompts[i] for i in good], [params[i] for i in good])))
        return [errors.get(i) or outs[i] for i in range(len(prompts))]

    def loglikelihoods(self, pairs: Pairs) -> list[float | Failure]:
        from ..infer import SamplingParams
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outs = self._run([ctx + cont for ctx, cont in pairs], [params] * len(pairs))
        return [out if isinstance(out, Failure) else
                sum(e[0] for e in out.prompt_logprobs[len(ctx) - 1:len(ctx) - 1 + len(cont)])
                for (ctx, cont), out in zip(pairs, outs)]

    def generate(self, prompts: list[list[int]], k: int, temperature: float, max_tokens: int, stop: list[str],
                 seed: int) -> list[list[str | Failure]]:
        from ..infer import SamplingParams
        params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, stop=stop, seed=seed + j)
                  for _ in prompts for j in range(k)]
        outs = self._run([p for p in prompts for _ in range(k)], params)
        outs = [o if isinstance(o, Failure) else o.text for o in outs]
        return [outs[i * k:(i + 1) * k] for i in range(len(prompts))]


class OpenAIBackend:
    def __init__(self, base_url: str, model: str, api_key: str | None = None, batch: int = 16, timeout: float = 600):
        import openai           # the serving extra; a local evaluation does not need it
        self.client = openai.OpenAI(base_url=base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith("/v1")
                                                                      else "/v1"),
                                    api_key=api_key or "none", timeout=timeout, max_retries=2)
        self.model, self.batch = model, batch

    def loglikelihoods(self, pairs: Pairs) -> list[float | Failure]:
        import openai
        out = []
        for i in range(0, len(pairs), self.batch):
            chunk = pairs[i:i + self.batch]
            try:
                r = self.client.completions.create(model=self.model, prompt=[c + x for c, x in chunk], echo=True,
                                                   logprobs=0, max_tokens=0, temperature=0.0)
            except openai.OpenAIError as e:          # unreachable, refused, timed out: these samples fail, not the run
                out += [Failure(_one_line(e))] * len(chunk)
                continue
            for (ctx, cont), choice in zip(chunk, sorted(r.choices, key=lambda c: c.index)):
                lps = choice.logprobs.token_logprobs
                out.append(sum(lps[len(ctx):len(ctx) + len(cont)]))
        return out

    def generate(self, prompts: list[list[int]], k: int, temperature: float, max_tokens: int, stop: list[str],
                 seed: int) -> list[list[str | Failure]]:
        import openai
        out = []
        for p in prompts:
            try:
                r = self.client.completions.create(model=self.model, prompt=[p], n=k, temperature=temperature,
                                                   max_tokens=max_tokens, stop=stop or None, seed=seed)
            except openai.OpenAIError as e:
                out.append([Failure(_one_line(e))] * k)
                continue
            out.append([c.text for c in sorted(r.choices, key=lambda c: c.index)])
        return out
