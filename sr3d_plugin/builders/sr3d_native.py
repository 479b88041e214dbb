"""Builder for folders written by ``SR3DForConditionalGeneration.save_pretrained`` (model_type ``sr3d``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class NativeBuilder:
    """Our own standard folders: config + safetensors + processor files."""

    name = "sr3d"

    def can_load(self, path: Path, config: dict[str, Any]) -> bool:
        return config.get("model_type") == "sr3d"

    def config(self, path: Path, **kwargs: Any) -> Any:
        """The :class:`SR3DConfig` of the folder (``config.json``; SR3DConfig fields in ``kwargs`` win), no weights."""
        from sr3d_plugin.builders._common import split_config_overrides
        from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig

        config = SR3DConfig.from_pretrained(str(path))
        for key, value in split_config_overrides(dict(kwargs)).items():
            setattr(config, key, value)
        return config

    def load(self, path: Path, dtype: Any = None, device_map: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        from sr3d_plugin.modeling import SR3DForConditionalGeneration, SR3DProcessor
        from sr3d_plugin.modeling.configuration_sr3d import parse_dtype

        model = SR3DForConditionalGeneration.from_pretrained(
            str(path), dtype=parse_dtype(dtype), device_map=device_map, **kwargs
        )
        gen_file = Path(path) / "generation_config.json"
        if gen_file.is_file():  # the stop tokens of the source checkpoint (e.g. written by convert-vila)
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(str(path))
        processor = SR3DProcessor.from_pretrained(str(path))
        return model.eval(), processor
