"""HTTP front door: a FastAPI app whose routes call the encoder and decoder through deployment handles.

    POST /v1/caption  image -> encoder -> plan bytes -> decoder -> {"caption", "plan_bytes", "model", "timings_ms"}
    POST /v1/encode   image -> plan (application/octet-stream, model.codec wire format)
    POST /v1/decode   plan bytes -> {"caption", ...}   (a plan made on one machine, decoded on another)
    GET  /v1/model    K, D, dtype, plan size, fingerprint, source
    GET  /healthz     liveness, no auth;  /docs and /openapi.json come from FastAPI

Every failure the client can fix is an `ApiError` with a precise status and a JSON body
`{"error": code, "detail": message}`; the ingress and both deployments keep serving afterwards.
"""

# No `from __future__ import annotations` here: FastAPI must see the real parameter types through
# Serve's class-based-view rewrite of the route methods.
import asyncio
import email.parser
import email.policy
import hmac
import os
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from model.codec import PlanError, PlanFingerprintError
from model.transform import ImageDecodeError
from serve import page
from serve.deployments import ParameterError

API_KEY_ENV = "VLJEPA_API_KEY"
PLAN_MEDIA_TYPE = "application/octet-stream"
MAX_TEMPERATURE = 2.0
MAX_NEW_TOKENS_CAP = 1024  # static bound for the OpenAPI schema; the model's own limit is checked per request
# Image bodies may be raw (any image/* or octet-stream, or no Content-Type) or a multipart upload.
_RAW_IMAGE_TYPES = ("application/octet-stream", "")
# ImageDecodeError.reason -> HTTP status: the pixel guard is a size limit (413), an unmappable pixel format is a
# media type we do not support (415), everything else is a malformed body (400).
_IMAGE_STATUS = {"too_many_pixels": 413, "unsupported_mode": 415}


class ApiError(Exception):
    """A client-visible failure: HTTP status, a short machine-readable code and a human message."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


@dataclass(frozen=True)
class IngressSettings:
    """The ingress's share of the application args (see serve.app.AppArgs)."""

    api_key: str | None
    max_body_bytes: int
    request_timeout_s: float
    retry_after_s: float
    default_max_new_tokens: int | None


api = FastAPI(
    title="VL-JEPA captioner",
    version="1",
    description="Captions images through a compact latent plan: encoder deployment -> plan bytes -> decoder.",
)
api.include_router(page.router)  # GET /: the web page for people (serve/page.py)
_bearer = HTTPBearer(auto_error=False, description=f"API key, required on /v1 routes when set ({API_KEY_ENV})")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
Temperature = Annotated[float, Query(ge=0.0, le=MAX_TEMPERATURE, description="0 = greedy")]
MaxNewTokens = Annotated[int | None, Query(ge=1, le=MAX_NEW_TOKENS_CAP, description="default: the model's limit")]


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)


