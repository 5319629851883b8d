"""HTTP front door and encoder: a FastAPI app that encodes images in its own replica and calls the decoder.

    POST /v1/caption  image -> encoder (here) -> plan bytes -> decoder (handle call) -> {"caption", "plan_bytes",
                      "model", "timings_ms"}
    POST /v1/encode   image -> plan (application/octet-stream, model.codec wire format); no handle call
    POST /v1/decode   plan bytes -> {"caption", ...}   (a plan made on one machine, decoded on another)
    GET  /v1/model    K, D, dtype, plan size, fingerprint, source
    GET  /healthz     liveness, no auth, never waits for model work;  /docs and /openapi.json for the API

Every failure is an `ApiError` (or a framework error given the same shape) with a precise status and a JSON
body `{"error": code, "detail": message}` (serve/errors.py); the ingress and the decoder keep serving
afterwards. Overload is shed first in Serve's proxy (serve/proxy_gate.py: no hop to this replica, and the
proxy's own errors get the same JSON shape), then here: at most `max_inflight_requests` model requests per
ingress replica, the rest get 503 at once, with a Retry-After of the recent time an admitted request takes
(serve/admission.py). A decoder replica that dies mid-request is retried once on another replica (decoding
is idempotent), then answered with 503 + Retry-After (serve/stages.py).

The image is encoded where it arrives: this replica holds the encoder (serve.deployments.PlanEncoder) and
runs on an encoder node, so the only hop inside the app is the plan's, to a decoder node. A separate encoder
deployment cost a second handle call and ~10 ms a request more (benchmarks/RESULTS.md, the hop).
"""

# No `from __future__ import annotations` here: FastAPI must see the real parameter types through
# Serve's class-based-view rewrite of the route methods.
import contextlib
import copy
import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve import errors, page, stages
from serve.admission import Admission, AdmissionGate
from serve.bodies import multipart_file, read_body
from serve.deployments import MAX_TEMPERATURE, PlanEncoder
from serve.errors import ApiError

API_KEY_ENV = "VLJEPA_API_KEY"
PLAN_MEDIA_TYPE = "application/octet-stream"
MAX_NEW_TOKENS_CAP = 1024  # static bound until the model is known; /openapi.json then shows the model's own limit
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp")
# Image bodies may be raw (image/*, octet-stream, or no Content-Type) or a multipart upload.
_RAW_IMAGE_TYPES = ("application/octet-stream", "")


@dataclass(frozen=True)
class IngressSettings:
    """The ingress's share of the application args (see serve.app.AppArgs)."""

    api_key: str | None
    max_body_bytes: int
    request_timeout_s: float
    body_timeout_s: float
    max_inflight_requests: int
    retry_after_s: float
    default_max_new_tokens: int | None


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "a PNG, JPEG or WebP image: raw bytes, or a multipart/form-data upload in field `file`",
        "content": {
            **dict.fromkeys(IMAGE_MEDIA_TYPES, _BINARY),
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}
_PLAN_BODY = {
    "requestBody": {
        "required": True,
        "description": "plan bytes exactly as returned by /v1/encode",
        "content": {PLAN_MEDIA_TYPE: _BINARY},
    }
}

api = FastAPI(
    title="VL-JEPA captioner",
    version="1",
    description="Captions images through a compact latent plan: encoder -> plan bytes -> decoder deployment. "
    'Every error answers {"error": code, "detail": message}.',
    openapi_url=None,  # served by Ingress.openapi below, with the served model's own max_new_tokens bound
    docs_url=None,
    redoc_url=None,
)
errors.install(api)
# Model routes are admitted (or shed with a JSON 503) before FastAPI parses anything: serve/admission.py.
api.add_middleware(AdmissionGate, routes=("/v1/caption", "/v1/encode", "/v1/decode"))
api.include_router(page.router)  # GET /: the web page for people (serve/page.py)
_bearer = HTTPBearer(auto_error=False, description=f"API key, required on /v1 routes when set ({API_KEY_ENV})")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
Temperature = Annotated[
    float, Query(ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False, description="0 = greedy; below 1e-4 also greedy")
]
MaxNewTokens = Annotated[int | None, Query(ge=1, le=MAX_NEW_TOKENS_CAP, description="default: the model's limit")]
_CAPTION_ERRORS = errors.COMMON | errors.BODY | errors.OVERLOAD
_DECODE_ERRORS = errors.COMMON | errors.BODY | errors.PLAN | errors.OVERLOAD

# Module-level helpers come before the deployment class: @serve.deployment pickles the class right away,
# so names it uses must already exist.

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _public_model(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in ("name", "version", "fingerprint", "source")}


