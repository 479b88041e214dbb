"""``sr3d app`` end to end in a real headless Chromium (Debian's ``chromium``, driven by playwright).

The app serves the bundled tiny model on 127.0.0.1 in this process; the browser loads the page, draws
a box with two mouse clicks on the frame, types a question, clicks Ask and reads the answer, which
must equal :meth:`SR3DPipeline.ask` on the same scene and box. Every request the page makes and
every socket this process opens must stay on the loopback interface.

``SR3D_APP_SCREENSHOTS=DIR`` also saves the screenshots there (``docs/images/app-*.png`` are made so).
"""

from __future__ import annotations

import io
import ipaddress
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright import sync_api as playwright_api  # the dev extra installs playwright (and gradio)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("app-browser"),
    pytest.mark.usefixtures("one_thread"),
    # gradio's queue calls pandas options that pandas 3 deprecates (nothing of ours)
    pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*"),
]


_TIMEOUT_MS = 60_000


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Debian's chromium is not installed; `make test` installs it (apt-get install -y chromium)")
    return path


def _loopback(address: object) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths and the like
        return True
    host = str(address[0])
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture
def loopback_only(monkeypatch):
    """Refuse (and record) every socket connection of this process that leaves the loopback interface."""
    refused: list[object] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self, address):
        if not _loopback(address):
            refused.append(address)
            raise OSError(f"test: connection to {address!r} refused (the app must stay offline)")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not _loopback(address):
            refused.append(address)
            return 111
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return refused


