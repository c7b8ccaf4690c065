"""dsv3.infer: the inference engine (paged latent cache, continuous batching, chunked prefill, prefix caching)."""

from .config import EngineConfig
from .engine import Engine, RequestOutput
from .sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
