"""Converters from the official raw releases to the prepared evaluation layout (``sr3d prepare``).

Registered under the plugin kind ``dataset_converters``: ``scannet`` (:mod:`.scannet`), ``scanqa`` and
``sqa3d`` (:mod:`.qa`), ``scan2cap`` (:mod:`.scan2cap`), ``vsibench`` (:mod:`.vsibench`). The
converter protocol is described in :mod:`.common`; the accepted files in each module and in
``docs/evaluation.md``.
"""
