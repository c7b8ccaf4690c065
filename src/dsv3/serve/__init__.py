"""The OpenAI-compatible server: `dsv3 serve --model PATH` (FastAPI + uvicorn over one AsyncEngine)."""

from .app import build_app
from .async_engine import AsyncEngine

__all__ = ["AsyncEngine", "build_app"]
