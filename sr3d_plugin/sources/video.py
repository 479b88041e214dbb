"""The ``video`` frame reader: uniform frame sampling from a video file with PyAV.

SR3D-FACTS §3: ``num_frames`` (32) frames at ``floor(linspace(0, N−1, num_frames))`` where ``N`` is
the number of frames that actually decode. Container metadata (``stream.frames``) is only used as a
first guess: it is zero for many containers (MKV, WebM, some MP4 muxers) and sometimes wrong, so
the decoded count is always checked and the video decoded a second time when the guess was off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from sr3d_plugin import _checks
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.limits import check_pixels
from sr3d_plugin.sources.base import FrameSet, uniform_frame_indices
from sr3d_plugin.sources.files import require_file

__all__ = ["VideoReader", "metadata_frame_count"]


def _open(path: Path) -> Any:
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise SR3DInputError(f"video {str(path)!r} cannot be opened by PyAV/FFmpeg: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise SR3DInputError(f"{str(path)!r} has no video stream")
    return container


def metadata_frame_count(path: str | os.PathLike) -> int:
    """Frame count claimed by the container (``stream.frames``, else duration × rate); 0 if unknown."""
    with _open(Path(path)) as container:
        stream = container.streams.video[0]
        if stream.frames and stream.frames > 0:
            return int(stream.frames)
        rate = stream.average_rate or stream.guessed_rate
        if stream.duration and stream.time_base and rate:
            return max(0, round(float(stream.duration * stream.time_base * rate)))
        return 0


def _decode(path: Path, wanted: set[int]) -> tuple[dict[int, Image.Image], dict[int, float], int, dict[str, Any]]:
    """Decode every frame; keep the ``wanted`` ones as RGB PIL images. Returns (frames, times, count, info)."""
    import av

    kept: dict[int, Image.Image] = {}
    times: dict[int, float] = {}
    count = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        info = {
            "fps": float(rate) if rate else None,
            "codec": stream.codec_context.name,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
        }
        w, h = int(info["width"] or 0), int(info["height"] or 0)
        check_pixels(w * h, f"video {str(path)!r} frame", (w, h))  # per frame, from the stream header
        try:
            for frame in container.decode(stream):
                if count in wanted:
                    kept[count] = frame.to_image().convert("RGB")
                    times[count] = float(frame.time) if frame.time is not None else float("nan")
                count += 1
        except av.error.FFmpegError as exc:
            if count == 0:
                raise SR3DInputError(f"video {str(path)!r} could not be decoded: {exc}") from exc
            # A truncated file: keep what decoded, as players do.
            info["decode_error"] = str(exc)
    return kept, times, count, info


class VideoReader:
    """Sample frames uniformly from a video file.

    Args:
        num_frames: frames to return (all frames when the video has fewer), default 32.

    ``read(path)`` returns a :class:`FrameSet` of RGB PIL frames without geometry;
    ``meta`` holds ``fps``, ``total_frames`` (decoded), ``metadata_frames`` (claimed by the
    container), ``frame_indices`` and ``timestamps`` (seconds) of the returned frames.
    """

    name = "video"

    def __init__(self, num_frames: int = 32) -> None:
        self.num_frames = _checks.integer(num_frames, "num_frames", minimum=1)

    def read(self, path: str | os.PathLike) -> FrameSet:
        p = require_file(path, "video file")
        guess = metadata_frame_count(p)
        indices: list[int] = []
        kept: dict[int, Image.Image] = {}
        times: dict[int, float] = {}
        total = 0
        info: dict[str, Any] = {}
        if guess > 0:
            indices = uniform_frame_indices(guess, self.num_frames)
            kept, times, total, info = _decode(p, set(indices))
        if guess <= 0 or total != guess:
            if guess <= 0:
                _, _, total, info = _decode(p, set())
            if total == 0:
                raise SR3DInputError(f"video {str(p)!r} has no decodable frames")
            new_indices = uniform_frame_indices(total, self.num_frames)
            if not set(new_indices) <= set(kept):
                kept, times, total2, info = _decode(p, set(new_indices))
                if total2 != total:
                    raise SR3DInputError(
                        f"video {str(p)!r} decoded to {total} then {total2} frames; the file is unstable"
                    )
            indices = new_indices
        missing = [i for i in indices if i not in kept]
        if missing:  # pragma: no cover - guarded above
            raise SR3DInputError(f"frames {missing} of {str(p)!r} could not be decoded")
        images = [kept[i] for i in indices]
        return FrameSet(
            images=images,
            frame_ids=[str(i) for i in indices],
            source=str(p),
            meta={
                "reader": {"name": self.name, "options": {"num_frames": self.num_frames}},
                "total_frames": total,
                "metadata_frames": guess,
                "frame_indices": indices,
                "timestamps": [times.get(i) for i in indices],
                "input_files": [str(p)],
                **info,
            },
        )
