"""The pluggy plugin system: built-ins through the hooks, third-party plugins via entry points."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from sr3d_plugin import cli, hookimpl, plugins
from sr3d_plugin.errors import SR3DPluginError

PLUGIN_SOURCE = textwrap.dedent(
    '''
    """A third-party sr3d plugin, installed by the test as a real distribution on sys.path."""
    import torch
    from sr3d_plugin import hookimpl


    class ScaledLinear(torch.nn.Module):
        def __init__(self, vision_hidden_size, llm_hidden_size, scale=2.0):
            super().__init__()
            self.layers = torch.nn.Linear(vision_hidden_size, llm_hidden_size)
            self.scale = scale

        def forward(self, x):
            return self.layers(x) * self.scale


    class ConstantDepth:
        def __init__(self, value=1.0):
            self.value = value

        def estimate(self, images):
            import numpy as np
            return np.stack([np.full((im.height, im.width), self.value, dtype="float32") for im in images])


    @hookimpl
    def register_projectors(register):
        register("scaled_linear", ScaledLinear)


    @hookimpl
    def register_depth_estimators(register):
        register("constant_depth", ConstantDepth)
    '''
)


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write package ``acme_sr3d`` and its dist-info (with an ``sr3d`` entry point) onto sys.path."""
    pkg = tmp_path / "acme_sr3d"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(PLUGIN_SOURCE)
    info = tmp_path / "acme_sr3d-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-sr3d\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[sr3d]\nacme = acme_sr3d\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("SR3D_LOAD_PLUGINS", raising=False)
    plugins.reset()
    yield "acme"
    plugins.reset()


def test_builtins_are_registered_through_the_hooks() -> None:
    plugins.reset()
    regs = plugins.registry("projectors")
    assert {"mlp_downsample_3x3_fix", "mlp_downsample_2x2_fix", "mlp_downsample", "linear", "mlp2x_gelu"} <= set(regs)
    assert regs["linear"].plugin == plugins.BUILTIN_PLUGIN_NAME
    pe = plugins.create("position_encoders", "abs_mlp", 16)
    assert pe(torch.zeros(2, 3)).shape == (2, 16)
    ext = plugins.create("region_extractors", "regiongpt", 16, 8)
    assert ext.projector.weight.shape == (8, 16)


def test_entry_point_plugin_is_loaded_and_usable_by_name(installed_plugin: str) -> None:
    reg = plugins.registry("projectors")["scaled_linear"]
    assert reg.plugin == installed_plugin
    assert "acme-sr3d" in reg.source
    proj = plugins.create("projectors", "scaled_linear", 4, 6, scale=3.0)
    x = torch.randn(1, 5, 4)
    assert torch.allclose(proj(x), proj.layers(x) * 3.0)
    assert "constant_depth" in plugins.registry("depth_estimators")


def test_allow_list_blocks_unlisted_plugins(installed_plugin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SR3D_LOAD_PLUGINS", "")
    plugins.reset()
    assert "scaled_linear" not in plugins.registry("projectors")
    assert "linear" in plugins.registry("projectors")  # built-ins always load
    monkeypatch.setenv("SR3D_LOAD_PLUGINS", "acme-sr3d")  # by distribution name
    plugins.reset()
    assert "scaled_linear" in plugins.registry("projectors")


def test_cli_lists_components_and_their_source(installed_plugin: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {(c["kind"], c["name"]): c for c in data["components"]}
    assert rows[("projectors", "scaled_linear")]["plugin"] == "acme"
    assert "acme-sr3d" in rows[("projectors", "scaled_linear")]["source"]
    assert rows[("projectors", "mlp_downsample_3x3_fix")]["plugin"] == plugins.BUILTIN_PLUGIN_NAME
    assert cli.main(["plugins", "--kind", "projectors"]) == 0
    text = capsys.readouterr().out
    assert "scaled_linear" in text and "acme" in text


def test_directly_registered_plugin_and_name_clashes() -> None:
    plugins.reset()

    class Extra:
        @hookimpl
        def register_position_encoders(self, register):
            register("abs_mlp_copy", torch.nn.Identity)

    name = plugins.register_plugin(Extra(), name="extra")
    try:
        assert "abs_mlp_copy" in plugins.registry("position_encoders")
    finally:
        plugins.unregister_plugin(name)
    assert "abs_mlp_copy" not in plugins.registry("position_encoders")

    class Clash:
        @hookimpl
        def register_projectors(self, register):
            register("linear", torch.nn.Identity)

    plugins.register_plugin(Clash(), name="clash")
    try:
        with pytest.raises(SR3DPluginError, match="registered twice"):
            plugins.registry("projectors")
    finally:
        plugins.unregister_plugin("clash")


def test_unknown_names_list_what_exists() -> None:
    with pytest.raises(SR3DPluginError, match="mlp_downsample_3x3_fix"):
        plugins.create("projectors", "nope", 4, 4)
    with pytest.raises(SR3DPluginError, match="unknown component kind"):
        plugins.registry("widgets")


def test_broken_plugin_warns_and_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "broken_sr3d-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-sr3d\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[sr3d]\nbroken = broken_sr3d_missing_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    try:
        with pytest.warns(RuntimeWarning, match="broken"):
            plugins.get_plugin_manager()
        assert "broken" in plugins.load_errors()
        assert "linear" in plugins.registry("projectors")
    finally:
        plugins.reset()
