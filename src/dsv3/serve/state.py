"""The server's state: one object, built by build_app and read by every route through `get_state(request)`.

It holds the engine (an AsyncEngine or an EngineProcess), the tokenizer and chat template, the metrics, the options
of `dsv3 serve`, and the worker threads where tokenising, template rendering and decoding run: CPU work that grows
with the input, kept off the event loop so that a 2 MB prompt cannot stall /health or other clients' streams (the
tokenizer releases the GIL while it works, see data/tokenizer.py).
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from ..data import ChatTemplate, Tokenizer
from ..infer import Engine
from ..infer.requests import RequestLimits
from .async_engine import AsyncEngine, AsyncEngineBase
from .metrics import ServerMetrics
from .reasoning import PARSERS, reasoning_enabled
from .responses import TokenTable, json_body

DEFAULT_MAX_BODY_BYTES = 8 * 2**20      # a 128K-token context is ~0.5 MB of text, ~1 MB of token ids as JSON
WORKER_THREADS = 4


@dataclass(frozen=True)
class ServeOptions:
    """build_app's keyword arguments (the `dsv3 serve` flags of the same names)."""
    api_key: str | None = None               # `Authorization: Bearer KEY` on everything but /health
    metrics_public: bool = False             # /metrics open without the key (for scrapers)
    allowed_hosts: tuple[str, ...] | None = None   # Host names accepted besides loopback ones; "*": any
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES   # larger request bodies get 413
    max_pending: int = 256                   # when given an Engine: queued or running requests before 429
    chat_template: str | None = None         # Jinja source (default: DeepSeek-V3's layout)
    reasoning_parser: str = "auto"           # chat's reasoning_content: auto | deepseek_r1 | none (reasoning.py)
    sampling_defaults: dict | None = None    # temperature / top_p / top_k a request leaves out (generation_config)

    def __post_init__(self):
        # a blank key (DSV3_API_KEY set but empty) let `Authorization: Bearer` with no token in: fail closed
        if self.api_key is not None and (not self.api_key.strip() or self.api_key != self.api_key.strip()):
            raise ValueError("the API key (--api-key / DSV3_API_KEY) must not be empty or start or end with "
                             "blank space (a client's token is read without it); leave it unset for no key")
        if self.allowed_hosts is not None:
            object.__setattr__(self, "allowed_hosts", tuple(h.lower() for h in self.allowed_hosts))
        if self.reasoning_parser not in PARSERS:
            raise ValueError(f"reasoning_parser={self.reasoning_parser!r} is not one of {', '.join(PARSERS)}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes={self.max_body_bytes} must be >= 1")


@dataclass(eq=False)
class ServerState:
    aengine: AsyncEngineBase
    tokenizer: Tokenizer
    model_name: str
    options: ServeOptions
    template: ChatTemplate
    metrics: ServerMetrics
    executor: ThreadPoolExecutor
    reasoning: bool = False                  # chat completions split reasoning_content (options.reasoning_parser)

    @classmethod
    def create(cls, engine: Engine | AsyncEngineBase, tokenizer: Tokenizer, model_name: str,
               options: ServeOptions) -> ServerState:
        """An Engine is stepped by a thread of this process (AsyncEngine); an EngineProcess is used as it is."""
        aengine = engine if isinstance(engine, AsyncEngineBase) else AsyncEngine(engine, options.max_pending)
        # the tokenizer's derived parts are built now, not inside the first request that needs them
        tokenizer.max_token_bytes, tokenizer.special_spans([""]), tokenizer.encode("", split_special_tokens=True)
        TokenTable.of(tokenizer)
        template = ChatTemplate(options.chat_template)
        return cls(aengine, tokenizer, model_name, options, template, ServerMetrics(aengine),
                   ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="dsv3-tokenize"),
                   reasoning_enabled(options.reasoning_parser, template.source))

    @property
    def limits(self) -> RequestLimits:
        return self.aengine.limits

    async def run(self, fn, /, *args, **kwargs):
        """fn(*args, **kwargs) on a worker thread; the event loop serves others meanwhile. Exceptions (APIError)
        come back to the caller."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    async def respond(self, build, /, *args) -> Response:
        """The JSON response `build(*args)` makes, built and serialised on a worker thread: a body of n choices x
        thousands of logprob entries takes seconds of Python (measured: /health stalled 2-3 s behind one)."""
        return Response(await self.run(lambda: json_body(build(*args))), media_type="application/json")

    async def close(self) -> None:
        await self.aengine.shutdown(drain=True)   # uvicorn has stopped accepting and waited for open responses
        self.executor.shutdown(wait=False, cancel_futures=True)


def get_state(request: Request) -> ServerState:
    return request.app.state.server
