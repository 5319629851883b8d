"""Admission and error shapes at Serve's HTTP proxy, before a request costs the ingress anything.

Serve's proxy hands every request to the ingress replica through a deployment handle and streams the
answer back: ~3-5 ms of CPU for the two processes together, even for a request the ingress sheds at
once. Under a burst of 600 on 2 cores that hop, not the model, took the CPU the admitted work needed
(benchmarks/RESULTS.md, "Overload and faults"). So the proxy sheds first:

  ProxyGate   POST to a model route beyond `limit` in progress through this proxy: the JSON 503 with
              Retry-After at once (serve/admission.py, the ingress's own rule), no handle call made;
  JsonErrors  the proxy's own error answers (503 from a full Serve queue or an unavailable deployment,
              408 at its request timeout, 404 for no application, 500) are text/plain in Ray 2.60: they
              become `{"error", "detail"}` like every other error, and a 503 always carries Retry-After.

Serve installs them through its documented hook, read by each proxy process when it starts:
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.proxy_gate:middlewares, with the limit in
VLJEPA_PROXY_MAX_INFLIGHT (unset or 0: no admission here, errors are still reshaped). serve/config.yaml
sets both under `controller_options` (Serve's proxies inherit the controller's environment);
serve.app.shipped_config passes them to serve.start. GET routes (/healthz, the page) are never shed: health
checks stay independent of the model queue. The ingress keeps its own gate for requests that reach it
through another proxy.
"""

from __future__ import annotations

import json
import os

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.admission import Admission, AdmissionGate
from serve.errors import HTTP_ERROR_CODES, retry_after

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve.proxy_gate:middlewares"
LIMIT_ENV = "VLJEPA_PROXY_MAX_INFLIGHT"
RETRY_AFTER_ENV = "VLJEPA_PROXY_RETRY_AFTER_S"
MODEL_ROUTES = ("/v1/caption", "/v1/encode", "/v1/decode")


def proxy_env(limit: int, retry_after_s: float) -> dict[str, str]:
    """The environment that installs these middlewares in Serve's proxies (for controller_options)."""
    return {CALLBACK_ENV: CALLBACK, LIMIT_ENV: str(limit), RETRY_AFTER_ENV: f"{retry_after_s:g}"}


def middlewares() -> list[Middleware]:
    """Serve's proxy callback: JsonErrors inside, then the ProxyGate (when a limit is set) outermost."""
    limit = int(os.environ.get(LIMIT_ENV) or 0)
    floor_s = float(os.environ.get(RETRY_AFTER_ENV) or 1)
    stack = [Middleware(JsonErrors, retry_after_s=floor_s)]
    if limit > 0:
        admission = Admission(limit, floor_s, where="proxy")
        stack.append(Middleware(AdmissionGate, routes=MODEL_ROUTES, admission=admission))
    return stack


class JsonErrors:
    """Rewrites a text/plain error answer (status >= 400) into the JSON error body; others pass untouched."""

    def __init__(self, app: ASGIApp, retry_after_s: float = 1.0) -> None:
        self.app, self.retry_after = app, retry_after(retry_after_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # the response start of a plain-text error, sent once the body is complete
        chunks: list[bytes] = []

        async def reshape(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if headers.get(b"content-type", b"").startswith(b"text/plain"):
                    held = message
                    return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            await self._send_json(held, b"".join(chunks).decode("utf-8", "replace").strip(), send)

        await self.app(scope, receive, reshape)

    async def _send_json(self, start: Message, text: str, send: Send) -> None:
        status = int(start["status"])
        kept = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        names = {k.lower() for k, _ in kept}
        code = HTTP_ERROR_CODES.get(status, f"http_{status}")
        if status == 503:
            if b"retry-after" in names:
                code = "overloaded"  # a full Serve queue (backpressure) says when to come back
            else:
                kept += [(k.lower().encode(), v.encode()) for k, v in self.retry_after.items()]
        body = json.dumps({"error": code, "detail": text or f"HTTP {status}"}).encode()
        kept += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": kept})
        await send({"type": "http.response.body", "body": body})
