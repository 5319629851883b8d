"""The service under bad input and hostile clients (issue 15), over real HTTP against the shared application.

Each test reproduces one break found by attacking the service from 127.0.0.1: sampling at tiny temperatures,
a multipart body of many tiny parts, connections that never finish their body, a 16-bit image under the old
pixel guard, image formats nobody tested, three error body shapes, and tracebacks logged for client mistakes.
"""

from __future__ import annotations

import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve.app import shipped_config
from tests.serve.conftest import BODY_TIMEOUT_S, SHARED_APP, ServeFixtures

pytestmark = pytest.mark.ray
IMG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def client(app_url: str):
    with httpx.Client(base_url=app_url, timeout=60) as c:
        yield c


def assert_error_shape(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, f"{r.status_code} {r.headers.get('content-type')} {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error", "detail"} and all(isinstance(v, str) and v for v in body.values()), body
    if code is not None:
        assert body["error"] == code, body
    return body


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_tiny_temperatures_are_safe_and_never_fail_batch_neighbours(
    client: httpx.Client, serve_fixtures: ServeFixtures
) -> None:
    """temperature in (0, 1e-38) overflowed softmax to NaN: a 500 for the request and for its batch neighbours."""
    colours = list(serve_fixtures.images)
    jobs = [(colours[i % 4], t) for i, t in enumerate([1e-40, 1e-39, 5e-39, 1e-30, 1e-45, 1e-20] * 2)]
    jobs += [(colours[i % 4], 0.0) for i in range(24)]  # innocent greedy neighbours in the same batches

    def call(job: tuple[str, float]) -> httpx.Response:
        colour, temperature = job
        return client.post("/v1/caption", content=serve_fixtures.images[colour], params={"temperature": temperature})

    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(call, jobs))
    for (colour, temperature), r in zip(jobs, responses, strict=True):
        assert r.status_code == 200, f"temperature={temperature}: {r.status_code} {r.text[:300]}"
        # Below the sampling floor decoding is greedy, so even the tiny temperatures give the reference caption.
        assert r.json()["caption"] == serve_fixtures.expected[colour]
    for bad in ("nan", "inf", "-inf", "1e400", "warm"):
        body = assert_error_shape(client.post("/v1/caption", content=b"x", params={"temperature": bad}), 422)
        assert body["error"] == "invalid_parameter" and "temperature" in body["detail"], body


def _many_parts(n: int) -> tuple[bytes, str]:
    part = b'--B\r\nContent-Disposition: form-data; name="a"\r\n\r\n\r\n'
    return part * n + b"--B--\r\n", "multipart/form-data; boundary=B"