# Module-level helpers come before the deployment class: @serve.deployment pickles the class right away,
# so names it uses must already exist.

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def _resolve(response: DeploymentResponse) -> Any:
    return await response


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, int(-(-seconds // 1))))}  # whole seconds, rounded up, at least 1


def _client_error(cause: BaseException | None) -> ApiError | None:
    """The ApiError for a replica exception the client caused, or None for a server fault."""
    if isinstance(cause, ImageDecodeError):
        status = _IMAGE_STATUS.get(cause.reason, 400)
        return ApiError(status, cause.reason, f"image rejected ({cause.reason}): {cause.detail or cause}")
    if isinstance(cause, PlanFingerprintError):
        return ApiError(409, "plan_fingerprint_mismatch", f"plan was made by another model: {cause}")
    if isinstance(cause, PlanError):
        return ApiError(422, "invalid_plan", f"plan rejected: {cause}")
    if isinstance(cause, ParameterError):
        return ApiError(422, "invalid_parameter", str(cause))
    return None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _multipart_file(body: bytes, content_type: str) -> bytes:
    """The payload of the `file` (or `image`, or first file) part of a multipart/form-data body."""
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", errors="replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        raise ApiError(400, "bad_multipart", "multipart/form-data body has no parts (missing or wrong boundary?)")
    parts = list(message.iter_parts())
    for want in ("file", "image", None):
        for part in parts:
            name = part.get_param("name", header="content-disposition")
            if name == want or (want is None and part.get_filename()):
                return part.get_payload(decode=True) or b""
    raise ApiError(400, "missing_file", "multipart/form-data body has no 'file' field")


def _public_model(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in ("name", "version", "fingerprint", "source")}


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=256,
    # A full ingress queue is answered by the proxy itself: 503 with Retry-After, never unbounded latency.
    max_queued_requests=512,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
    ray_actor_options={"num_cpus": 0.1},
)
@serve.ingress(api)
class Ingress:
    """Routes only: no model weights here, so it scales independently of both model halves."""

    def __init__(self, encoder: DeploymentHandle, decoder: DeploymentHandle, settings: dict[str, Any]) -> None:
        self.encoder, self.decoder = encoder, decoder
        self.settings = IngressSettings(**settings)
        # An empty string means "no key" as well, so a blank env var cannot lock everyone out by accident.
        self.api_key = self.settings.api_key or os.environ.get(API_KEY_ENV) or None
        self._model: dict[str, Any] | None = None

    # ------------------------------------------------------------------ routes

    @api.get("/healthz", tags=["ops"])
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/model", tags=["model"])
    async def model_info(self, credentials: Credentials) -> dict[str, Any]:
        """What is being served: plan geometry and wire size, checkpoint fingerprint, source."""
        self._authorize(credentials)
        return await self._model_info()

    @api.post("/v1/caption", tags=["caption"])
    async def caption(
        self,
        request: Request,
        credentials: Credentials,
        temperature: Temperature = 0.0,
        max_new_tokens: MaxNewTokens = None,
    ) -> dict[str, Any]:
        """An image (raw body or multipart field `file`) -> caption, plan size, model and per-stage timings."""
        start = time.perf_counter()
        info, max_new_tokens = await self._admit(credentials, max_new_tokens)
        image = await self._read_image(request)
        t0 = time.perf_counter()
        plan = await self._call(self.encoder.encode.remote(image), "encoder")
        t1 = time.perf_counter()
        text = await self._call(self.decoder.decode.remote(plan, max_new_tokens, temperature), "decoder")
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
        responses={200: {"content": {PLAN_MEDIA_TYPE: {}}, "description": "the plan in the codec wire format"}},
    )
    async def encode(self, request: Request, credentials: Credentials) -> Response:
        """An image -> its latent plan (header + K x D payload), ready to ship to any decoder of the same model."""
        self._authorize(credentials)
        image = await self._read_image(request)
        plan = await self._call(self.encoder.encode.remote(image), "encoder")
        return Response(content=plan, media_type=PLAN_MEDIA_TYPE, headers={"X-Plan-Bytes": str(len(plan))})

    @api.post("/v1/decode", tags=["plan"])
    async def decode(
        self,
        request: Request,
        credentials: Credentials,
        temperature: Temperature = 0.0,
        max_new_tokens: MaxNewTokens = None,
    ) -> dict[str, Any]:
        """Plan bytes (as returned by /v1/encode) -> caption."""
        start = time.perf_counter()
        info, max_new_tokens = await self._admit(credentials, max_new_tokens)
        content_type = _media_type(request)
        if content_type not in (PLAN_MEDIA_TYPE, ""):
            raise ApiError(415, "unsupported_media_type", f"plans are sent as {PLAN_MEDIA_TYPE}, got {content_type}")
        plan = await self._read_body(request)
        if not plan:
            raise ApiError(400, "empty_body", "request body is empty: send the plan bytes from /v1/encode")
        t0 = time.perf_counter()
        text = await self._call(self.decoder.decode.remote(plan, max_new_tokens, temperature), "decoder")
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

    async def _admit(
        self, credentials: HTTPAuthorizationCredentials | None, max_new_tokens: int | None
    ) -> tuple[dict[str, Any], int]:
        """The checks every captioning route starts with: the API key, then the length limit against the model."""
        self._authorize(credentials)
        info = await self._model_info()
        return info, self._check_max_new_tokens(max_new_tokens, info)

    async def _model_info(self) -> dict[str, Any]:
        if self._model is None:  # both halves come from one checkpoint; ask each once and keep the answer
            enc = await self._call(self.encoder.info.remote(), "encoder")
            dec = await self._call(self.decoder.info.remote(), "decoder")
            self._model = {**enc, "decoder_fingerprint": dec["fingerprint"], "max_new_tokens": dec["max_new_tokens"]}
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
            body = _multipart_file(body, request.headers["content-type"])
        if not body:
            raise ApiError(400, "empty_body", "no image bytes in the request")
        return body

    async def _read_body(self, request: Request) -> bytes:
        """The body, refusing (413) as soon as it is known to exceed the limit: no unbounded buffering."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "body_too_large", f"body of {int(declared)} bytes exceeds the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body_too_large", f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _call(self, response: DeploymentResponse, stage: str) -> Any:
        """Await a handle call with the request timeout, mapping replica errors to client-visible ones."""
        try:
            return await asyncio.wait_for(_resolve(response), timeout=self.settings.request_timeout_s)
        except TimeoutError:
            response.cancel()
            detail = f"{stage} did not answer within {self.settings.request_timeout_s:g} s"
            raise ApiError(504, "timeout", detail) from None
        except BackPressureError as exc:
            retry = exc.retry_after_s if exc.retry_after_s is not None else self.settings.retry_after_s
            raise ApiError(503, "overloaded", f"{stage} queue is full; retry later", _retry_after(retry)) from None
        except DeploymentUnavailableError as exc:
            retry = _retry_after(self.settings.retry_after_s)
            raise ApiError(503, "unavailable", f"{stage} is unavailable: {exc}", retry) from None
        except RayTaskError as exc:
            raise _client_error(exc.cause) or exc from None
        except (ImageDecodeError, PlanError, ParameterError) as exc:  # raised in-process (local testing mode)
            raise _client_error(exc) from None