@pytest.fixture
def served_app(loopback_only, tmp_path):
    from sr3d_plugin.app.backend import AppBackend
    from sr3d_plugin.app.ui import launch_app
    from sr3d_plugin.cli.eval_cmd import _free_port  # a free TCP port of 127.0.0.1

    backend = AppBackend("tiny", device="cpu", work_dir=tmp_path / "work")
    port = _free_port()
    app = launch_app(backend, "127.0.0.1", port, block=False, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", backend
    finally:
        app.close()
        backend.close()


_PICTURE_RECT = """() => {
  const i = document.querySelector('#sr3d-canvas img');
  const r = i.getBoundingClientRect(), fit = getComputedStyle(i).objectFit;
  let sx = r.width / i.naturalWidth, sy = r.height / i.naturalHeight;
  if (fit !== 'fill') {
    let s = fit === 'none' ? 1 : Math.min(sx, sy);
    if (fit === 'scale-down') s = Math.min(s, 1);
    sx = sy = s;
  }
  const w = i.naturalWidth * sx, h = i.naturalHeight * sy;
  return {x: r.left + (r.width - w) / 2, y: r.top + (r.height - h) / 2, width: w, height: h,
          natural: [i.naturalWidth, i.naturalHeight]};
}"""


def _picture_rect(page) -> dict:
    """Where the frame picture is drawn inside its ``<img>`` (object-fit), once loaded and the layout is still."""
    page.wait_for_function(
        "() => { const i = document.querySelector('#sr3d-canvas img'); return i && i.complete && i.naturalWidth > 0; }"
    )
    rect = page.evaluate(_PICTURE_RECT)
    for _ in range(50):
        page.wait_for_timeout(200)
        again = page.evaluate(_PICTURE_RECT)
        if again == rect:
            break
        rect = again
    return rect


def _save(name: str, png: bytes, tmp_path: Path) -> Path:
    path = tmp_path / name
    path.write_bytes(png)
    target = os.environ.get("SR3D_APP_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / name)
    return path


def test_browser_draws_a_box_and_reads_the_answer(served_app, loopback_only, tmp_path):
    from sr3d_plugin.inference import SR3DPipeline

    url, backend = served_app
    outside: list[str] = []
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"], timeout=_TIMEOUT_MS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            page.set_default_timeout(_TIMEOUT_MS)

            def route(r):
                if r.request.url.startswith(url.rstrip("/")):
                    r.continue_()
                else:
                    outside.append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            page.goto(url, wait_until="domcontentloaded")
            # the bundled synthetic scene is the default input: it loads with the page
            page.wait_for_function(
                "document.querySelector('#sr3d-status textarea')?.value.startsWith('loaded')", timeout=_TIMEOUT_MS
            )
            status = page.locator("#sr3d-status textarea").input_value()
            assert re.match(r"loaded 8 frame\(s\) of 320×240, geometry gt_depth", status), status
            # asking about <region0> before drawing it: the status names the problem, no answer
            page.locator("#sr3d-ask").click()
            page.wait_for_function("document.querySelector('#sr3d-status textarea').value.startsWith('error')")
            error = page.locator("#sr3d-status textarea").input_value()
            assert "refers to <region0> but 0 region(s) were given" in error, error
            assert page.locator("#sr3d-answer textarea").input_value() == ""

            canvas = page.locator("#sr3d-canvas img")
            canvas.wait_for(state="visible")
            rect = _picture_rect(page)
            # the 320×240 frame is shown enlarged a whole number of times (sr3d_plugin.app.views.display_scale)
            assert rect["natural"][0] % 320 == 0 and rect["natural"][0] * 240 == rect["natural"][1] * 320, rect
            assert rect["width"] >= 320

            def click(x: int, y: int) -> None:  # the centre of frame pixel (x, y)
                page.mouse.click(
                    rect["x"] + (x + 0.5) * rect["width"] / 320, rect["y"] + (y + 0.5) * rect["height"] / 240
                )

            shown = (
                "([before]) => { const i = document.querySelector('#sr3d-canvas img'); "
                "return i && i.complete && i.naturalWidth > 0 && i.getAttribute('src') !== before; }"
            )
            before = canvas.get_attribute("src")
            click(60, 40)  # the corners of the red cabinet on frame 0 of the bundled scene (seed 0)
            page.wait_for_function("document.querySelector('#sr3d-status textarea').value.startsWith('first corner')")
            # the frame comes back with the first corner marked; click again once that picture is shown
            page.wait_for_function(shown, arg=[before])
            rect = _picture_rect(page)
            before = canvas.get_attribute("src")
            click(155, 160)
            page.wait_for_function("document.querySelector('#sr3d-regions textarea').value.includes('box=')")
            spec = page.locator("#sr3d-regions textarea").input_value().strip()
            m = re.fullmatch(r"frame=0 box=(\d+),(\d+),(\d+),(\d+)", spec)
            assert m, spec
            x0, y0, x1, y1 = (int(g) for g in m.groups())
            # the clicked pixels are the box's corners (within a pixel of display rounding)
            assert abs(x0 - 60) <= 1 and abs(y0 - 40) <= 1 and abs(x1 - 156) <= 1 and abs(y1 - 161) <= 1, spec
            page.wait_for_function(shown, arg=[before])  # the frame with the new box drawn on it
            _save("app-box.png", page.screenshot(full_page=True), tmp_path)

            # a second box on another frame: frame 1 (the slider's number field), where the cabinet is seen at the right
            before = canvas.get_attribute("src")
            number = page.locator("#sr3d-frame input[type=number]")
            number.fill("1")
            number.press("Enter")
            page.wait_for_function(shown, arg=[before])
            rect = _picture_rect(page)
            before = canvas.get_attribute("src")
            click(240, 45)
            page.wait_for_function("document.querySelector('#sr3d-status textarea').value.startsWith('first corner')")
            page.wait_for_function(shown, arg=[before])
            rect = _picture_rect(page)
            click(300, 180)
            page.wait_for_function("document.querySelector('#sr3d-regions textarea').value.includes('frame=1')")
            specs = page.locator("#sr3d-regions textarea").input_value().strip().splitlines()
            assert specs[0] == spec and len(specs) == 2, specs
            assert re.fullmatch(r"frame=1 box=2(39|40|41),(44|45|46),30[012],18[012]", specs[1]), specs

            question = "Which is closer to the camera, <region0> or <region1>?"
            page.locator("#sr3d-question textarea").fill(question)
            page.locator("#sr3d-ask").click()
            page.wait_for_function("document.querySelector('#sr3d-status textarea').value.startsWith('answered')")
            answer = page.locator("#sr3d-answer textarea").input_value()
            reach_items = page.locator("#sr3d-reach img").count()
            shot = page.screenshot(full_page=True)
        finally:
            browser.close()

    assert answer.strip(), "the page showed an empty answer"
    scene = backend.load("synthetic").ask_kwargs["scene"]
    direct = SR3DPipeline.from_pretrained("tiny", device="cpu", reuse=False).ask(
        question, scene=scene, regions=specs, max_new_tokens=backend.max_new_tokens
    )
    assert answer == direct["answer"]
    assert reach_items >= 8  # one picture per frame (the gallery may repeat the selected one)
    path = _save("app-answer.png", shot, tmp_path)
    png = Image.open(io.BytesIO(path.read_bytes()))
    assert png.format == "PNG" and png.width >= 1000 and png.height >= 800
    pixels = np.asarray(png.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # a rendered page, not a blank one
    assert outside == [] and loopback_only == []


def test_the_loopback_guard_refuses_other_hosts(loopback_only):
    """The guard the browser test relies on: a connection off 127.0.0.1 fails and is recorded."""
    with pytest.raises(OSError, match="refused"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1, never routed
    assert loopback_only and loopback_only[0][0] == "192.0.2.1"
    loopback_only.clear()
