"""STUB of deepspeed (GPU-only, not installable here): imported by VILA's sequence-parallel modules only."""

from _gpu_only import unavailable

initialize = unavailable("deepspeed.initialize")


class _Zero:
    GatheredParameters = unavailable("deepspeed.zero.GatheredParameters")


zero = _Zero()