def _with_token_limit(schema: dict[str, Any], limit: int) -> dict[str, Any]:
    """A copy of the OpenAPI schema whose max_new_tokens parameters say the served model's limit."""
    schema = copy.deepcopy(schema)

    def patch(node: Any) -> None:
        if isinstance(node, dict):
            if "maximum" in node:
                node["maximum"] = limit
            for value in node.values():
                patch(value)
        elif isinstance(node, list):
            for value in node:
                patch(value)

    for operation in (op for path in schema.get("paths", {}).values() for op in path.values()):
        for parameter in operation.get("parameters", []):
            if parameter.get("name") == "max_new_tokens":
                patch(parameter.get("schema"))
    return schema


@serve.deployment(
    name="Ingress",
    # Cheap async slots: bodies trickle in and are shed here (max_inflight_requests) long before this fills,
    # so the proxy's own plain-text 503 is a last resort. serve/config.yaml sets the same values.
    max_ongoing_requests=1024,
    max_queued_requests=2048,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
    ray_actor_options={"num_cpus": 1},
    user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.0},  # the encoder's batching
)
@serve.ingress(api)
class Ingress:
    """HTTP + encoder: routes, admission and the encoder half; the decoder is a deployment of its own.

    Replicas scale by this deployment's autoscaling_config (HTTP and encoding together), the decoder by its
    own. Encoding work runs in threads (serve.deployments.PlanEncoder), so this event loop stays free for
    /healthz and admission while a batch computes.
    """

    def __init__(self, decoder: DeploymentHandle, settings: dict[str, Any], encoder: dict[str, Any]) -> None:
        self.encoder = PlanEncoder(**encoder)
        # Decoder calls over Serve's gRPC transport (the replicas' inter-deployment server), not actor calls
        # through the object store: the plan (8 KiB) and the caption are small, and a hop costs less
        # (benchmarks/RESULTS.md, the encoder -> decoder hop). Set here, since a handle's options travel
        # pickled from the process that builds the app; a replica lost mid-call is ActorUnavailableError.
        self.decoder = decoder.options(_by_reference=False)
        self.settings = IngressSettings(**settings)
        # An empty string means "no key" as well, so a blank env var cannot lock everyone out by accident.
        self.api_key = self.settings.api_key or os.environ.get(API_KEY_ENV) or None
        self._model: dict[str, Any] | None = None
        self.admission = Admission(self.settings.max_inflight_requests, self.settings.retry_after_s)
        api.state.admission = self.admission  # read by AdmissionGate (one Ingress per replica process)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """user_config is the encoder's batching (max_batch_size, batch_wait_timeout_s), applied live."""
        self.encoder.reconfigure(user_config)

    # ------------------------------------------------------------------ routes

    @api.get("/healthz", tags=["ops"])
    async def healthz(self) -> dict[str, str]:
        """Liveness: answered by the ingress without touching a model or the admission limit."""
        return {"status": "ok"}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> JSONResponse:
        schema = api.openapi()
        with contextlib.suppress(ApiError):  # no model yet: the static bound is still a valid schema
            schema = _with_token_limit(schema, int((await self._model_info())["max_new_tokens"]))
        return JSONResponse(schema)

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=f"{request.scope.get('root_path', '')}/openapi.json", title=api.title)

    @api.get("/v1/model", tags=["model"], responses=errors.COMMON | errors.OVERLOAD)
    async def model_info(self, credentials: Credentials) -> dict[str, Any]:
        """What is being served: plan geometry and wire size, checkpoint fingerprint, source."""
        self._authorize(credentials)
        return await self._model_info()

    @api.post("/v1/caption", tags=["caption"], openapi_extra=_IMAGE_BODY, responses=_CAPTION_ERRORS)
    async def caption(
        self,
        request: Request,
        credentials: Credentials,
        temperature: Temperature = 0.0,
        max_new_tokens: MaxNewTokens = None,
    ) -> dict[str, Any]:
        """An image (raw body or multipart field `file`) -> caption, plan size, model and per-stage timings."""
        start = time.perf_counter()
        self._authorize(credentials)
        info, max_new_tokens = await self._limits(max_new_tokens)
        image = await self._read_image(request)
        t0 = time.perf_counter()
        plan = await self._encode(image)
        t1 = time.perf_counter()
        text = await self._decode(plan, max_new_tokens, temperature)
        t2 = time.perf_counter()
        return {
            "caption": text,
            "plan_bytes": len(plan),
            "model": _public_model(info),
            "timings_ms": {
                "encode": round((t1 - t0) * 1e3, 3),
                "decode": round((t2 - t1) * 1e3, 3),
                "total": round((t2 - start) * 1e3, 3),
            },
        }

    @api.post(
        "/v1/encode",
        tags=["plan"],
        response_class=Response,
        openapi_extra=_IMAGE_BODY,
        responses={200: {"content": {PLAN_MEDIA_TYPE: {}}, "description": "the plan in the codec wire format"}}
        | _CAPTION_ERRORS,
    )
    async def encode(self, request: Request, credentials: Credentials) -> Response:
        """An image -> its latent plan (header + K x D payload), ready to ship to any decoder of the same model."""
        self._authorize(credentials)
        image = await self._read_image(request)
        plan = await self._encode(image)
        return Response(content=plan, media_type=PLAN_MEDIA_TYPE, headers={"X-Plan-Bytes": str(len(plan))})

    @api.post("/v1/decode", tags=["plan"], openapi_extra=_PLAN_BODY, responses=_DECODE_ERRORS)
    async def decode(
        self,
        request: Request,
        credentials: Credentials,
        temperature: Temperature = 0.0,
        max_new_tokens: MaxNewTokens = None,
    ) -> dict[str, Any]:
        """Plan bytes (as returned by /v1/encode) -> caption."""
        start = time.perf_counter()
        self._authorize(credentials)
        content_type = _media_type(request)
        if content_type not in (PLAN_MEDIA_TYPE, ""):
            raise ApiError(415, "unsupported_media_type", f"plans are sent as {PLAN_MEDIA_TYPE}, got {content_type}")
        info, max_new_tokens = await self._limits(max_new_tokens)
        plan = await self._read_body(request)
        if not plan:
            raise ApiError(400, "empty_body", "request body is empty: send the plan bytes from /v1/encode")
        t0 = time.perf_counter()
        text = await self._decode(plan, max_new_tokens, temperature)
        t1 = time.perf_counter()
        return {
            "caption": text,
            "plan_bytes": len(plan),
            "model": _public_model(info),
            "timings_ms": {"decode": round((t1 - t0) * 1e3, 3), "total": round((t1 - start) * 1e3, 3)},
        }

    # ------------------------------------------------------------------ helpers

    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self.api_key is None:
            return
        if credentials is None:
            raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'", _CHALLENGE)
        # Constant-time comparison: the key is a secret, response timing must not leak its prefix.
        if not hmac.compare_digest(credentials.credentials.encode(), self.api_key.encode()):
            raise ApiError(401, "unauthorized", "invalid API key", _CHALLENGE)

    async def _limits(self, max_new_tokens: int | None) -> tuple[dict[str, Any], int]:
        """The model info and the length limit checked against the model's."""
        info = await self._model_info()
        return info, self._check_max_new_tokens(max_new_tokens, info)

    async def _model_info(self) -> dict[str, Any]:
        if self._model is None:  # both halves come from one checkpoint; ask the decoder once and keep the answer
            dec = await self._call(self.decoder.info.remote, "decoder")
            self._model = {
                **self.encoder.info(),
                "decoder_fingerprint": dec["fingerprint"],
                "max_new_tokens": dec["max_new_tokens"],
            }
        return self._model

    def _check_max_new_tokens(self, requested: int | None, info: dict[str, Any]) -> int:
        limit = int(info["max_new_tokens"])
        if requested is None:
            return min(self.settings.default_max_new_tokens or limit, limit)
        if requested > limit:
            detail = f"max_new_tokens={requested} exceeds the model's limit of {limit}"
            raise ApiError(422, "max_new_tokens_out_of_range", detail)
        return requested

    async def _read_image(self, request: Request) -> bytes:
        """The image bytes of a raw or multipart body, after the media-type and size checks."""
        content_type = _media_type(request)
        raw_ok = content_type in _RAW_IMAGE_TYPES or content_type.startswith("image/")
        if not raw_ok and content_type != "multipart/form-data":
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type {content_type} is not an image: send image/* bytes or multipart/form-data with 'file'",
            )
        body = await self._read_body(request)
        if content_type == "multipart/form-data":
            body = multipart_file(body, request.headers["content-type"])
        if not body:
            raise ApiError(400, "empty_body", "no image bytes in the request")
        return body

    async def _read_body(self, request: Request) -> bytes:
        return await read_body(request, self.settings.max_body_bytes, self.settings.body_timeout_s)

    async def _encode(self, image: bytes) -> bytes:
        return await stages.encode(self.encoder, image, self.settings.request_timeout_s)

    async def _decode(self, plan: bytes, max_new_tokens: int, temperature: float) -> str:
        return await self._call(lambda: self.decoder.decode.remote(plan, max_new_tokens, temperature), "decoder")

    async def _call(self, make: Callable[[], DeploymentResponse], stage: str) -> Any:
        return await stages.call(make, stage, self.settings.request_timeout_s, self.settings.retry_after_s)
