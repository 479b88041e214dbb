"""The CPU AdamW takes torch's multi-tensor path, which must give exactly the per-tensor loop's weights."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sr3d_plugin.training.trainer import _optimizer


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (16, 16, 3), (128,), (8, 64)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def test_cpu_adamw_is_multi_tensor_and_bit_identical_to_the_loop() -> None:
    tr = SimpleNamespace(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optimizer="adamw")
    ours, ref = _params(0), _params(0)

    def groups(ps: list[torch.nn.Parameter]) -> list[dict]:
        return [
            {"params": ps[:3], "lr": 1e-3, "weight_decay": 0.01},
            {"params": ps[3:], "lr": 3e-4, "weight_decay": 0.0},
        ]

    opt = _optimizer(groups(ours), tr)
    loop = torch.optim.AdamW(groups(ref), lr=1e-3, foreach=False)
    assert opt.defaults["foreach"] is True
    g = torch.Generator().manual_seed(1)
    for step in range(60):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, q, gr in zip(ours, ref, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        if step % 7 == 3:
            ours[1].grad = ref[1].grad = None  # a parameter without a gradient this step
        for o in (opt, loop):
            for group in o.param_groups:
                group["lr"] *= 0.99  # a schedule
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, ref))
    assert not all(torch.equal(p, q) for p, q in zip(ours, _params(0)))  # it did train
