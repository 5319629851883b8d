"""The captioning application over real HTTP on a local Ray: results, the plan routes, every bad input.

The session's shared application (tests/serve/conftest.py: serve/config.yaml with a local checkpoint path).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image

from model.checkpoint import load_encoder, load_model
from model.codec import HEADER_SIZE, decode_plan, encode_plan
from model.transform import ImageTransform
from serve.app import shipped_config
from tests.serve.conftest import MAX_NEW_TOKENS, ServeFixtures

pytestmark = pytest.mark.ray

_SHIPPED = shipped_config(model="unused").app_args
MAX_BODY = _SHIPPED["max_body_bytes"]
MAX_PIXELS = _SHIPPED["max_pixels"]
SIDE_OVER_LIMIT = int(MAX_PIXELS**0.5) + 1  # a square one pixel wider than the pixel guard allows


@pytest.fixture(scope="module")
def client(app_url: str):
    with httpx.Client(base_url=app_url, timeout=60) as c:
        yield c


def png(size: tuple[int, int], colour=(200, 10, 10), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


def test_caption_matches_in_process_model(client: httpx.Client, serve_fixtures: ServeFixtures) -> None:
    plan_bytes = HEADER_SIZE + 4 * 32 * 2  # debug preset: K=4, D=32, fp16
    for colour, image in serve_fixtures.images.items():
        r = client.post("/v1/caption", content=image, headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["caption"] == serve_fixtures.expected[colour]
        assert body["plan_bytes"] == plan_bytes
        assert body["model"]["fingerprint"] == serve_fixtures.model.fingerprint
        assert body["model"]["source"] == str(serve_fixtures.model.path)
        assert set(body["timings_ms"]) == {"encode", "decode", "total"}
        assert body["timings_ms"]["total"] >= body["timings_ms"]["encode"] + body["timings_ms"]["decode"]


def test_multipart_upload_gives_the_same_caption(client: httpx.Client, serve_fixtures: ServeFixtures) -> None:
    files = {"file": ("blue.png", serve_fixtures.images["blue"], "image/png")}
    r = client.post("/v1/caption", files=files)
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == serve_fixtures.expected["blue"]


def test_encode_then_decode_round_trip(client: httpx.Client, serve_fixtures: ServeFixtures) -> None:
    image = serve_fixtures.images["green"]
    r = client.post("/v1/encode", content=image, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    plan = r.content
    assert int(r.headers["x-plan-bytes"]) == len(plan) == HEADER_SIZE + 4 * 32 * 2

    # The served plan (query encoding cached once) equals the in-process PlanEncoder.forward, to fp16 precision.
    loaded = load_model(serve_fixtures.model.path)
    x = ImageTransform(loaded.config.model.image_size)(image)[None]
    with torch.no_grad():
        reference = loaded.model.encoder(x)[0]  # (K, D)
    served = decode_plan(plan, expect_fingerprint=serve_fixtures.model.fingerprint)
    torch.testing.assert_close(served, reference, atol=2e-3, rtol=2e-3)

    r = client.post("/v1/decode", content=plan, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == serve_fixtures.expected["green"]


def test_plan_from_another_model_is_rejected_with_409(client: httpx.Client, serve_fixtures: ServeFixtures) -> None:
    other = load_encoder(serve_fixtures.other.path)
    x = ImageTransform(other.config.model.image_size)(serve_fixtures.images["red"])[None]
    with torch.no_grad():
        plan = other.module(x)[0]
    foreign = encode_plan(plan, fingerprint=other.fingerprint)
    r = client.post("/v1/decode", content=foreign)
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "plan_fingerprint_mismatch"
    assert other.fingerprint in r.json()["detail"]


def test_mixed_batch_of_greedy_sampled_and_short_requests(client: httpx.Client, serve_fixtures: ServeFixtures) -> None:
    """Concurrent requests with different sampling settings share batches; each gets its own result."""
    jobs = [(colour, 0.0, None) for colour in serve_fixtures.images]
    jobs += [(colour, 0.0, 5) for colour in serve_fixtures.images]
    jobs += [(colour, 1.0, 8) for colour in serve_fixtures.images]

    def call(job):
        colour, temperature, limit = job
        params = {"temperature": temperature} | ({"max_new_tokens": limit} if limit else {})
        return client.post("/v1/caption", content=serve_fixtures.images[colour], params=params)

    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(call, jobs))
    for (colour, temperature, limit), r in zip(jobs, responses, strict=True):
        assert r.status_code == 200, r.text
        caption = r.json()["caption"]
        if temperature == 0.0:
            assert caption == serve_fixtures.expected[colour][: limit or MAX_NEW_TOKENS]
        else:
            assert len(caption.encode("utf-8", errors="replace")) <= 8 * 3  # at most 8 tokens, some may be U+FFFD


def test_model_route_and_docs(client: httpx.Client, serve_fixtures: ServeFixtures) -> None:
    r = client.get("/v1/model")
    assert r.status_code == 200, r.text
    info = r.json()
    assert (info["K"], info["D"], info["dtype"]) == (4, 32, "fp16")
    assert info["plan_bytes"] == HEADER_SIZE + 4 * 32 * 2
    assert info["fingerprint"] == info["decoder_fingerprint"] == serve_fixtures.model.fingerprint
    assert info["source"] == str(serve_fixtures.model.path)
    assert client.get("/healthz").json() == {"status": "ok"}
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/caption", "/v1/encode", "/v1/decode", "/v1/model", "/healthz"} <= set(paths)
    assert client.get("/docs").status_code == 200


def _plan(serve_fixtures: ServeFixtures) -> bytes:
    return encode_plan(torch.zeros(4, 32), fingerprint=serve_fixtures.model.fingerprint)


def _bad_requests(fx: ServeFixtures) -> list[tuple[str, dict, int, str]]:
    """(route, httpx kwargs, expected status, expected error code)."""
    good_png = fx.images["red"]
    plan = _plan(fx)
    wrong_version = bytearray(plan)
    wrong_version[4] = 9
    octet = {"Content-Type": "application/octet-stream"}
    img = {"Content-Type": "image/png"}
    return [
        ("/v1/caption", {"content": b"", "headers": img}, 400, "empty_body"),
        ("/v1/caption", {"content": b"hello, not a picture", "headers": img}, 400, "not_an_image"),
        ("/v1/caption", {"content": good_png[: len(good_png) // 2], "headers": img}, 400, "truncated"),
        ("/v1/caption", {"content": b'{"image": 1}', "headers": {"Content-Type": "application/json"}}, 415, ""),
        ("/v1/caption", {"content": b"\0" * (MAX_BODY + 1), "headers": img}, 413, "body_too_large"),
        ("/v1/caption", {"content": png((SIDE_OVER_LIMIT,) * 2, mode="L"), "headers": img}, 413, "too_many_pixels"),
        ("/v1/caption", {"files": {"note": (None, b"just a form field")}}, 400, "missing_file"),
        ("/v1/encode", {"content": b"GIF89a", "headers": img}, 400, ""),
        ("/v1/decode", {"content": b"", "headers": octet}, 400, "empty_body"),
        ("/v1/decode", {"content": plan[:-1], "headers": octet}, 422, "invalid_plan"),
        ("/v1/decode", {"content": bytes(wrong_version), "headers": octet}, 422, "invalid_plan"),
        ("/v1/decode", {"content": b"NOPE" + plan[4:], "headers": octet}, 422, "invalid_plan"),
        ("/v1/decode", {"content": encode_plan(torch.zeros(5, 32), fingerprint=fx.model.fingerprint)}, 422, ""),
        ("/v1/decode", {"content": plan, "headers": img}, 415, "unsupported_media_type"),
        ("/v1/caption", {"content": good_png, "headers": img, "params": {"temperature": 5}}, 422, ""),
        ("/v1/caption", {"content": good_png, "headers": img, "params": {"temperature": -1}}, 422, ""),
        ("/v1/caption", {"content": good_png, "headers": img, "params": {"max_new_tokens": 0}}, 422, ""),
        ("/v1/decode", {"content": plan, "params": {"max_new_tokens": 1000}}, 422, "max_new_tokens_out_of_range"),
    ]


def test_every_bad_input_gets_its_status_then_a_good_request_succeeds(
    client: httpx.Client, serve_fixtures: ServeFixtures
) -> None:
    for route, kwargs, status, code in _bad_requests(serve_fixtures):
        r = client.post(route, **kwargs)
        assert r.status_code == status, f"{route} {kwargs.get('headers')} -> {r.status_code} {r.text}"
        body = r.json()
        assert body.get("detail"), f"{route}: no message in {body}"
        if code:
            assert body["error"] == code, body
    # Nothing broke: the same server still captions.
    r = client.post("/v1/caption", content=serve_fixtures.images["yellow"], headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == serve_fixtures.expected["yellow"]


def test_no_api_key_needed_when_none_is_configured(client: httpx.Client) -> None:
    assert client.get("/v1/model", headers={"Authorization": "Bearer anything"}).status_code == 200
