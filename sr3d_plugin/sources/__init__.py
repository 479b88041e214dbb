"""Frame readers, depth estimators and point-map sources.

Registered names (kinds of :mod:`sr3d_plugin.plugins`):

* ``frame_readers``: ``scannet`` (:class:`ScanNetReader`), ``image`` (:class:`ImageReader`),
  ``frames`` (:class:`FramesReader`), ``video`` (:class:`VideoReader`);
* ``depth_estimators``: ``depth_anything_v2`` (:class:`DepthAnythingV2Estimator`);
* ``pointmap_sources``: ``gt_depth``, ``relative_depth``, ``depth_anything``, ``reconstruction``.

Heavy dependencies (PyAV, transformers) are imported only when a reader or estimator runs.
"""

from sr3d_plugin.sources.base import FrameSet, PointMaps, uniform_frame_indices
from sr3d_plugin.sources.depth_anything import DEFAULT_DEPTH_MODEL, DepthAnythingV2Estimator
from sr3d_plugin.sources.images import FramesReader, ImageReader
from sr3d_plugin.sources.pointmap_sources import DepthAnythingSource, GTDepthSource, RelativeDepthSource
from sr3d_plugin.sources.reconstruction import Reconstruction, ReconstructionSource, load_reconstruction
from sr3d_plugin.sources.scannet import ScanNetReader, read_axis_alignment
from sr3d_plugin.sources.video import VideoReader

__all__ = [
    "DEFAULT_DEPTH_MODEL",
    "DepthAnythingSource",
    "DepthAnythingV2Estimator",
    "FrameSet",
    "FramesReader",
    "GTDepthSource",
    "ImageReader",
    "PointMaps",
    "Reconstruction",
    "ReconstructionSource",
    "RelativeDepthSource",
    "ScanNetReader",
    "VideoReader",
    "load_reconstruction",
    "read_axis_alignment",
    "uniform_frame_indices",
]
