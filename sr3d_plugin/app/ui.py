"""The ``sr3d app`` page (Gradio): load an input, click two corners per box, ask, see the answer and the regions.

Gradio is imported here only (extra ``app``); :func:`require_gradio` turns its absence into an
:class:`~sr3d_plugin.errors.SR3DDependencyError`. The page talks to an
:class:`~sr3d_plugin.app.backend.AppBackend`; elements the browser test drives carry ``elem_id``\\ s
(``sr3d-canvas``, ``sr3d-regions``, ``sr3d-question``, ``sr3d-ask``, ``sr3d-answer`` …).
"""

from __future__ import annotations

import os
from typing import Any

from sr3d_plugin.errors import SR3DDependencyError, SR3DError

__all__ = ["build_app", "launch_app", "require_gradio"]

_SOURCES = {
    "bundled synthetic scene": "synthetic",
    "image (+ depth map)": "image",
    "video (+ point maps)": "video",
    "scan folder (.zip or path)": "scan",
}
_DEFAULT_QUESTION = "What is <region0>?"


def require_gradio() -> Any:
    """The ``gradio`` module, with analytics off; :class:`SR3DDependencyError` when it is not installed."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as exc:
        raise SR3DDependencyError(
            f"sr3d app needs gradio, which is not installed ({exc}); install it with: pip install 'sr3d-plugin[app]'"
        ) from exc
    return gradio


def _path(file: Any) -> str | None:
    """A Gradio upload (path string, or an object with ``.name`` / ``["path"]``) as a path."""
    if file is None or file == "":
        return None
    if isinstance(file, dict):
        return file.get("path")
    return str(getattr(file, "name", file))


def build_app(backend: Any) -> Any:
    """The page as a ``gradio.Blocks`` (not launched) on an :class:`~sr3d_plugin.app.backend.AppBackend`."""
    gr = require_gradio()
    from PIL import Image

    from sr3d_plugin.app.views import box_spec_from_corners, display_scale, draw_corner, draw_regions, region_specs
    from sr3d_plugin.regions import parse_region_spec, resolve_regions

    def canvas_image(key: str | None, frame: int, text: str, corner: Any = None) -> Any:
        loaded = backend.get(key)
        k = int(frame)
        image = loaded.frame(k)
        regions = []
        try:
            specs = region_specs(text)
        except SR3DError:
            specs = []
        for i, spec in enumerate(specs):
            s = parse_region_spec(spec)
            if s.frame == k or (s.frame is None and loaded.num_frames == 1):
                try:
                    (region,) = resolve_regions([s], loaded.frames)
                except SR3DError:
                    continue
                regions.append((i, region.masks[k]))
        image = draw_regions(image, regions, drawn=[i for i, _ in regions], alpha=0.25)
        if corner is not None:
            image = draw_corner(image, corner, len(specs))
        f = display_scale(image.size)
        return image.resize((image.width * f, image.height * f), Image.Resampling.NEAREST) if f > 1 else image

    def on_load(source: str, seed: float, views: float, image: Any, depth: Any, intr: Any, video: Any, points: Any,
                scan_file: Any, scan_path: str, state: dict) -> tuple:  # fmt: skip
        try:
            loaded = backend.load(
                _SOURCES[source],
                seed=int(seed),
                num_frames=int(views),
                image=_path(image),
                depth=_path(depth),
                intrinsics=_path(intr),
                video=_path(video),
                points=_path(points),
                scan=_path(scan_file) or ((scan_path or "").strip() or None),
            )
        except SR3DError as exc:
            return (state, gr.update(), gr.update(), gr.update(), f"error: {exc}")
        state = {"key": loaded.key, "corner": None}
        v = loaded.num_frames
        w, h = loaded.frames.images[0].size
        geo = loaded.geometry.get("source") or "none"
        status = f"loaded {v} frame(s) of {w}×{h}, geometry {geo}; click two opposite corners of a box on a frame"
        slider = gr.update(minimum=0, maximum=max(v - 1, 1), value=0, interactive=v > 1)
        pointmaps = [(p, f"frame {k}") for k, p in enumerate(loaded.pointmap_images())]
        return (state, slider, canvas_image(loaded.key, 0, ""), pointmaps, status)

    def on_frame(state: dict, frame: float, text: str) -> tuple:
        state = {**state, "corner": None}
        try:
            return state, canvas_image(state.get("key"), int(frame), text)
        except SR3DError:
            return state, gr.update()

    def on_click(state: dict, frame: float, text: str, evt: gr.SelectData) -> tuple:
        key = state.get("key")
        try:
            loaded = backend.get(key)
        except SR3DError as exc:
            return state, text, gr.update(), f"error: {exc}"
        k = int(frame)
        f = display_scale(loaded.frames.images[k].size)  # the frame is shown enlarged f times
        x, y = int(evt.index[0]) // f, int(evt.index[1]) // f
        if state.get("corner") is None:
            state = {**state, "corner": [x, y]}
            return (
                state,
                text,
                canvas_image(key, k, text, (x, y)),
                f"first corner ({x}, {y}) on frame {k}; click the opposite corner",
            )
        first = state["corner"]
        state = {**state, "corner": None}
        try:
            spec = box_spec_from_corners(k, first, (x, y), loaded.frames.images[k].size)
        except SR3DError as exc:
            return state, text, canvas_image(key, k, text), f"error: {exc}"
        lines = [ln for ln in (text or "").splitlines() if ln.strip()]
        text = "\n".join([*lines, spec])
        try:
            n = len(region_specs(text)) - 1
        except SR3DError:  # a hand-edited line above does not parse: Ask will name it
            n = len(lines)
        return state, text, canvas_image(key, k, text), f"added region {n}: {spec} (refer to it as <region{n}>)"

    on_click.__annotations__["evt"] = gr.SelectData  # gradio finds the event argument by its (evaluated) type

    def on_clear(state: dict, frame: float) -> tuple:
        state = {**state, "corner": None}
        try:
            return state, "", canvas_image(state.get("key"), int(frame), "")
        except SR3DError:
            return state, "", gr.update()

    def on_ask(state: dict, question: str, text: str) -> tuple:
        try:
            loaded = backend.get(state.get("key"))
            specs = region_specs(text)
            result = backend.ask(loaded, question, specs)
        except SR3DError as exc:
            return "", gr.update(), {}, f"error: {exc}"
        reach = result.pop("reach")
        gallery = backend.reach_images(loaded, reach, specs)
        v = loaded.num_frames
        status = f"answered in {result['timings']['total']:.2f} s; " + (
            ", ".join(f"region {i} reaches {len(r)} of {v} frame(s)" for i, r in enumerate(reach)) or "no regions"
        )
        return result["answer"], gallery, result, status

    with gr.Blocks(title="SR-3D", analytics_enabled=False) as app:
        state = gr.State({"key": None, "corner": None})
        gr.Markdown(
            "## SR-3D: ask about regions in 3D\n"
            "Load an input, click **two opposite corners** of a box on a frame (repeat for more regions), "
            "refer to them as `<region0>`, `<region1>` … and ask."
        )
        with gr.Row():
            with gr.Column(scale=1):
                source = gr.Radio(list(_SOURCES), value="bundled synthetic scene", label="input", elem_id="sr3d-source")
                with gr.Group(visible=True) as synthetic_box, gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="scene seed", elem_id="sr3d-seed")
                    views = gr.Number(value=8, precision=0, minimum=1, maximum=64, label="views",
                                      elem_id="sr3d-views")  # fmt: skip
                with gr.Group(visible=False) as image_box:
                    image = gr.File(label="image", file_types=["image"], height=90, elem_id="sr3d-image")
                    depth = gr.File(label="depth map (optional)", height=90, elem_id="sr3d-depth")
                    intr = gr.File(label="intrinsics K.txt (optional, with a depth map)", height=90,
                                   elem_id="sr3d-intrinsics")  # fmt: skip
                with gr.Group(visible=False) as video_box:
                    video = gr.File(label="video", file_types=["video"], height=90, elem_id="sr3d-video")
                    points = gr.File(label="point maps .npz / .npy (optional)", height=90, elem_id="sr3d-points")
                with gr.Group(visible=False) as scan_box:
                    scan_file = gr.File(label="scan folder as .zip", file_types=[".zip"], height=90,
                                        elem_id="sr3d-scan-zip")  # fmt: skip
                    scan_path = gr.Textbox(label="or a scan folder on this machine", elem_id="sr3d-scan-path")
                load = gr.Button("Load", variant="secondary", elem_id="sr3d-load")
            with gr.Column(scale=2):
                frame = gr.Slider(0, 1, value=0, step=1, label="frame", elem_id="sr3d-frame")
                canvas = gr.Image(label="click two opposite corners to draw a box", interactive=False, type="pil",
                                  elem_id="sr3d-canvas")  # fmt: skip
                regions = gr.Textbox(label="regions (one spec per line)", lines=3, elem_id="sr3d-regions")
                clear = gr.Button("Clear regions", size="sm", elem_id="sr3d-clear")
                question = gr.Textbox(value=_DEFAULT_QUESTION, label="question", elem_id="sr3d-question")
                ask = gr.Button("Ask", variant="primary", elem_id="sr3d-ask")
                answer = gr.Textbox(label="answer", interactive=False, elem_id="sr3d-answer")
                status = gr.Textbox(label="status", interactive=False, elem_id="sr3d-status")
        reach = gr.Gallery(
            label="each region on every frame it reaches", columns=4, object_fit="contain", elem_id="sr3d-reach"
        )
        pointmaps = gr.Gallery(
            label="canonical point map (xyz → RGB)", columns=4, object_fit="contain", elem_id="sr3d-pointmap"
        )
        with gr.Accordion("details (the result of SR3DPipeline.ask)", open=False):
            details = gr.JSON(label="details", elem_id="sr3d-details")

        boxes = {"synthetic": synthetic_box, "image": image_box, "video": video_box, "scan": scan_box}

        def on_source(choice: str) -> list:
            return [gr.update(visible=_SOURCES[choice] == kind) for kind in boxes]

        source.change(on_source, [source], list(boxes.values()))
        load_inputs = [source, seed, views, image, depth, intr, video, points, scan_file, scan_path, state]
        load_outputs = [state, frame, canvas, pointmaps, status]
        load.click(on_load, load_inputs, load_outputs)
        app.load(on_load, load_inputs, load_outputs)
        frame.change(on_frame, [state, frame, regions], [state, canvas])
        canvas.select(on_click, [state, frame, regions], [state, regions, canvas, status])
        regions.blur(on_frame, [state, frame, regions], [state, canvas])
        clear.click(on_clear, [state, frame], [state, regions, canvas])
        ask.click(on_ask, [state, question, regions], [answer, reach, details, status])
        question.submit(on_ask, [state, question, regions], [answer, reach, details, status])
    return app


def launch_app(
    backend: Any, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True, quiet: bool = False
) -> Any:
    """Build the page and serve it on ``http://host:port`` (no share link, no analytics).

    Args:
        backend: the :class:`~sr3d_plugin.app.backend.AppBackend`.
        host: interface to listen on (default loopback only).
        port: TCP port.
        block: serve until interrupted (False: return at once, the server runs in a thread; call
            ``.close()`` on the returned app to stop it).
        quiet: do not print the URL.

    Returns:
        The launched ``gradio.Blocks``.
    """
    app = build_app(backend)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=int(port),
        share=False,
        inbrowser=False,
        prevent_thread_lock=not block,
        quiet=quiet,
        show_error=True,
    )
    return app
