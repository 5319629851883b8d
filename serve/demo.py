"""The README demo's second half: serve the model `python -m jobs.demo` just trained and caption over HTTP.

    python -m serve.demo [--run demo_out/LAST_RUN.json] [--port 8000] [--keep]

1. reads LAST_RUN.json (registered model URI, MLflow tracking URI, a held-out image);
2. starts Ray (joins $RAY_ADDRESS if set, else a fresh local instance) and Serve on 127.0.0.1;
3. deploys the captioner from the models:/NAME@ALIAS URI with serve/config.yaml's settings (HTTP options,
   app args, replicas and queues): one configuration, whether started here or by `serve run`;
4. captions the held-out image over HTTP and prints the caption, the plan size and per-stage timings;
5. prints the curl commands for the routes; with --keep it stays up until Ctrl-C, else it shuts down.

The request timeout it prints is the running proxy's own (asked of the proxy actor), so a Serve that was
already running with other HTTP options (serve.start then keeps them) is reported, not papered over.
On exit a local instance started here is stopped whole (`ray.shutdown()`, Serve with it); on a joined
cluster only this app is deleted, since that cluster's Serve may host other applications.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

APP_NAME = "captioner"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="demo_out/LAST_RUN.json", help="written by python -m jobs.demo")
    parser.add_argument("--model", default=None, help="serve this model source instead of the run's model_uri")
    parser.add_argument("--image", default=None, help="caption this image instead of the run's held-out image")
    parser.add_argument("--host", default=None, help="bind address (default: serve/config.yaml's, loopback)")
    parser.add_argument("--port", type=int, default=None, help="default: serve/config.yaml's")
    parser.add_argument("--keep", action="store_true", help="keep serving until Ctrl-C")
    parser.add_argument("--verbose", action="store_true", help="show Ray, Serve and replica output here too")
    args = parser.parse_args(argv)

    run_file = Path(args.run)
    if not run_file.is_file():
        print(f"serve.demo: {run_file} not found; run `python -m jobs.demo` first", file=sys.stderr)
        return 2
    run = json.loads(run_file.read_text())
    model = args.model or run.get("model_uri") or run.get("checkpoint")
    image_path = Path(args.image or run.get("held_out_image") or run.get("heldout_image") or "")
    if not model:
        print(f"serve.demo: {run_file} names no model_uri", file=sys.stderr)
        return 2
    if not image_path.is_file():
        print(f"serve.demo: held-out image {image_path} not found (pass --image PATH)", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from jobs import console
    from jobs.runtime import ensure_ray
    from serve.app import build_app, shipped_config

    console.setup_once("serve-demo", verbose=args.verbose, log_dir=run_file.parent / "logs")

    config = shipped_config(model=model, mlflow_tracking_uri=run.get("tracking_uri"))
    http_options = {**config.http_options}
    http_options.update({k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    # ensure_ray starts a local instance unless it joins $RAY_ADDRESS or a Ray already connected here.
    owns_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS", "").strip()
    print(f"== starting Ray: {ensure_ray(resources=local_resources(config.app_args))}")
    host = http_options.get("host", "127.0.0.1")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{http_options.get('port', 8000)}"
    print(f"== serving {model} at {url}")
    serve.start(
        proxy_location=config.proxy_location,
        http_options=http_options,
        controller_options=config.controller_options,  # the proxy gate (serve/proxy_gate.py)
    )
    console.hush()  # Serve gives its driver-side logger a console handler when it starts
    serve.run(build_app(config.app_args), name=APP_NAME, route_prefix=config.route_prefix, blocking=False)
    try:
        api_key = os.environ.get("VLJEPA_API_KEY") or None
        result = caption_file(url, image_path, api_key)
        reference = reference_caption(run, image_path)
        print(f"\nheld-out image: {image_path}")
        if reference:
            print(f"reference:      {reference}")
        print(f"caption:        {result['caption']}")
        print(f"plan size:      {result['plan_bytes']} bytes (K x D latent plan in the codec wire format)")
        model_info = result["model"]
        print(f"model:          {model_info['name']} v{model_info['version']} ({model_info['fingerprint']})")
        print(f"timings (ms):   {result['timings_ms']}")
        report_proxy_timeout(config.http_options.get("request_timeout_s"))
        print_usage(url, image_path, api_key, keep=args.keep)
        if args.keep:
            wait_for_ctrl_c()
    finally:
        # serve.shutdown() waits on a controller call that ends by the controller killing itself, and Ray
        # reports that pending call as "(raylet) Task ServeController.graceful_shutdown failed" on the
        # console; stopping our own instance takes Serve down with it, without that line.
        if owns_ray:
            ray.shutdown()
        else:
            serve.delete(APP_NAME)
    return 0


def proxy_request_timeouts() -> list[float | None]:
    """request_timeout_s of every running Serve HTTP proxy, as each proxy actor holds it (None: no timeout)."""
    import ray
    from ray.serve._private.constants import SERVE_PROXY_NAME

    proxies = [
        ray.get_actor(actor["name"], namespace=actor["namespace"])
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(SERVE_PROXY_NAME)
    ]
    return [ray.get(proxy._get_http_options.remote(), timeout=30).request_timeout_s for proxy in proxies]


def report_proxy_timeout(configured: float | None) -> None:
    """Print the proxies' request timeout next to serve/config.yaml's; say so on stderr when they differ."""

    def shown(t: float | None) -> str:
        return "none" if t is None else f"{t:g} s"

    running = set(proxy_request_timeouts())
    print(f"proxy timeout:  {', '.join(sorted(map(shown, running))) or 'no proxy'} (config: {shown(configured)})")
    if running != {configured}:
        print(
            "serve.demo: the running Serve proxy does not use serve/config.yaml's request timeout; Serve was "
            "probably already running with other HTTP options (restart it to apply the config)",
            file=sys.stderr,
        )


def local_resources(app_args: dict[str, Any]) -> dict[str, float]:
    """Custom resources the config's replicas ask for (node roles such as decoder_node), for a one-node Ray.

    On a cluster each node carries its role; a local instance plays every role, with room for every replica.
    """
    wanted: dict[str, float] = {}
    for options in app_args.get("deployment_options", {}).values():
        for name, amount in options.get("ray_actor_options", {}).get("resources", {}).items():
            if name.startswith("node:"):  # Ray's own per-node resources (a head pin): every head has them
                continue
            replicas = options.get("num_replicas") or options.get("autoscaling_config", {}).get("max_replicas", 1)
            wanted[name] = wanted.get(name, 0.0) + float(amount) * int(replicas)
    return wanted


def caption_file(url: str, image: Path, api_key: str | None, timeout_s: float = 60.0) -> dict[str, Any]:
    """POST the image to /v1/caption; retries briefly while the proxy finishes routing to the new app."""
    headers = {"Content-Type": "application/octet-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = image.read_bytes()
    deadline = time.monotonic() + timeout_s
    while True:
        request = urllib.request.Request(f"{url}/v1/caption", data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code not in (404, 503) or time.monotonic() > deadline:
                detail = exc.read().decode(errors="replace")
                raise SystemExit(f"serve.demo: {exc.code} from /v1/caption: {detail}") from None
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def reference_caption(run: dict[str, Any], image: Path) -> str | None:
    """The first reference caption of the image, from the synthetic set's COCO captions file."""
    raw = run.get("raw_dir")
    if not raw:
        return None
    for path in sorted(Path(raw).glob("annotations/captions_*.json")):
        coco = json.loads(path.read_text())
        ids = {img["id"] for img in coco.get("images", []) if img.get("file_name") == image.name}
        for ann in coco.get("annotations", []):
            if ann.get("image_id") in ids:
                return ann.get("caption")
    return None


def print_usage(url: str, image: Path, api_key: str | None, *, keep: bool) -> None:
    auth = ' -H "Authorization: Bearer $VLJEPA_API_KEY"' if api_key else ""
    print("\ncall it with curl:")
    print(f'  curl -s{auth} -H "Content-Type: image/png" --data-binary @{image} {url}/v1/caption')
    print(f"  curl -s{auth} -F file=@{image} {url}/v1/caption")
    print(f'  curl -s{auth} -H "Content-Type: image/png" --data-binary @{image} {url}/v1/encode -o plan.bin')
    print(f'  curl -s{auth} -H "Content-Type: application/octet-stream" --data-binary @plan.bin {url}/v1/decode')
    print(f"  curl -s{auth} {url}/v1/model;  open {url}/docs for the OpenAPI page")
    print(f"  or open {url}/ in a browser: pick or drop an image, or try a sample")
    if keep:
        print("\nserving until Ctrl-C")
    else:
        print("\nto keep it running: python -m serve.demo --keep   (or: serve run serve/config.yaml)")


def wait_for_ctrl_c() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    print("\nshutting down")


if __name__ == "__main__":
    sys.exit(main())
