"""The built wheel ships every task and recipe file (lmms-eval reads the YAML from the installed package)."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _shipped_files(folder: str) -> set[str]:
    base = ROOT / folder
    return {
        p.relative_to(ROOT).as_posix()
        for p in base.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_wheel_contains_every_task_and_recipe_file(tmp_path: Path) -> None:
    hatch = pytest.importorskip("hatchling.builders.wheel")
    (wheel,) = hatch.WheelBuilder(str(ROOT)).build(directory=str(tmp_path), versions=["standard"])
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        z.extractall(tmp_path / "site")
    expected = _shipped_files("eval_tasks") | _shipped_files("recipes")
    assert any(p.endswith(".yaml") and p.startswith("eval_tasks/") for p in expected)
    missing = sorted(p for p in expected if f"sr3d_plugin/{p}" not in names)
    assert not missing, f"not in the wheel: {missing}"
    assert "[lmms_eval.models]\nsr3d = sr3d_plugin.evaluation.lmms_entry:manifests" in entry_points
    # installed from the wheel, the package finds its task folder inside itself (resources.py is standalone)
    spec = importlib.util.spec_from_file_location("wheel_resources", tmp_path / "site" / "sr3d_plugin" / "resources.py")
    assert spec is not None and spec.loader is not None
    resources = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(resources)
    folder = resources.eval_tasks_dir()
    assert folder == tmp_path / "site" / "sr3d_plugin" / "eval_tasks"
    assert (folder / "sr3d_scan2cap" / "sr3d_scan2cap.yaml").is_file() and (folder / "sr3d_3d.yaml").is_file()
