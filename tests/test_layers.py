"""The package's layers: a light root, a CLI without torch, lazy model classes, and how Auto registration happens.

Runs on both stacks (CI runs it in the project venv and in the transformers-4.46 venv): every check
runs in a fresh interpreter, because what matters is what a new process imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sr3d_plugin._compat import model_classes_available, require_model_classes
from sr3d_plugin.errors import SR3DDependencyError

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "numpy")


def _python(code: str, timeout: int = 240) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_import_sr3d_plugin_imports_neither_torch_nor_transformers() -> None:
    out = _python(
        "import sys, json, sr3d_plugin, sr3d_plugin.modeling, sr3d_plugin.plugins, sr3d_plugin.cli\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert json.loads(out) == []


def test_the_cli_starts_without_torch_or_transformers() -> None:
    """--help, --version, recipes, plugins, tasks-path and every sub-command's --help, in one process."""
    from sr3d_plugin.cli import COMMAND_MODULES

    assert "sr3d_plugin.cli.conformance_cmd" in COMMAND_MODULES
    code = f"""
import contextlib, io, json, sys
from sr3d_plugin.cli import COMMAND_MODULES, build_parser, main
names = sorted(build_parser()._subparsers._group_actions[0].choices)
runs = [["--help"], ["--version"], ["recipes"], ["plugins"], ["plugins", "--json"], ["tasks-path"]]
runs += [[name, "--help"] for name in names]
codes = {{}}
for argv in runs:
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        try:
            codes[" ".join(argv)] = main(argv)
        except SystemExit as exc:
            codes[" ".join(argv)] = exc.code
    if argv == ["plugins", "--json"]:
        listed = {{c["kind"] for c in json.loads(out.getvalue())["components"]}}
print(json.dumps({{"heavy": [m for m in {HEAVY!r} if m in sys.modules], "codes": codes, "names": names,
                  "kinds": sorted(listed)}}))
"""
    result = json.loads(_python(code))
    assert result["heavy"] == [], result["heavy"]
    assert {"conformance", "ask", "train", "eval", "tasks-path", "plugins", "recipes"} <= set(result["names"])
    assert all(code in (0, None) for code in result["codes"].values()), result["codes"]
    assert {"projectors", "position_encoders", "region_extractors", "model_builders"} <= set(result["kinds"])


def test_core_and_the_vila_integration_import_without_the_model_classes() -> None:
    code = (
        "import sys, json\n"
        "import sr3d_plugin.geometry, sr3d_plugin.tiling, sr3d_plugin.sources, sr3d_plugin.regions, sr3d_plugin.plugins\n"
        "import sr3d_plugin.integrations.vila\n"
        "from sr3d_plugin.modeling import PositionEncoder3D, RegionExtractor, build_projector, Region, VisualInput\n"
        "from sr3d_plugin import plugins\n"
        "pe = plugins.create('position_encoders', 'abs_mlp', 32)\n"
        "print(json.dumps([m for m in ('transformers', 'sr3d_plugin.modeling.configuration_sr3d',\n"
        "                  'sr3d_plugin.modeling.modeling_sr3d', 'sr3d_plugin.modeling.processing_sr3d') if m in sys.modules]))"
    )
    assert json.loads(_python(code)) == []


def test_model_classes_refuse_an_old_transformers_by_name() -> None:
    """With transformers 4.x the model classes raise SR3DDependencyError naming the version (a stub module here)."""
    code = (
        "import sys, types, json\n"
        "sys.modules['transformers'] = types.SimpleNamespace(__version__='4.46.0')\n"
        "from sr3d_plugin.errors import SR3DDependencyError\n"
        "out = {}\n"
        "for stmt in ('from sr3d_plugin import SR3DForConditionalGeneration', 'from sr3d_plugin.modeling import SR3DConfig',\n"
        "             'import sr3d_plugin.modeling.modeling_sr3d', 'import sr3d_plugin.builders.vila'):\n"
        "    try:\n"
        "        exec(stmt)\n"
        "        out[stmt] = 'imported'\n"
        "    except SR3DDependencyError as exc:\n"
        "        out[stmt] = str(exc)\n"
        "    except ImportError as exc:\n"
        "        out[stmt] = 'ImportError: ' + str(exc)\n"
        "print(json.dumps(out))"
    )
    out = json.loads(_python(code))
    for stmt, message in out.items():
        assert "needs transformers>=5.0, but transformers 4.46.0 is installed" in message, (stmt, message)
        assert "sr3d_plugin.integrations.vila" in message  # and says what works there


def test_require_model_classes_matches_the_installed_transformers() -> None:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    assert model_classes_available() == (major >= 5)
    if major >= 5:
        require_model_classes("x")  # no error
        from sr3d_plugin import SR3DForConditionalGeneration
        from sr3d_plugin.modeling.modeling_sr3d import SR3DForConditionalGeneration as direct

        assert SR3DForConditionalGeneration is direct
    else:
        with pytest.raises(SR3DDependencyError, match=rf"transformers {transformers.__version__} is installed"):
            require_model_classes("x")
