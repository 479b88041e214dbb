"""The things a synthetic scene is made of: :class:`SceneObject` (an oriented, labelled box) and
:class:`Room` (an axis-aligned room with coloured walls and a checkered floor).

The lowest module of :mod:`sr3d_plugin.synthetic`: :mod:`~sr3d_plugin.synthetic.render` draws these,
:mod:`~sr3d_plugin.synthetic.scene` arranges them (and re-exports both names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.geometry import Box3D

__all__ = ["RGB", "Room", "SceneObject"]

#: an RGB colour, 0–255 per channel
RGB = tuple[int, int, int]


def _rgb(value: Any, name: str) -> RGB:
    try:
        out = tuple(int(c) for c in value)
    except (TypeError, ValueError) as exc:
        raise SR3DInputError(f"{name} must be three integers in 0..255, got {value!r}") from exc
    if len(out) != 3 or any(not 0 <= c <= 255 for c in out):
        raise SR3DInputError(f"{name} must be three integers in 0..255, got {value!r}")
    return out  # type: ignore[return-value]


@dataclass
class SceneObject:
    """One object of a scene: an oriented box with a semantic label.

    Attributes:
        id: instance id ≥ 1 (0 is reserved for "no object" in instance maps).
        label: category name (e.g. ``"chair"``).
        box: the oriented box in the aligned world frame, metres (yaw about world z for generated
            scenes).
        color: base RGB colour, 0–255.
    """

    id: int
    label: str
    box: Box3D
    color: RGB = (128, 128, 128)

    def __post_init__(self) -> None:
        if isinstance(self.id, bool) or int(self.id) != self.id or self.id < 1:
            raise SR3DInputError(f"object id must be an integer >= 1 (0 means 'no object'), got {self.id!r}")
        self.id = int(self.id)
        if not isinstance(self.label, str) or not self.label.strip():
            raise SR3DInputError(f"object label must be a non-empty string, got {self.label!r}")
        if not isinstance(self.box, Box3D):
            raise SR3DInputError(f"object box must be a geometry.Box3D, got {type(self.box).__name__}")
        self.color = _rgb(self.color, f"color of object {self.id}")

    @property
    def yaw(self) -> float:
        """Rotation about world z in radians (exact for yaw-only boxes)."""
        r = self.box.rotation
        return math.atan2(float(r[1, 0]), float(r[0, 0]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record: id, label, center [3], size [3], rotation [3][3], color [3]."""
        return {"id": self.id, "label": self.label, **self.box.to_dict(), "color": list(self.color)}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> SceneObject:
        """Inverse of :meth:`to_dict` (``color`` optional)."""
        missing = [k for k in ("id", "label", "center", "size", "rotation") if k not in record]
        if missing:
            raise SR3DInputError(
                f"object record {record!r} lacks {missing}; expected id, label, center, size, rotation"
            )
        box = Box3D(
            np.asarray(record["center"], dtype=np.float64),
            np.asarray(record["size"], dtype=np.float64),
            np.asarray(record["rotation"], dtype=np.float64),
        )
        return cls(int(record["id"]), str(record["label"]), box, tuple(record.get("color", (128, 128, 128))))


@dataclass
class Room:
    """An axis-aligned room; its inner faces (walls, floor, ceiling) are rendered.

    Attributes:
        lower, upper: ``[3]`` interior bounds in metres (z up; generated rooms have the floor at
            ``z = 0``).
        wall_colors: base colours of the −x, +x, −y and +y walls.
        floor_color_a, floor_color_b: the two checkerboard colours of the floor.
        ceiling_color, baseboard_color: plain colours.
        tile_size: floor checker period in metres; stripe_period: wall stripe width in metres.
    """

    lower: np.ndarray
    upper: np.ndarray
    wall_colors: tuple[RGB, RGB, RGB, RGB] = ((226, 218, 200), (216, 208, 190), (221, 213, 195), (231, 223, 205))
    floor_color_a: RGB = (165, 120, 75)
    floor_color_b: RGB = (140, 98, 58)
    ceiling_color: RGB = (240, 240, 236)
    baseboard_color: RGB = (110, 100, 90)
    tile_size: float = 0.5
    stripe_period: float = 0.4

    def __post_init__(self) -> None:
        self.lower = np.asarray(self.lower, dtype=np.float64).reshape(-1)
        self.upper = np.asarray(self.upper, dtype=np.float64).reshape(-1)
        if self.lower.shape != (3,) or self.upper.shape != (3,):
            raise SR3DInputError(f"room bounds must be [3] each, got {self.lower.shape} and {self.upper.shape}")
        if not (np.isfinite(self.lower).all() and np.isfinite(self.upper).all()) or (self.upper <= self.lower).any():
            raise SR3DInputError(
                f"room bounds must be finite with lower < upper on every axis, got {self.lower} / {self.upper}"
            )
        if len(self.wall_colors) != 4:
            raise SR3DInputError(f"room needs 4 wall colours (−x, +x, −y, +y), got {len(self.wall_colors)}")
        self.wall_colors = tuple(_rgb(c, "wall colour") for c in self.wall_colors)  # type: ignore[assignment]
        for name in ("floor_color_a", "floor_color_b", "ceiling_color", "baseboard_color"):
            setattr(self, name, _rgb(getattr(self, name), name))
        if self.tile_size <= 0 or self.stripe_period <= 0:
            raise SR3DInputError(f"tile_size and stripe_period must be > 0, got {self.tile_size}, {self.stripe_period}")

    @property
    def size(self) -> np.ndarray:
        """``[3]`` interior extent in metres."""
        return self.upper - self.lower

    @property
    def center(self) -> np.ndarray:
        """``[3]`` centre of the interior."""
        return (self.lower + self.upper) / 2

    def to_dict(self) -> dict[str, Any]:
        return {"lower": self.lower.tolist(), "upper": self.upper.tolist()}
