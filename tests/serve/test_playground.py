"""The playground page at GET /: its assets, and a real browser driving it.

The browser test runs Debian's Chromium, headless, through Playwright, against a real `sdrt serve` on the
embedded shapes model: a refused request shows the server's own words; a request waits behind another and
shows its queue position; progress and previews advance; the finished picture's pixels, read back from the
page through a canvas, have the colours the prompt asked for and equal the Pipeline's picture for the same
settings; the download link holds the same picture. A screenshot is kept as a test artefact
(SDRT_TEST_ARTIFACTS, default build/test-artifacts/). Without Chromium the test skips, except in CI (CI set),
where it fails: .ci/run installs Chromium.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.images import images_psnr
from tests.conftest import ROOT
from tests.serve.conftest import LiveServer, make_service, start_serve
from tools.shape_check import classify

httpx = pytest.importorskip("httpx")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("SDRT_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
PROMPT = "a red circle on a blue background"


def test_page_and_assets_need_no_key_and_fetch_nothing_from_elsewhere(serve_pipe):
    from sdrt.serve.app import create_app

    service = make_service(serve_pipe, max_queue=4, api_key="s3cret")
    service.model_name = "</script><script>alert(1)</script>"  # what the page embeds is escaped
    try:
        with LiveServer(create_app(service)) as server:
            page = httpx.get(f"{server.url}/", timeout=10)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert "default-src 'self'" in page.headers["content-security-policy"]
            assert '"api_key_required": true' in page.text and '"size_multiple": ' in page.text
            assert "</script><script>alert(1)" not in page.text and "\\u003c/script>" in page.text
            assert "http://" not in page.text and "https://" not in page.text
            for name, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
                r = httpx.get(f"{server.url}/static/{name}", timeout=10)
                assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
                assert "http://" not in r.text and "https://" not in r.text
            assert httpx.get(f"{server.url}/static/..%2Fapp.py", timeout=10).status_code == 404
            r = httpx.get(f"{server.url}/static/nope.js", timeout=10)
            assert r.status_code == 404 and "nope.js" in r.json()["error"]["message"]
            assert httpx.post(f"{server.url}/v1/jobs", json={"prompt": "x"}, timeout=10).status_code == 401
    finally:
        service.engine.close()


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail("CI: Chromium is missing (.ci/run installs Debian's chromium package)")
        pytest.skip("Chromium is not installed (apt-get install chromium); CI runs this test")
    return path


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI: playwright is missing (it is in the dev extra)")
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    return sync_playwright


@contextmanager
def playground(engine_dir, *serve_args, height: int = 900):
    """`sdrt serve ENGINE_DIR SERVE_ARGS` and headless Chromium on its playground, ready: (page, url, seen), where
    ``seen["problems"]`` collects page errors and console errors and ``seen["sent"]`` the bodies POSTed to
    /v1/jobs. The browser and the service are stopped on the way out."""
    chromium = _chromium()
    sync_playwright = _playwright()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    seen: dict[str, list] = {"problems": [], "sent": []}
    proc, url = start_serve(engine_dir, *serve_args)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": height})
                page.on("pageerror", lambda e: seen["problems"].append(f"page error: {e}"))
                page.on("console", lambda m: seen["problems"].append(m.text) if m.type == "error" else None)
                page.on("request", lambda r: seen["sent"].append(r.post_data_json)
                        if r.url.endswith("/v1/jobs") and r.method == "POST" else None)
                page.goto(f"{url}/")
                page.wait_for_selector("#health.ready")
                yield page, url, seen
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# Records, from outside the page's code, every value the progress bar takes, every preview shown and every
# status line, so that the test sees what a person would have seen however fast the job ran.
WATCH = """() => {
  window.seen = {progress: [], previews: 0, status: []};
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.target.id === "progress" && r.attributeName === "value") window.seen.progress.push(r.target.value);
      if (r.target.id === "preview" && r.attributeName === "src" && r.target.src) window.seen.previews += 1;
    }
  }).observe(document.body, {subtree: true, attributes: true, attributeFilter: ["value", "src"]});
  new MutationObserver(() => window.seen.status.push(document.getElementById("status").textContent))
    .observe(document.getElementById("status"), {childList: true, characterData: true, subtree: true});
}"""

READ_PIXELS = """(img) => {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d", {willReadFrequently: true});
  context.drawImage(img, 0, 0);
  return {width: canvas.width, height: canvas.height,
          rgba: Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data)};
}"""

@pytest.mark.slow
def test_browser_drives_the_playground(shapes_engine):
    with playground(shapes_engine, "--max-batch", "1", "--max-queue", "4", height=760) as (page, url, watched):
        assert page.input_value("#width") == "32" and page.input_value("#steps") == "25"

        # refused: the server's words, shown as they are
        page.fill("#prompt", PROMPT)
        page.fill("#width", "128")
        page.fill("#height", "128")
        page.click("#generate")
        page.wait_for_selector("#error:not([hidden])")
        error = page.inner_text("#error")
        assert error.startswith("400: size 128x128: at most 4096 pixels"), error
        page.fill("#width", "32")
        page.fill("#height", "32")

        # a long request holds the only batch slot, so the page's request waits in the queue
        blocker = httpx.post(f"{url}/v1/jobs", json=dict(prompt="a blue square on a red background",
                                                         steps=150, seed=0), timeout=10).json()["id"]
        _wait_state(url, blocker, "running")
        page.evaluate(WATCH)
        page.fill("#seed", "1")
        page.select_option("#scheduler", "ddim")
        page.fill("#guidance", "7.5")
        page.fill("#preview_every", "5")
        page.click("#generate")
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('queued')")
        assert page.inner_text("#status") == "queued: next to start"
        assert page.is_enabled("#cancel") and not page.is_enabled("#generate")
        httpx.delete(f"{url}/v1/jobs/{blocker}", timeout=10)

        page.wait_for_selector(".result-image")
        page.wait_for_function("() => document.querySelector('.result-image').complete")
        page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        seen = page.evaluate("window.seen")
        pixels = page.eval_on_selector(".result-image", READ_PIXELS)
        href = page.get_attribute(".result-item a", "href")
        with page.expect_download() as download:  # what a person does: click the link
            page.click(".result-item a")
        saved = ARTIFACTS / download.value.suggested_filename
        download.value.save_as(saved)
        parameters = page.inner_text(".parameters")
        status, progress_text = page.inner_text("#status"), page.inner_text("#progress-text")
    problems = watched["problems"]

    # the browser logs the refused request's 400 itself; nothing else may go wrong on the page
    assert problems == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"], problems
    assert status == "done" and progress_text == "25 / 25"
    assert "queued: next to start" in seen["status"] and "denoising…" in seen["status"]
    steps = [int(v) for v in seen["progress"]]
    assert steps == sorted(steps) and steps[-1] == 25
    assert len({s for s in steps if 0 < s < 25}) >= 5, steps  # it advanced step by step, visibly
    assert seen["previews"] == 4  # after steps 5, 10, 15 and 20

    shown = np.array(pixels["rgba"], dtype=np.uint8).reshape(pixels["height"], pixels["width"], 4)[..., :3]
    got = classify(shown)
    assert (got["object"], got["background"]) == ("red", "blue"), got

    from sdrt.runtime import Pipeline

    pipe = Pipeline(shapes_engine)
    try:
        want = pipe.generate(PROMPT, steps=25, guidance=7.5, seed=1, scheduler="ddim").images[0]
    finally:
        pipe.close()
    assert images_psnr(shown, want) >= 60.0
    assert saved.name == "sdrt-1.png" and href.startswith("blob:")
    file = Image.open(saved)
    assert np.array_equal(np.asarray(file.convert("RGB")), shown)
    assert "Seed: 1" in file.text["parameters"] and "Steps: 25" in parameters and "Sampler: DDIM" in parameters


def _wait_state(url: str, job_id: str, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["state"] != state:
        assert time.monotonic() < deadline, f"job {job_id} never {state}"
        time.sleep(0.02)


@pytest.mark.slow
def test_browser_paints_a_mask_and_inpaints(shapes_engine, tmp_path):
    """Upload a picture, paint over its object with the brush (and erase a stroke), send: the mask the service
    receives is what was painted, the object comes back in the asked colour, and every pixel outside the mask is
    the picture's own."""
    from tools.shape_check import object_mask

    from sdrt.runtime import Pipeline

    pipe = Pipeline(shapes_engine)
    try:
        source = pipe.generate(PROMPT, steps=25, seed=2).images[0]
    finally:
        pipe.close()
    Image.fromarray(source).save(tmp_path / "source.png")
    _, blob = object_mask(source)
    ys, xs = np.nonzero(blob)
    top, bottom, left, right = ys.min() - 2, ys.max() + 2, xs.min() - 2, xs.max() + 2
    with playground(shapes_engine) as (page, _, watched):
        page.fill("#prompt", "a yellow circle on a blue background")
        page.fill("#seed", "2")
        page.set_input_files("#picture", str(tmp_path / "source.png"))
        page.wait_for_selector("#painting:not([hidden])")
        box = page.locator("#mask-canvas").bounding_box()
        scale = box["width"] / source.shape[1]

        def to_page(x, y):
            return box["x"] + (x + 0.5) * scale, box["y"] + (y + 0.5) * scale

        page.fill("#brush-size", "3")
        for y in range(top, bottom + 1, 2):      # paint the object's box, row by row
            page.mouse.move(*to_page(left, y))
            page.mouse.down()
            page.mouse.move(*to_page(right, y), steps=4)
            page.mouse.up()
        page.check("#eraser")                     # and erase a stray stroke outside it
        page.mouse.move(*to_page(1, 1))
        page.mouse.down()
        page.mouse.move(*to_page(1, 1), steps=1)
        page.mouse.up()
        page.click("#generate")
        page.wait_for_selector(".result-image")
        page.wait_for_function("() => document.querySelector('.result-image').complete")
        page.screenshot(path=str(ARTIFACTS / "playground-inpaint.png"), full_page=True)
        pixels = page.eval_on_selector(".result-image", READ_PIXELS)
    sent = watched["sent"]

    import base64
    import io

    (body,) = sent
    assert body["init_image"].startswith("data:image/png;base64,") and body["overlay"] is True
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask"].partition(",")[2]))).convert("L")) > 127
    assert mask[blob].all()                                  # the painted mask covers the object
    assert not mask[: max(0, top - 2)].any() and not mask[0, 0]   # and nothing far from it
    shown = np.array(pixels["rgba"], dtype=np.uint8).reshape(pixels["height"], pixels["width"], 4)[..., :3]
    np.testing.assert_array_equal(shown[~mask], source[~mask])
    got = classify(shown)
    assert (got["object"], got["background"]) == ("yellow", "blue"), got


