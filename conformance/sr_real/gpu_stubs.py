"""Stand-ins for GPU-only packages that the original SR-REAL code imports at module level.

Only import-time names are provided; none of them is called on the CPU inference path that the
recorder exercises (a call raises, so a silent use would be noticed).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

#: packages imported by llava/* at module level that need CUDA (or are training-only)
STUBBED = (
    "deepspeed",
    "flash_attn",
    "triton",
    "bitsandbytes",
    "s2wrapper",
    "xgrammar",
    "liger_kernel",
    "ring_flash_attn",
    "qtorch",
    "transformer_engine",
    "apex",
    "wandb",
    "kornia",
    "torchvision",
    "datasets",
    "tyro",
    "openai",
    "pytorchvideo",
    "decord",
    "webdataset",
    "jsonlines",
)


class _Missing:
    """Any attribute, call or subclassing works at import time; calling raises."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, item: str) -> _Missing:
        if item.startswith("__"):
            raise AttributeError(item)
        return _Missing(f"{self._name}.{item}")

    def __call__(self, *args, **kwargs):
        # decorators (triton.jit, torch.compile-like) are used at import time: return the function
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        if not args and kwargs:
            return lambda f: f
        raise RuntimeError(f"GPU-only stub {self._name} was called")

    def __mro_entries__(self, bases):
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, item: str):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Missing(f"{self.__name__}.{item}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _StubModule(spec.name)
        mod.__path__ = []
        return mod

    def exec_module(self, module):
        return None


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