def test_multipart_of_many_tiny_parts_is_refused_at_once_and_health_stays_up(
    client: httpx.Client, serve_fixtures: ServeFixtures
) -> None:
    """100,000 empty parts (4.9 MB, under the body limit) were parsed for tens of seconds on the event loop."""
    body, content_type = _many_parts(100_000)
    assert len(body) < shipped_config(model="x").app_args["max_body_bytes"]
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.post, "/v1/caption", content=body, headers={"Content-Type": content_type})
        health = []
        while not future.done():
            health.append(client.get("/healthz", timeout=10).status_code)
            time.sleep(0.05)
        r = future.result()
    assert_error_shape(r, 413, "too_many_parts")
    assert set(health) <= {200}, health

    # Part headers are bounded too, and a normal upload with a text field next to the file still works.
    huge = b'--B\r\nContent-Disposition: form-data; name="file"; x="' + b"y" * 20_000 + b'"\r\n\r\nabc\r\n--B--\r\n'
    r = client.post("/v1/caption", content=huge, headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert_error_shape(r, 413, "part_header_too_large")
    files = {"note": (None, b"hello"), "file": ("red.png", serve_fixtures.images["red"], "image/png")}
    r = client.post("/v1/caption", files=files)
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == serve_fixtures.expected["red"]


def _http_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def test_slow_bodies_get_408_and_never_freeze_health(
    app_url: str, client: httpx.Client, serve_fixtures: ServeFixtures
) -> None:
    """300 connections sending 10 bytes of a declared 2,066 froze every route, /healthz included."""
    host, port = app_url.removeprefix("http://").split(":")
    sockets = []
    try:
        for _ in range(300):
            sock = socket.create_connection((host, int(port)), timeout=30)
            sock.sendall(
                b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 2066\r\n\r\n"
                + b"\x89PNG\r\n\x1a\n\0\0"
            )
            sockets.append(sock)
        time.sleep(0.5)  # every request has reached the ingress and is waiting for its body
        assert client.get("/healthz", timeout=5).json() == {"status": "ok"}  # the ingress answers meanwhile
        assert client.get("/-/healthz", timeout=5).status_code == 200  # the proxy's own check, no ingress at all
        answers = [_http_response(sock) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    statuses = sorted(status for status, _, _ in answers)
    # Admitted requests wait out the body deadline (408); those past the in-flight limit are shed at once (503).
    assert set(statuses) <= {408, 503} and 408 in statuses, statuses
    limit = shipped_config(model="x").app_args["max_inflight_requests"]
    assert statuses.count(408) <= limit, statuses
    for status, headers, body in answers:
        assert headers["content-type"].startswith("application/json"), headers
        error = httpx.Response(status, content=body).json()
        if status == 408:
            assert error["error"] == "body_timeout" and f"within {BODY_TIMEOUT_S:g} s" in error["detail"], error
        else:
            assert error["error"] == "overloaded" and int(headers["retry-after"]) >= 1, (error, headers)
            # Shed by Serve's proxy (serve/proxy_gate.py, same limit as the ingress): the ingress never saw it.
            assert "at the proxy" in error["detail"], error
    r = client.post("/v1/caption", content=serve_fixtures.images["green"], headers=IMG)
    assert r.status_code == 200, r.text


def test_pixel_guard_formats_and_16_bit_images(client: httpx.Client, serve_fixtures: ServeFixtures) -> None:
    """A 124 KB 16-bit 7999x7999 PNG passed the old 64 MP guard and took the encoder to 1.9 GB."""
    big16 = encoded(Image.new("I;16", (7999, 7999), 1000), "PNG")
    assert len(big16) < 200_000
    assert_error_shape(client.post("/v1/caption", content=big16, headers=IMG), 413, "too_many_pixels")

    # A 16-bit image the model can read is captioned like its 8-bit twin (v * 255 / 65535 per pixel).
    rgb = np.asarray(Image.open(io.BytesIO(serve_fixtures.images["blue"])).convert("L"))
    grey16 = Image.fromarray(rgb.astype(np.uint16) * 257)
    grey8 = encoded(Image.fromarray(rgb), "PNG")
    r16 = client.post("/v1/caption", content=encoded(grey16, "PNG"), headers=IMG)
    r8 = client.post("/v1/caption", content=grey8, headers=IMG)
    assert r16.status_code == r8.status_code == 200, (r16.text, r8.text)
    assert r16.json()["caption"] == r8.json()["caption"]

    red = Image.open(io.BytesIO(serve_fixtures.images["red"])).convert("RGB")
    for fmt, media in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):  # the tested formats besides PNG
        r = client.post("/v1/caption", content=encoded(red, fmt), headers={"Content-Type": media})
        assert r.status_code == 200, f"{fmt}: {r.text}"
        assert r.json()["caption"], fmt
    for fmt in ("GIF", "BMP", "TIFF"):  # Pillow reads them; the service does not take untested formats
        r = client.post("/v1/caption", content=encoded(red, fmt), headers={"Content-Type": "image/png"})
        assert_error_shape(r, 415, "unsupported_format")


def test_one_error_shape_and_an_openapi_schema_that_documents_it(
    client: httpx.Client, serve_fixtures: ServeFixtures
) -> None:
    assert_error_shape(client.get("/no/such/route"), 404, "not_found")
    assert_error_shape(client.delete("/v1/caption"), 405, "method_not_allowed")
    assert_error_shape(client.post("/healthz"), 405, "method_not_allowed")
    body = assert_error_shape(client.post("/v1/decode", content=b"x", params={"max_new_tokens": "many"}), 422)
    assert "max_new_tokens" in body["detail"]
    assert_error_shape(client.post("/v1/encode", content=b"\0" * 100, headers=IMG), 400, "not_an_image")

    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    limit = serve_fixtures.model.config.model.max_seq_length - 1
    for route, media in (
        ("/v1/caption", {"image/png", "image/jpeg", "image/webp", "multipart/form-data"}),
        ("/v1/encode", {"image/png", "image/jpeg", "image/webp", "multipart/form-data"}),
        ("/v1/decode", {"application/octet-stream"}),
    ):
        operation = paths[route]["post"]
        assert set(operation["requestBody"]["content"]) == media, route
        statuses = set(operation["responses"])
        assert {"200", "400", "401", "408", "413", "415", "422", "503"} <= statuses, (route, statuses)
        for status in statuses - {"200"}:
            ref = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorBody"), (route, status)
        for parameter in operation.get("parameters", []):
            if parameter["name"] == "max_new_tokens":
                (bounded,) = [s for s in parameter["schema"]["anyOf"] if s.get("type") == "integer"]
                assert (bounded["minimum"], bounded["maximum"]) == (1, limit), bounded
    assert "409" in paths["/v1/decode"]["post"]["responses"]
    r = client.post("/v1/decode", content=b"\0" * 8, params={"max_new_tokens": limit + 1})
    assert_error_shape(r, 422, "max_new_tokens_out_of_range")
    r = client.post("/v1/caption", content=serve_fixtures.images["red"], params={"max_new_tokens": limit})
    assert r.status_code == 200, r.text
    assert client.get("/docs").status_code == 200


def _replica_logs(app: str) -> dict[Path, str]:
    """Each replica log file of the app, by path (every file grows, so new lines are compared per file)."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return {p: p.read_text(errors="replace") for p in sorted((session / "logs" / "serve").glob(f"replica_{app}_*"))}


def test_client_errors_are_one_info_line_without_traceback(client: httpx.Client) -> None:
    before = _replica_logs(SHARED_APP)
    marker = 12_345  # the rejected body's length appears in the log line
    assert_error_shape(client.post("/v1/caption", content=b"\1" * marker, headers=IMG), 400, "not_an_image")
    assert_error_shape(client.post("/v1/decode", content=b"NOPE" + b"\0" * 300), 422, "invalid_plan")
    assert_error_shape(client.post("/v1/caption", content=b"", headers=IMG), 400, "empty_body")
    time.sleep(1.0)  # replica log handlers write as they go; give the files a moment
    added = "".join(text[len(before.get(path, "")) :] for path, text in _replica_logs(SHARED_APP).items())
    lines = [line for line in added.splitlines() if f"{marker} bytes" in line]
    assert lines and all("INFO" in line and "ERROR" not in line for line in lines), lines
    assert "Traceback" not in added, added[-3000:]
    assert not [line for line in added.splitlines() if line.startswith("ERROR") or " ERROR " in line], added[-3000:]
