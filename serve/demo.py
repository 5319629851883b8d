"""The README demo's second half: serve the model `python -m jobs.demo` just trained and caption over HTTP.

    python -m serve.demo [--run demo_out/LAST_RUN.json] [--port 8000] [--keep]

1. reads LAST_RUN.json (registered model URI, MLflow tracking URI, a held-out image);
2. starts Ray (joins $RAY_ADDRESS if set, else a fresh local instance) and Serve on 127.0.0.1;
3. deploys the captioner from the models:/NAME@ALIAS URI with serve/config.yaml's settings (HTTP options,
   app args, replicas and queues): one configuration, whether started here or by `serve run`;
4. captions the held-out image over HTTP and prints the caption, the plan size and per-stage timings;
5. prints the curl commands for the routes; with --keep it stays up until Ctrl-C, else it shuts down.
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

    from ray import serve

    from jobs import console
    from jobs.runtime import ensure_ray
    from serve.app import build_app, shipped_config

    console.setup_once("serve-demo", verbose=args.verbose, log_dir=run_file.parent / "logs")

    config = shipped_config(model=model, mlflow_tracking_uri=run.get("tracking_uri"))
    http_options = {**config.http_options}
    http_options.update({k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    print(f"== starting Ray: {ensure_ray(resources=local_resources(config.app_args))}")
    host = http_options.get("host", "127.0.0.1")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{http_options.get('port', 8000)}"
    print(f"== serving {model} at {url}")
    serve.start(proxy_location=config.proxy_location, http_options=http_options)
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
        print_usage(url, image_path, api_key, keep=args.keep)
        if args.keep:
            wait_for_ctrl_c()
    finally:
        serve.shutdown()
    return 0


def local_resources(app_args: dict[str, Any]) -> dict[str, float]:
    """Custom resources the config's replicas ask for (node roles such as decoder_node), for a one-node Ray.

    On a cluster each node carries its role; a local instance plays every role, with room for every replica.
    """
    wanted: dict[str, float] = {}
    for options in app_args.get("deployment_options", {}).values():
        for name, amount in options.get("ray_actor_options", {}).get("resources", {}).items():
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
