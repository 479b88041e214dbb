"""``sr3d app``: serve the SR-3D browser page (Gradio) on this machine."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "app",
        help="a browser page: load an image, video or scan (or the bundled synthetic scene), draw boxes, ask",
        description=(
            "Serves a Gradio page on http://HOST:PORT: load an image (with an optional depth map), a video (with "
            "optional point maps), a ScanNet-style scan folder or the bundled synthetic scene; click two corners per "
            "box on any frame; ask. It shows the answer, each region on every frame it reaches and the canonical "
            "point map. Runs offline with the bundled tiny model by default. Needs the extra: "
            "pip install 'sr3d-plugin[app]'."
        ),
    )
    p.add_argument("--model", default="tiny", help="model folder, or 'tiny' for the bundled tiny SR-3D (default)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA when available)")
    p.add_argument(
        "--depth-model",
        default=None,
        help="Depth Anything V2 id or local folder for images / videos loaded without depth or point maps",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer budget per question (default 32)")
    p.add_argument(
        "--share",
        choices=["never"],
        default="never",
        help="public share links: never (the page is served from this machine only; no tunnel is opened)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sr3d_plugin.errors import SR3DInputError

    if not 0 < args.port < 65536:
        raise SR3DInputError(f"--port {args.port}: expected a TCP port in 1..65535")
    from sr3d_plugin.app.ui import launch_app, require_gradio

    require_gradio()  # before loading the model: a missing extra is reported at once
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    from sr3d_plugin.app.backend import AppBackend

    backend = AppBackend(
        args.model, device=args.device, depth_model=args.depth_model, max_new_tokens=args.max_new_tokens
    )
    try:
        _ = backend.pipeline  # load the model now, so that its errors come before the server starts
        print(f"sr3d app: serving {args.model} on http://{args.host}:{args.port} (Ctrl+C stops)")
        launch_app(backend, args.host, args.port, block=True, quiet=True)
    finally:
        backend.close()
    return 0
