"""Requests the server stops: end them as an OpenAI client understands, not as a cut connection or a bare 500.

When uvicorn shuts down it stops accepting, lets open responses run for its graceful timeout (`dsv3 serve`: 30 s),
then cancels those still running, and only then runs the app's shutdown. A cancelled request reaches the app as
asyncio.CancelledError: before this middleware, a non-streaming request got uvicorn's plain-text 500 and a stream a
chunked body cut off mid-way. Here the cancelled request's engine sequences are already aborted (the routes' finally
blocks), and the client gets:
- no response started yet: 503 in the error shape (`service_unavailable`: retry elsewhere);
- an SSE stream under way: an error event and `data: [DONE]`, the end every stream has;
- any other response under way: its body ended (nothing valid can be added to a half-sent JSON body).
The cancellation is not re-raised: the request task ends normally once the client has its answer.
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .protocol import APIError

STOPPED = APIError("the server is shutting down: this request was stopped before it finished; retry", 503,
                   "service_unavailable")


class EndOnStop:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = {"started": False, "done": False, "sse": False}

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["started"] = True
                seen["sse"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                  for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                seen["done"] = True
            await send(message)
        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if not seen["done"]:
                await self.end(send, seen)

    @staticmethod
    async def end(send: Send, seen: dict) -> None:
        if not seen["started"]:
            body = json.dumps(STOPPED.body()).encode()
            await send({"type": "http.response.start", "status": STOPPED.status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
        elif seen["sse"]:
            body = f"data: {json.dumps(STOPPED.body())}\n\ndata: [DONE]\n\n".encode()
        else:
            body = b""
        await send({"type": "http.response.body", "body": body, "more_body": False})
