"""The web page at `GET /`, driven in a real headless Chromium (Debian's chromium + chromedriver, `make browser`).

A person's path through the page: it loads and names the model served, an image picked in the file
chooser comes back captioned (the caption the model gives in-process), with the plan's wire size next to
the image's and the stage timings; a sample image captions the same way; a file that is not an image gets
the API's own message on the page. Screenshots are kept in tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from serve.page import SAMPLES, sample_png
from tests.serve.conftest import ARTIFACTS, ServeFixtures, in_process_captions, page_caption, page_wait

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _fmt_bytes(n: int) -> str:  # the page's fmtBytes
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KB"


def test_upload_an_image_through_the_page_and_read_its_caption(
    browser, app_url: str, serve_fixtures: ServeFixtures, tmp_path: Path
) -> None:
    info = httpx.get(f"{app_url}/v1/model", timeout=30).json()
    browser.get(f"{app_url}/")
    version = str(info["version"])
    badge = f"{info['name']} " + (f"v{version}" if version.isdigit() else f"({version})")
    page_wait(browser, lambda d: d.find_element("id", "model-badge").text == badge, f"the model badge {badge!r}")
    facts = browser.find_element("id", "model-facts").text
    assert info["fingerprint"] in facts and f"{info['K']} × {info['D']}" in facts

    image = tmp_path / "blue-square.png"
    image.write_bytes(serve_fixtures.images["blue"])
    browser.find_element("id", "file-input").send_keys(str(image))  # what the file chooser does
    caption = page_wait(browser, page_caption, "a caption")
    assert caption == serve_fixtures.expected["blue"]
    assert browser.find_element("id", "error").is_displayed() is False

    assert browser.find_element("id", "plan-bytes").text == _fmt_bytes(info["plan_bytes"])
    assert browser.find_element("id", "image-bytes").text == _fmt_bytes(image.stat().st_size)
    assert browser.find_element("id", "image-name").text == image.name
    ratio = image.stat().st_size / info["plan_bytes"]
    assert browser.find_element("id", "ratio").text.startswith(f"{max(ratio, 1 / ratio):.1f}×")
    for stage in ("encode", "decode", "total", "rtt"):
        assert browser.find_element("id", f"t-{stage}").text.endswith(" ms"), stage
    browser.save_screenshot(str(ARTIFACTS / "web_page_caption.png"))


def test_a_sample_image_captions_like_the_model_in_process(
    browser, app_url: str, serve_fixtures: ServeFixtures
) -> None:
    browser.get(f"{app_url}/")
    buttons = page_wait(browser, lambda d: d.find_elements("css selector", "button.sample"), "the samples")
    assert [b.get_attribute("data-sample") for b in buttons] == [f"{c}-{s}" for c, s in SAMPLES]
    name = "green-triangle"
    expected = in_process_captions(serve_fixtures.model.path, {name: sample_png(name)})[name]
    browser.find_element("css selector", f'button.sample[data-sample="{name}"]').click()
    caption = page_wait(browser, page_caption, "the sample's caption")
    assert caption == expected
    assert browser.find_element("id", "image-name").text == "green triangle (sample)"
    browser.save_screenshot(str(ARTIFACTS / "web_page_sample.png"))


def test_a_file_that_is_not_an_image_shows_the_apis_message(browser, app_url: str, tmp_path: Path) -> None:
    browser.get(f"{app_url}/")
    notes = tmp_path / "notes.png"  # a PNG name, text inside: the server, not the browser, must refuse it
    notes.write_text("these are not pixels")
    browser.find_element("id", "file-input").send_keys(str(notes))
    error = page_wait(browser, lambda d: d.find_element("id", "error").is_displayed(), "an error")
    assert error
    direct = httpx.post(f"{app_url}/v1/caption", content=notes.read_bytes(), headers={"Content-Type": "image/png"})
    assert direct.status_code in (400, 415)
    assert browser.find_element("id", "error").text == f"{direct.status_code}: {direct.json()['detail']}"
    assert browser.find_element("id", "caption").text == "No caption"
    browser.save_screenshot(str(ARTIFACTS / "web_page_error.png"))
