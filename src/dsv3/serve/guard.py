"""The checks every request passes before a route runs, in this order:

1. Host. A server on loopback answers only loopback Host names (localhost, 127.0.0.0/8, ::1) and those of an
   allow-list: a DNS-rebinding page (evil.example re-resolved to 127.0.0.1) cannot drive it from a browser, key or
   not. A server bound elsewhere accepts any Host unless it is given a list (`default_allowed_hosts`). The Origin a
   browser sends is held to the same list: a page of another site that posts to http://127.0.0.1:8000 directly (a
   Blob or byte body has no Content-Type, so the browser sends it without a CORS preflight) names its own site
   there, and was served (a generation per page view, the response unread but the engine's time spent).
2. The API key. With one set, everything but /health needs it: the API, the tokenizer routes, the OpenAPI schema and
   docs pages, and /metrics unless `metrics_public`.
3. The body size. Past `max_body_bytes`: 413, from the Content-Length header before anything is read, or as the body
   arrives (chunked uploads).

A pure ASGI middleware, not Starlette's BaseHTTPMiddleware, which hides client disconnects from the routes (a
non-streaming request must notice its client leaving to abort its generation). Refusals are OpenAI-style errors,
counted in the metrics under their route's template.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .metrics import ServerMetrics, route_label
from .protocol import APIError
from .state import ServeOptions

OPEN_PATHS = ("/health",)


class BodyTooLarge(StarletteHTTPException):
    """Raised from inside the route's body read; FastAPI lets HTTPExceptions through to the app's handler."""

    code = "request_too_large"        # the error's `code`, as the Content-Length refusal has it

    def __init__(self, limit: int):
        super().__init__(413, f"the request body exceeds this server's limit of {limit} bytes")


def split_host(host: str) -> tuple[str, str | None]:
    """A Host header's (or an --allowed-hosts entry's) name and port: 'Example.COM:8000' -> ('example.com', '8000'),
    '[::1]:8000' -> ('::1', '8000'), '::1' (a bare IPv6 address) -> ('::1', None)."""
    host, port = host.strip().lower(), None
    if host.startswith("["):
        end = host.find("]")
        if end >= 0:
            host, port = host[1:end], host[end + 2:] if host[end + 1:end + 2] == ":" else None
    elif host.count(":") == 1:
        host, port = host.split(":")
    return host.rstrip("."), port or None


def host_name(host: str) -> str:
    """A Host header's name: 'Example.COM:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    return split_host(host)[0]


def origin_host(origin: str) -> tuple[str, str | None]:
    """An Origin header's host name and port: 'http://Example.com:8000' -> ('example.com', '8000'); '' for "null" (a
    sandboxed or file:// page) and anything that is not a URL, which no allow-list holds but `*`."""
    try:
        url = urlsplit(origin.strip())
        port = url.port
    except ValueError:
        return "", None
    return (url.hostname or "").rstrip("."), None if port is None else str(port)


def is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(name: str, allowed: tuple[str, ...] | None, port: str | None = None) -> bool:
    """Loopback names always; then the allow-list's names, `*.example.com` patterns, or `*` (anything). An entry with
    a port (`example.com:8000`, `[2001:db8::1]:8000`) matches only a Host naming that port (browsers leave out :80 and
    :443); the Host's port was stripped before the comparison, so such an entry matched nothing."""
    if is_loopback(name):
        return True
    for entry in allowed or ():
        pattern, want = split_host(entry)
        if want is not None and want != port:
            continue
        if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def default_allowed_hosts(bind_host: str, allowed: list[str] | None) -> tuple[str, ...] | None:
    """`dsv3 serve --host H [--allowed-hosts ...]`: the list if given (ValueError naming an entry no Host can match:
    a port that is not 1..65535, no name); else loopback only for a loopback bind, any Host for a server bound
    elsewhere (it is reached by whatever name its network gives it)."""
    for entry in allowed or ():
        name, port = split_host(entry)
        if not name or (port is not None and not (port.isdigit() and 0 < int(port) < 65536)):
            raise ValueError(f"--allowed-hosts: {entry!r} is not NAME, NAME:PORT or [IPv6]:PORT (port 1-65535)")
    if allowed:
        return tuple(allowed)
    return None if is_loopback(host_name(bind_host)) else ("*",)


class Guard:
    def __init__(self, app: ASGIApp, options: ServeOptions, metrics: ServerMetrics):
        self.app, self.options, self.metrics = app, options, metrics
        self._key = None if options.api_key is None else options.api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = self.refusal(scope)
        if error is not None:
            self.metrics.error(route_label(scope), error.status)
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            return await JSONResponse(error.body(), error.status, headers)(scope, receive, send)
        await self.app(scope, self.limited(receive), send)

    def refusal(self, scope: Scope) -> APIError | None:
        headers = Headers(scope=scope)
        host, allowed = headers.get("host"), self.options.allowed_hosts
        if host is not None and not host_allowed(split_host(host)[0], allowed, split_host(host)[1]):
            return APIError(f"the Host header {host!r} is not one this server answers to (loopback names, or "
                            f"--allowed-hosts)", 400, param="host", code="invalid_host")
        origin = headers.get("origin")
        if origin is not None and not host_allowed(origin_host(origin)[0], allowed, origin_host(origin)[1]):
            return APIError(f"the Origin {origin!r} is not one this server answers to (loopback origins, or "
                            f"--allowed-hosts): a web page of another site cannot use it", 403,
                            "permission_error", param="origin", code="invalid_origin")
        path = scope["path"]
        if self._key is not None and path not in OPEN_PATHS and not (self.options.metrics_public
                                                                     and path == "/metrics"):
            if not self.authorized(headers.get("authorization", "")):
                return APIError("invalid or missing API key", 401, "authentication_error")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.options.max_body_bytes:
            return APIError(str(BodyTooLarge(self.options.max_body_bytes).detail), 413, code=BodyTooLarge.code)
        return None

    def authorized(self, authorization: str) -> bool:
        """`Bearer KEY`, the scheme in any case (RFC 7235: `bearer KEY` is the same credential); the key compared in
        constant time."""
        scheme, _, token = authorization.strip().partition(" ")
        ok = hmac.compare_digest(token.strip().encode("latin-1"), self._key)     # the header's own bytes
        return ok and scheme.lower() == "bearer"

    def limited(self, receive: Receive) -> Receive:
        """`receive` that counts the body as it arrives (a chunked upload has no Content-Length to check)."""
        limit, seen = self.options.max_body_bytes, 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message
        return receive_limited
