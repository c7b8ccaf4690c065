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

import math

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

    def context_length(self) -> int:
        """Tokens a sequence may hold (prompt + generated), as the engine enforces it."""
        return self.engine.max_model_len

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
        sums = [out if isinstance(out, Failure) else
                sum(e[0] for e in out.prompt_logprobs[len(ctx) - 1:len(ctx) - 1 + len(cont)])
                for (ctx, cont), out in zip(pairs, outs)]
        # a model whose logits overflowed scores NaN: that sample's error, not an argmax over NaNs
        return [x if isinstance(x, Failure) or math.isfinite(x) else Failure("the model's log-likelihood is not "
                                                                             "finite (overflow?)") for x in sums]

    def generate(self, prompts: list[list[int]], k: int, temperature: float, max_tokens: int, stop: list[str],
                 seed: int) -> list[list[str | Failure]]:
        from ..infer import SamplingParams
        params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, stop=stop, seed=seed + j)
                  for _ in prompts for j in range(k)]
        outs = self._run([p for p in prompts for _ in range(k)], params)
        outs = [o if isinstance(o, Failure) else o.text for o in outs]
        return [outs[i * k:(i + 1) * k] for i in range(len(prompts))]


class OpenAIBackend:
    """Retries are bounded twice over: the `openai` client retries one request `max_retries` times (connection
    errors, 408/429/5xx), and after `give_up_after` requests in a row fail with a connection error, a timeout or a
    5xx, the server is taken for down: the remaining samples fail at once with that reason instead of each waiting
    out its own timeouts (a hung server would otherwise cost timeout x attempts x requests). A 4xx for one request
    (a prompt too long) is that sample's error and does not count. An answer that is not a well-formed completion
    (missing choices or log-probabilities) is that request's samples' error, never the run's end."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, batch: int = 16, timeout: float = 600,
                 max_retries: int = 2, give_up_after: int = 3):
        import openai           # the serving extra; a local evaluation does not need it
        # a long read timeout (a long generation on a busy server) but a short connect one: an address that drops
        # packets costs give_up_after x (max_retries + 1) x 10 s, not x timeout
        url = base_url.rstrip("/")
        self.client = openai.OpenAI(base_url=url if url.endswith("/v1") else url + "/v1", api_key=api_key or "none",
                                    # openai's own Timeout: its HTTP library (httpx2 >= 2.17) refuses httpx's
                                    timeout=openai.Timeout(timeout, connect=min(timeout, 10.0)),
                                    max_retries=max_retries)
        self.model, self.batch, self.give_up_after = model, batch, give_up_after
        self.down: str | None = None          # why the server was given up on
        self.failed_in_a_row = 0

    def _create(self, **kwargs):
        """The completion, or a Failure (the server given up on after `give_up_after` such failures in a row)."""
        import openai
        if self.down:
            return Failure(self.down)
        try:
            r = self.client.completions.create(model=self.model, **kwargs)
        except (openai.APIConnectionError, openai.InternalServerError) as e:     # timeouts are connection errors
            self.failed_in_a_row += 1
            if self.failed_in_a_row >= self.give_up_after:
                self.down = (f"server given up after {self.failed_in_a_row} failed requests in a row (the last: "
                             f"{_one_line(e)}); the rest were not sent")
            return Failure(_one_line(e))
        except openai.OpenAIError as e:          # refused (4xx): this request's samples fail, not the run
            return Failure(_one_line(e))
        except ValueError as e:                  # a 200 whose body is not JSON (a proxy's HTML page)
            return Failure(f"malformed response from {self.client.base_url}: not JSON ({_one_line(e)})")
        self.failed_in_a_row = 0
        return r

    def context_length(self) -> int | None:
        """The served model's context (`max_model_len` of /v1/models/{model}, as our server and vLLM report it), or
        None when the server does not say (then nothing is checked up front)."""
        import openai
        try:
            n = getattr(self.client.with_options(max_retries=0).models.retrieve(self.model), "max_model_len", None)
        except openai.OpenAIError:
            return None
        return n if isinstance(n, int) and n > 0 else None

    @staticmethod
    def _choices(r, n: int):
        """The response's n choices in order, or a Failure when it is not a well-formed completion."""
        choices = getattr(r, "choices", None)
        if not isinstance(choices, list) or len(choices) != n:
            return Failure(f"malformed response: {len(choices) if isinstance(choices, list) else 'no'} choices for "
                           f"{n} prompts/samples")
        return sorted(choices, key=lambda c: c.index if isinstance(getattr(c, "index", None), int) else 0)

    def loglikelihoods(self, pairs: Pairs) -> list[float | Failure]:
        out = []
        for i in range(0, len(pairs), self.batch):
            chunk = pairs[i:i + self.batch]
            r = self._create(prompt=[c + x for c, x in chunk], echo=True, logprobs=0, max_tokens=0, temperature=0.0)
            choices = r if isinstance(r, Failure) else self._choices(r, len(chunk))
            if isinstance(choices, Failure):
                out += [choices] * len(chunk)
                continue
            for (ctx, cont), choice in zip(chunk, choices):
                lps = getattr(getattr(choice, "logprobs", None), "token_logprobs", None)
                span = lps[len(ctx):len(ctx) + len(cont)] if isinstance(lps, list) else []
                # finite numbers: a NaN (a server's fp16 overflow) compares false with everything, and the argmax
                # then picked choice 0, scored right where it was the answer
                ok = len(span) == len(cont) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                    and math.isfinite(x) for x in span)
                out.append(sum(span) if ok else Failure(f"malformed response: no finite log-probabilities for the "
                                                        f"{len(cont)} continuation tokens"))
        return out

    def generate(self, prompts: list[list[int]], k: int, temperature: float, max_tokens: int, stop: list[str],
                 seed: int) -> list[list[str | Failure]]:
        out = []
        for p in prompts:
            # top_p 1 said, not left to the server: a server's own defaults (dsv3 serve's are the model's
            # generation_config.json) would sample otherwise than the local engine's backend does
            r = self._create(prompt=[p], n=k, temperature=temperature, top_p=1.0, max_tokens=max_tokens,
                             stop=stop or None, seed=seed)
            choices = r if isinstance(r, Failure) else self._choices(r, k)
            if isinstance(choices, Failure):
                out.append([choices] * k)
                continue
            out.append([c.text if isinstance(getattr(c, "text", None), str)
                         else Failure("malformed response: a choice without text") for c in choices])
        return out