def test_browser_sends_a_control_picture(controlled, tmp_path):
    """Pick one of the engine's ControlNets, give a control picture, a scale and a window, send: the service gets
    that control, and the picture shown equals the Pipeline's with the same control. The T2I-Adapter-only guess
    mode box follows the model chosen; an engine without ControlNets says so instead."""
    from sdrt.runtime import Pipeline

    picture = controlled["pictures"][1]
    with playground(controlled["engine"], height=1000) as (page, _, watched):
        assert page.is_hidden("#control-none") and page.is_visible("#control-fields")
        options = page.eval_on_selector_all("#control-name option", "os => os.map(o => o.value)")
        assert options == ["edges", "depth"]
        page.fill("#prompt", "a red fox in the snow")
        page.fill("#width", "40")
        page.fill("#height", "24")
        page.fill("#steps", "4")
        page.fill("#seed", "5")
        page.select_option("#control-name", "depth")
        page.fill("#control-scale", "1.2")
        page.fill("#control-end", "0.75")
        page.set_input_files("#control-image", str(picture))
        page.wait_for_selector("#control-chosen:not([hidden])")
        page.click("#generate")
        page.wait_for_selector(".result-image")
        page.wait_for_function("() => document.querySelector('.result-image').complete")
        page.screenshot(path=str(ARTIFACTS / "playground-control.png"), full_page=True)
        pixels = page.eval_on_selector(".result-image", READ_PIXELS)
        parameters = page.inner_text(".parameters")
        page.click("#remove-control")
        assert page.is_hidden("#control-chosen")
    problems, sent = watched["problems"], watched["sent"]
    assert problems == [], problems
    (body,) = sent
    (control,) = body["controls"]
    assert (control["name"], control["scale"], control["start"], control["end"]) == ("depth", 1.2, 0, 0.75)
    assert control["image"].startswith("data:image/png;base64,") and "guess_mode" not in body
    shown = np.array(pixels["rgba"], dtype=np.uint8).reshape(pixels["height"], pixels["width"], 4)[..., :3]
    pipe = Pipeline(controlled["engine"])
    try:
        kw = dict(steps=4, seed=5, guidance=7.5, height=24, width=40)
        want = pipe.generate("a red fox in the snow", controls=[("depth", picture, 1.2, 0.0, 0.75)], **kw).images[0]
        plain = pipe.generate("a red fox in the snow", **kw).images[0]
    finally:
        pipe.close()
    assert images_psnr(shown, want) >= 60.0 and images_psnr(shown, plain) < 40
    assert 'ControlNet 0: "Model: depth, Weight: 1.2, Guidance Start: 0, Guidance End: 0.75"' in parameters


def test_the_page_lists_the_engines_controlnets(controlled, serve_pipe):
    from sdrt.runtime import Pipeline
    from sdrt.serve.playground import page_config

    for pipe, want in ((Pipeline(controlled["engine"]), [{"name": "edges", "kind": "controlnet"},
                                                          {"name": "depth", "kind": "controlnet"}]),
                       (serve_pipe, [])):
        service = make_service(pipe, max_queue=4)
        try:
            assert page_config(service)["controlnets"] == want
        finally:
            service.engine.close()
