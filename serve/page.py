"""The captioning service's web page: `GET /` on the ingress, for a person with a browser.

    GET /                  the page (serve/static/index.html: one file, inline CSS and JS, no build step)
    GET /samples           names of the sample images the page offers
    GET /samples/NAME.png  one sample: a synthetic shape drawn like the demo's training set

The page calls the public API itself (`GET /v1/model`, `POST /v1/caption`), so it needs no route of its
own beyond these; an API key typed into it is sent as `Authorization: Bearer`, as any client would.
No external assets: the machines serving it may have no internet.
"""

from __future__ import annotations

import functools
import io
import random
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response

from jobs.make_shapes import draw_shape

PAGE = Path(__file__).with_name("static") / "index.html"
# (colour, shape) per sample: one of each shape, six colours, drawn at the shapes preset's 32 px.
SAMPLES = (
    ("red", "circle"),
    ("blue", "square"),
    ("green", "triangle"),
    ("yellow", "square"),
    ("purple", "circle"),
    ("orange", "triangle"),
)
SAMPLE_SIZE = 32

router = APIRouter(include_in_schema=False)  # a page, not API: kept out of the OpenAPI schema


@functools.cache
def page_html() -> str:
    return PAGE.read_text(encoding="utf-8")


@functools.cache
def sample_png(name: str) -> bytes | None:
    """The PNG for `colour-shape`, or None for a name that is not a sample; the same bytes every time."""
    pair = tuple(name.split("-", 1))
    if pair not in SAMPLES:
        return None
    colour, shape = pair
    image, _, _ = draw_shape(random.Random(f"sample-{name}"), colour, shape, SAMPLE_SIZE)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@router.get("/", response_class=HTMLResponse)
async def index() -> HTMLResponse:
    return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache"})


@router.get("/samples")
async def samples() -> JSONResponse:
    return JSONResponse([{"name": f"{c}-{s}", "label": f"{c} {s}", "url": f"samples/{c}-{s}.png"} for c, s in SAMPLES])


@router.get("/samples/{name}.png")
async def sample(name: str) -> Response:
    data = sample_png(name)
    if data is None:
        known = ", ".join(f"{c}-{s}" for c, s in SAMPLES)
        return JSONResponse({"error": "not_found", "detail": f"no sample {name!r}; samples: {known}"}, 404)
    return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})
