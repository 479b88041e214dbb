"""Narrow filters for known, harmless third-party console noise (each matched by category and message).

- transformers 5: ``FutureWarning`` "`is_gradient_checkpointing` is deprecated" (raised from peft's and
  accelerate's own calls, not from ours);
- peft: ``UserWarning`` "Setting `save_embedding_layers` to `True`" on every adapter save when ``lm_head``
  is a LoRA target (the embeddings are saved, as intended);
- bitsandbytes: the CPU backend's log record "Failed to load CPU gemm_4bit_forward from kernels-community"
  (logger ``bitsandbytes.backends.cpu.ops``; the pure-PyTorch fallback is used);
- DeepSpeed (where installed, e.g. by the ``deepspeed`` extra): "Setting accelerator to CPU" on every import
  without a GPU (logger ``DeepSpeed``, which writes to *stdout*, so it would break ``--json``'s one object
  per line).

Anything else, from those libraries included, still reaches the console.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["KNOWN_LOG_RECORDS", "KNOWN_WARNINGS", "install_log_filters", "known_warnings_silenced"]

#: (category, message regex matched at the start of the warning text)
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (UserWarning, r"Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`"),
)

#: logger name -> start of the log message to drop
KNOWN_LOG_RECORDS: dict[str, str] = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "DeepSpeed": "Setting accelerator to CPU",
}


class _DropKnown(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install_log_filters() -> None:
    """Attach the :data:`KNOWN_LOG_RECORDS` filters to their loggers (idempotent; before or after the import)."""
    for name, prefix in KNOWN_LOG_RECORDS.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) and f.prefix == prefix for f in log.filters):
            log.addFilter(_DropKnown(prefix))


def _add_warning_filters() -> None:
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def install() -> None:
    """Process-wide: the log filters and the :data:`KNOWN_WARNINGS` filters (the ``sr3d`` command calls this)."""
    install_log_filters()
    _add_warning_filters()


@contextlib.contextmanager
def known_warnings_silenced() -> Iterator[None]:
    """Within the block only: ignore :data:`KNOWN_WARNINGS` (the warning filters are restored afterwards)."""
    install_log_filters()
    with warnings.catch_warnings():
        _add_warning_filters()
        yield
