"""The Serve application builder: `serve run serve/config.yaml`, `serve deploy`, or `serve.run(build_app(args))`.

    Ingress (FastAPI + the encoder: image -> plan bytes) --handle--> PlanDecoder (plan bytes -> caption)

Two deployments, each scaled on its own: the Ingress on encoder nodes (HTTP, admission and encoding in one
replica, so the image never makes a hop), the PlanDecoder on decoder nodes.

`args` is the `args:` mapping of the application in the Serve config. It is validated here (unknown keys and
out-of-range values are errors at deploy time, not at the first request). Replica counts, CPUs/GPUs, queue
bounds and batch sizes belong to the config's `deployments:` section, where Serve applies them per deployment;
`deployment_options` below is the same thing for programmatic `serve.run` callers; `shipped_config()` turns
serve/config.yaml into both (HTTP options, app args with its deployments), so `serve.demo` and the tests run
the exact configuration that `serve run serve/config.yaml` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt
from ray import serve
from ray.serve import Application

from jobs.checkpoints import is_mlflow_uri, resolve_tracking_uri
from serve.deployments import PlanDecoder
from serve.ingress import Ingress

DEFAULT_MODEL = "models:/vl-jepa-captioner@champion"
DEPLOYMENT_NAMES = ("Ingress", "PlanDecoder")  # Ingress: HTTP + encoder
CONFIG_PATH = Path(__file__).resolve().parent / "config.yaml"
# The model reads 32-64 px squares; 4096 x 4096 still takes a 16 MP photo whole, and caps one decode at
# ~50 MB of RGB (plus ~4 bytes a pixel transiently for 16-bit input), times max_concurrent_decodes per replica.
SERVE_MAX_PIXELS = 4096 * 4096


class AppArgs(BaseModel):
    """Application arguments (`args:` in serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_MODEL, min_length=1, description="checkpoint file/folder, models:/ or runs:/ URI")
    mlflow_tracking_uri: str | None = Field(
        None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (as jobs.evaluate)"
    )
    api_key: str | None = Field(None, description="bearer token for /v1 routes; default: $VLJEPA_API_KEY")
    max_body_bytes: PositiveInt = 8 * 1024 * 1024
    max_pixels: PositiveInt = Field(SERVE_MAX_PIXELS, description="decompression-bomb guard, checked before decoding")
    max_concurrent_decodes: PositiveInt = Field(2, description="image decodes at once per encoder replica")
    request_timeout_s: PositiveFloat = Field(20.0, description="per model stage (encode, decode); else 504")
    body_timeout_s: PositiveFloat = Field(10.0, description="whole request body must arrive within this (else 408)")
    max_inflight_requests: PositiveInt = Field(64, description="model requests per ingress replica; beyond: 503")
    retry_after_s: PositiveFloat = Field(1.0, description="Retry-After on 503 when at capacity or a replica is down")
    plan_dtype: Literal["fp16", "int8", "int4", "int3", "int2"] = "fp16"
    default_max_new_tokens: PositiveInt | None = Field(None, description="default: the model's text length limit")
    torch_threads: int = Field(0, ge=0, description="intra-op threads per model replica; 0 = torch default")
    deployment_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-deployment .options() for serve.run users, keyed by deployment name"
    )


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """Bind the two deployments into one application."""
    opts = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    unknown = sorted(set(opts.deployment_options) - set(DEPLOYMENT_NAMES))
    if unknown:
        raise ValueError(f"deployment_options for unknown deployment(s) {unknown}; valid: {list(DEPLOYMENT_NAMES)}")

    def configured(deployment: serve.Deployment) -> serve.Deployment:
        extra = opts.deployment_options.get(deployment.name)
        return deployment.options(**extra) if extra else deployment

    model_args, settings, encoder = replica_args(opts)
    decoder = configured(PlanDecoder).bind(**model_args)
    return configured(Ingress).bind(decoder, settings, encoder)


def replica_args(opts: AppArgs) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(the decoder's model args, the Ingress's settings, the Ingress's encoder args) for these app args."""
    # Resolved here, once: every replica then reads the same store, whatever directory it runs in.
    tracking_uri = resolve_tracking_uri(opts.mlflow_tracking_uri) if is_mlflow_uri(opts.model) else None
    model_args = {"source": opts.model, "tracking_uri": tracking_uri, "torch_threads": opts.torch_threads}
    encoder = {
        **model_args,
        "max_pixels": opts.max_pixels,
        "plan_dtype": opts.plan_dtype,
        "max_concurrent_decodes": opts.max_concurrent_decodes,
    }
    settings = {
        "api_key": opts.api_key,
        "max_body_bytes": opts.max_body_bytes,
        "request_timeout_s": opts.request_timeout_s,
        "body_timeout_s": opts.body_timeout_s,
        "max_inflight_requests": opts.max_inflight_requests,
        "retry_after_s": opts.retry_after_s,
        "default_max_new_tokens": opts.default_max_new_tokens,
    }
    return model_args, settings, encoder


@dataclass(frozen=True)
class ShippedConfig:
    """serve/config.yaml in the two forms a programmatic caller needs."""

    http_options: dict[str, Any]  # for serve.start(http_options=...)
    proxy_location: str  # for serve.start(proxy_location=...)
    controller_options: dict[str, Any]  # for serve.start(controller_options=...): the proxies' gate (proxy_gate.py)
    app_args: dict[str, Any]  # for build_app(...): the app's args plus its deployments as deployment_options
    route_prefix: str
    name: str


def shipped_config(path: Path = CONFIG_PATH, **overrides: Any) -> ShippedConfig:
    """Read the Serve config file; `overrides` replace app args (model=..., mlflow_tracking_uri=...)."""
    config = yaml.safe_load(Path(path).read_text())
    (app,) = config["applications"]
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}
    args = {**app.get("args", {}), **overrides}
    args["deployment_options"] = {**options, **args.get("deployment_options", {})}
    return ShippedConfig(
        http_options=dict(config.get("http_options", {})),
        proxy_location=str(config.get("proxy_location", "HeadOnly")),
        controller_options=dict(config.get("controller_options", {})),
        app_args=args,
        route_prefix=app.get("route_prefix", "/"),
        name=app["name"],
    )
