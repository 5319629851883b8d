"""One model stage of a request, as the ingress runs it: encoding in its own replica, decoding by handle call.

Both stages answer within the request timeout (else a JSON 504) and turn their outcomes into client-visible
ones: a `Rejected` value into its status (413/415/409/422/400), a full decoder queue into 503 "overloaded",
and a decoder replica that died mid-request into one retry on another replica (decoding is idempotent),
then 503 + Retry-After. The encoder runs in the ingress replica itself (serve.deployments.PlanEncoder), so
only the decoder is a hop: the plan's codec bytes cross, over Serve's gRPC transport.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentResponse

from serve.deployments import PlanEncoder, Rejected
from serve.errors import ApiError, retry_after

log = logging.getLogger("ray.serve")
# Rejected.reason -> HTTP status: the pixel guard is a size limit (413), a pixel format or image format we
# do not take is an unsupported media type (415), a plan from another model a conflict (409), a bad plan or
# parameter 422, everything else (empty, not an image, truncated, corrupt) a malformed body (400).
REJECTED_STATUS = {
    "too_many_pixels": 413,
    "unsupported_mode": 415,
    "unsupported_format": 415,
    "plan_fingerprint_mismatch": 409,
    "invalid_plan": 422,
    "invalid_parameter": 422,
}


def checked(result: Any) -> Any:
    """A stage's result, or the ApiError for a request the client must fix."""
    if isinstance(result, Rejected):
        raise ApiError(REJECTED_STATUS.get(result.reason, 400), result.reason, result.detail)
    return result


async def encode(encoder: PlanEncoder, image: bytes, timeout_s: float) -> bytes:
    """Image bytes -> plan bytes in this replica (decode in a thread, batched forward in a thread)."""
    try:
        return checked(await asyncio.wait_for(encoder.encode(image), timeout=timeout_s))
    except TimeoutError:
        raise ApiError(504, "timeout", f"encoder did not answer within {timeout_s:g} s") from None


def replica_gone(exc: BaseException) -> bool:
    """A replica died or is unreachable (not a bug in the request): worth one retry elsewhere."""
    if isinstance(exc, RayTaskError):
        return isinstance(exc.cause, RayActorError)
    return isinstance(exc, RayActorError)


async def _resolve(response: DeploymentResponse) -> Any:
    return await response


async def call(make: Callable[[], DeploymentResponse], stage: str, timeout_s: float, retry_after_s: float) -> Any:
    """Await a handle call within `timeout_s`; map the replica's outcomes to client-visible ones.

    A replica that died or became unreachable mid-request is retried once (the router picks a live
    replica), then answered with 503 + Retry-After.
    """
    deadline = time.monotonic() + timeout_s
    unavailable = retry_after(retry_after_s)
    for attempt in (1, 2):
        response = make()
        try:
            result = await asyncio.wait_for(_resolve(response), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            response.cancel()
            raise ApiError(504, "timeout", f"{stage} did not answer within {timeout_s:g} s") from None
        except BackPressureError as exc:
            retry = exc.retry_after_s if exc.retry_after_s is not None else retry_after_s
            raise ApiError(503, "overloaded", f"{stage} queue is full; retry later", retry_after(retry)) from None
        except DeploymentUnavailableError as exc:
            raise ApiError(503, "unavailable", f"{stage} is unavailable: {exc}", unavailable) from None
        except Exception as exc:
            if not replica_gone(exc):
                raise
            if attempt == 1:
                log.info("%s replica lost mid-request (%s); retrying once", stage, type(exc).__name__)
                continue
            detail = f"{stage} replica unavailable ({type(exc).__name__}); retry shortly"
            raise ApiError(503, "unavailable", detail, unavailable) from None
        return checked(result)
    raise AssertionError("unreachable")
