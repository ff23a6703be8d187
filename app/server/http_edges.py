"""HTTP edge rules applied before any other middleware reads the path or the body (plain ASGI).

Semantics:
* One spelling per path: a path with a control character (`%0A` decodes to one: Starlette's route regexes end
  in `$`, which matches before a trailing newline), a `.`/`..` segment or a trailing slash is answered 404 here,
  so the route policy (app/server/route_policy.py: key check, body limits), the logs and the routers see one
  spelling and agree on which route a request is for. Empty segments (`//`) pass: `/v1/models/{id}`
  takes model ids that are absolute directories; the routers match them literally (no route begins with `//`)
  and a path no route serves needs an API key (its route policy).
* `Content-Length` together with `Transfer-Encoding` (a request-smuggling shape, RFC 9112 section 6.3) is refused
  with 400 and `Connection: close`: the connection is not reused.
* HEAD is answered wherever GET is: the GET route runs and its body is dropped (headers, Content-Length included,
  are the GET's), as Starlette's own routes do.
"""
from __future__ import annotations

import re

from app.server.auth import send_error

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def canonical_path(path: str) -> bool:
    """True for a path spelled the one way the routes are declared."""
    if not path.startswith("/") or _CONTROL.search(path):
        return False
    if path == "/":
        return True
    segments = path[1:].split("/")
    return not path.endswith("/") and all(segment not in (".", "..") for segment in segments)


class HttpEdgeMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not canonical_path(scope.get("path", "")):
            return await send_error(send, scope, 404, "no route for this path (paths have one spelling: no "
                                                      "control character, trailing slash, '.' or '..' segment)")
        names = {name.lower() for name, _ in scope.get("headers") or []}
        if b"content-length" in names and b"transfer-encoding" in names:
            return await send_error(send, scope, 400, "Content-Length together with Transfer-Encoding is refused",
                                    [(b"connection", b"close")])
        if scope.get("method") == "HEAD":
            return await self.app({**scope, "method": "GET"}, receive, _drop_body(send))
        return await self.app(scope, receive, send)


def _drop_body(send):
    async def send_headers_only(message):
        if message["type"] == "http.response.body":
            if message.get("more_body", False):
                return
            message = {"type": "http.response.body", "body": b""}
        await send(message)
    return send_headers_only
