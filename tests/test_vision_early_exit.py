"""The vision tower stops after the layer ``vision_feature_layer`` selects: same features, later layers never run."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from sr3d_plugin.modeling.modeling_sr3d import tower_hidden_state


def _siglip() -> nn.Module:
    cfg = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
    )
    return SiglipVisionModel(cfg).eval()


def _clip() -> nn.Module:
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
    )
    return CLIPVisionModel(cfg).eval()


def _calls(module: nn.Module) -> list[int]:
    counter: list[int] = []
    module.register_forward_hook(lambda *_: counter.append(1))
    return counter


@pytest.mark.parametrize("build", [_siglip, _clip], ids=["siglip", "clip"])
@pytest.mark.parametrize("layer", [-2, -1, 1, 2])
def test_early_exit_gives_the_same_hidden_state_bit_for_bit(build, layer: int) -> None:
    torch.manual_seed(0)
    tower = build()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        full = tower(x, output_hidden_states=True, return_dict=True).hidden_states[layer]
        fast = tower_hidden_state(tower, x, layer)
        slow = tower_hidden_state(tower, x, layer, early_exit=False)
    assert torch.equal(fast, full) and torch.equal(slow, full)


@pytest.mark.parametrize("build", [_siglip, _clip], ids=["siglip", "clip"])
def test_layers_after_the_selected_one_never_run(build) -> None:
    tower = build()
    layers = tower.encoder.layers if hasattr(tower, "encoder") else tower.vision_model.encoder.layers
    last, selected = _calls(layers[-1]), _calls(layers[-2])
    head = getattr(tower, "head", None) or getattr(getattr(tower, "vision_model", None), "head", None)
    head_calls = _calls(head) if head is not None else []
    x = torch.randn(2, 3, 32, 32)
    tower(x)  # transformers may add hooks of its own on a first call
    hooks = len(layers[-2]._forward_hooks)
    tower_hidden_state(tower, x, -2)
    assert (len(selected), len(last), len(head_calls)) == (2, 1, 1 if head is not None else 0)
    assert len(layers[-2]._forward_hooks) == hooks  # the exit hook is removed again
    tower_hidden_state(tower, x, -2, early_exit=False)
    assert (len(selected), len(last)) == (3, 2)


def test_gradients_through_a_trainable_tower_are_unchanged() -> None:
    torch.manual_seed(1)
    tower = _siglip().train()
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    grads = []
    for early in (True, False):
        tower.zero_grad()
        x.grad = None
        tower_hidden_state(tower, x, -2, early_exit=early).square().sum().backward()
        grads.append((x.grad.clone(), tower.encoder.layers[0].mlp.fc1.weight.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert tower.encoder.layers[-1].mlp.fc1.weight.grad is None  # never ran, so no gradient


def test_unknown_towers_and_the_embedding_layer_take_the_full_call() -> None:
    class Wrapped(nn.Module):  # a tower we know nothing about: the full call, as before
        def __init__(self) -> None:
            super().__init__()
            self.inner = _siglip()
            self.config = type("C", (), {"model_type": "my_vision"})()

        def forward(self, pixel_values, **kwargs):
            return self.inner(pixel_values, **kwargs)

    tower = Wrapped()
    x = torch.randn(2, 3, 32, 32)
    last = _calls(tower.inner.encoder.layers[-1])
    with torch.no_grad():
        out = tower_hidden_state(tower, x, -2)
        assert torch.equal(out, tower.inner(x, output_hidden_states=True).hidden_states[-2])
    assert len(last) == 2
    siglip = _siglip()
    first = _calls(siglip.encoder.layers[0])
    with torch.no_grad():
        emb = tower_hidden_state(siglip, x, 0)  # the embeddings: no layer to stop after
    assert len(first) == 1 and torch.equal(emb, siglip(x, output_hidden_states=True).hidden_states[0])


def test_the_sr3d_model_switch() -> None:
    from sr3d_plugin.testing import build_tiny_model

    model, _ = build_tiny_model(seed=0)
    model.eval()
    assert model.config.vision_early_exit is True
    s = model.config.tile_size
    g = model.config.grid_size
    pixels, xyz = torch.randn(3, 3, s, s), torch.randn(3, g, g, 3)
    last = _calls(model.vision_tower.encoder.layers[-1])
    with torch.no_grad():
        fast = model.get_vision_features(pixels, xyz)
        model.config.vision_early_exit = False
        slow = model.get_vision_features(pixels, xyz)
    assert torch.equal(fast, slow) and len(last) == 1


def test_a_forward_hook_on_the_tower_gets_the_whole_call() -> None:
    tower = _siglip()
    outputs: list = []
    tower.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    last = _calls(tower.encoder.layers[-1])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = tower_hidden_state(tower, x, -2)
    assert len(outputs) == 1 and len(last) == 1  # the hook saw a finished call
    assert torch.equal(got, outputs[0].hidden_states[-2])
