"""The Serve application builder: `serve run serve/config.yaml`, `serve deploy`, or `serve.run(build_app(args))`.

    Ingress (FastAPI) --handle--> PlanEncoder (image -> plan bytes)
                      --handle--> PlanDecoder (plan bytes -> caption)

`args` is the `args:` mapping of the application in the Serve config. It is validated here (unknown keys and
out-of-range values are errors at deploy time, not at the first request). Replica counts, CPUs/GPUs, queue
bounds and batch sizes belong to the config's `deployments:` section, where Serve applies them per deployment;
`deployment_options` below is the same thing for programmatic `serve.run` callers, who have no config file.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt
from ray import serve
from ray.serve import Application

from model.transform import MAX_PIXELS
from serve.deployments import PlanDecoder, PlanEncoder
from serve.ingress import Ingress

DEFAULT_MODEL = "models:/vl-jepa-captioner@champion"
DEPLOYMENT_NAMES = ("Ingress", "PlanEncoder", "PlanDecoder")


class AppArgs(BaseModel):
    """Application arguments (`args:` in serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_MODEL, min_length=1, description="checkpoint file/folder, models:/ or runs:/ URI")
    mlflow_tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI")
    api_key: str | None = Field(None, description="bearer token for /v1 routes; default: $VLJEPA_API_KEY")
    max_body_bytes: PositiveInt = 8 * 1024 * 1024
    max_pixels: PositiveInt = Field(MAX_PIXELS, description="decompression-bomb guard, checked before decoding")
    request_timeout_s: PositiveFloat = 30.0
    retry_after_s: PositiveFloat = Field(1.0, description="Retry-After on 503 when a queue is full")
    plan_dtype: Literal["fp16", "int8", "int4", "int3", "int2"] = "fp16"
    default_max_new_tokens: PositiveInt | None = Field(None, description="default: the model's text length limit")
    torch_threads: int = Field(0, ge=0, description="intra-op threads per model replica; 0 = torch default")
    deployment_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-deployment .options() for serve.run users, keyed by deployment name"
    )


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """Bind the three deployments into one application."""
    opts = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    unknown = sorted(set(opts.deployment_options) - set(DEPLOYMENT_NAMES))
    if unknown:
        raise ValueError(f"deployment_options for unknown deployment(s) {unknown}; valid: {list(DEPLOYMENT_NAMES)}")

    def configured(deployment: serve.Deployment) -> serve.Deployment:
        extra = opts.deployment_options.get(deployment.name)
        return deployment.options(**extra) if extra else deployment

    model_args = {"source": opts.model, "tracking_uri": opts.mlflow_tracking_uri, "torch_threads": opts.torch_threads}
    encoder = configured(PlanEncoder).bind(**model_args, max_pixels=opts.max_pixels, plan_dtype=opts.plan_dtype)
    decoder = configured(PlanDecoder).bind(**model_args)
    settings = {
        "api_key": opts.api_key,
        "max_body_bytes": opts.max_body_bytes,
        "request_timeout_s": opts.request_timeout_s,
        "retry_after_s": opts.retry_after_s,
        "default_max_new_tokens": opts.default_max_new_tokens,
    }
    return configured(Ingress).bind(encoder, decoder, settings)
