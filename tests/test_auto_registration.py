"""How transformers' Auto classes learn ``sr3d`` (transformers 5; the decision is in sr3d_plugin/_compat.py).

``import sr3d_plugin`` imports neither torch nor transformers, yet ``AutoConfig`` / ``AutoProcessor`` /
``AutoModel*`` load our folders afterwards, whichever is imported first. Each check runs in a fresh
interpreter: registration must not depend on what an earlier test imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    from sr3d_plugin.testing import build_tiny_model

    folder = tmp_path_factory.mktemp("sr3d-folder")
    model, processor = build_tiny_model(seed=0)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


def test_auto_classes_load_our_folders_after_a_bare_import(saved_folder) -> None:
    """AutoProcessor first (it may pick the class by name, before any config exists), then config and model."""
    code = f"""
import sr3d_plugin
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
print(type(AutoProcessor.from_pretrained({str(saved_folder)!r})).__name__)
print(type(AutoConfig.from_pretrained({str(saved_folder)!r})).__name__)
print(type(AutoModelForImageTextToText.from_pretrained({str(saved_folder)!r})).__name__)
"""
    assert _python(code)[-3:] == ["SR3DProcessor", "SR3DConfig", "SR3DForConditionalGeneration"]


def test_auto_classes_imported_before_the_package_work_too(saved_folder) -> None:
    code = f"""
from transformers import AutoModel, AutoModelForCausalLM
import sr3d_plugin
print(type(AutoModel.from_pretrained({str(saved_folder)!r})).__name__)
print(type(AutoModelForCausalLM.from_pretrained({str(saved_folder)!r})).__name__)
"""
    assert _python(code)[-2:] == ["SR3DForConditionalGeneration", "SR3DForConditionalGeneration"]


def test_register_auto_classes_is_explicit_and_idempotent() -> None:
    code = """
import sr3d_plugin
sr3d_plugin.register_auto_classes(); sr3d_plugin.register_auto_classes()
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING as M
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING as P
from sr3d_plugin.modeling import SR3DConfig, SR3DForConditionalGeneration, SR3DProcessor
print(M[SR3DConfig] is SR3DForConditionalGeneration, P[SR3DConfig] is SR3DProcessor)
"""
    assert _python(code)[-1] == "True True"
