"""Frame readers, depth estimators and point-map sources."""

from sr3d_plugin.sources.base import FrameSet, PointMaps, uniform_frame_indices

__all__ = ["FrameSet", "PointMaps", "uniform_frame_indices"]
