"""The OpenAI-compatible server: `dsv3 serve --model PATH` (FastAPI + uvicorn over one AsyncEngine)."""

from .app import build_app
from .async_engine import AsyncEngine, EngineProcess

__all__ = ["AsyncEngine", "EngineProcess", "build_app"]
