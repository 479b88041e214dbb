"""How far 2D cues alone get on the cross-frame questions: a classifier fitted on 2D facts only.

For every region of a cross-frame question the generator records what a model without 3D could
read off the pixels: the frame index, the centroid (column, row), the box width and height and the
pixel area, all in image units. :func:`fit_2d_shortcut` trains a small MLP on those facts (regions in
question order, so region order is a feature too, plus the box / mask flag) of training-split
questions and scores it on the same held-out test questions the models are scored on. If the
generator leaked depth into image position, size, frame order or region order, this classifier would
find it; near-chance accuracy is the evidence that the questions need 3D.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.synthetic.qa import ANSWER_CHOICES, MULTI_VIEW_FAMILIES, QASample, training_samples

__all__ = ["fit_2d_shortcut", "shortcut_features", "shortcut_report"]

_KEYS = ("col", "row", "width", "height", "area")


def shortcut_features(sample: QASample, num_frames: int = 6) -> np.ndarray:
    """``[R·(F + 5) + 1]`` float32 2D facts of one cross-frame question (frame one-hot, centroid,
    box size, area per region, then 1 for boxes / 0 for masks)."""
    if sample.family not in MULTI_VIEW_FAMILIES:
        raise SR3DInputError(f"sample.family must be a cross-frame family {MULTI_VIEW_FAMILIES}, got {sample.family!r}")
    meta = sample.meta
    rows = []
    for r, frame in enumerate(meta["frames"]):
        onehot = np.zeros(num_frames, dtype=np.float32)
        onehot[int(frame) % num_frames] = 1.0
        rows.append(np.concatenate([onehot, np.array([meta[k][r] for k in _KEYS], dtype=np.float32)]))
    rows.append(np.array([1.0 if meta.get("region_kind") == "box" else 0.0], dtype=np.float32))
    return np.concatenate(rows)


def fit_2d_shortcut(
    train: Sequence[QASample], test: Sequence[QASample], seed: int = 0, epochs: int = 100, hidden: int = 64
) -> dict[str, float]:
    """Fit an MLP on the 2D facts of ``train`` and score it on ``test`` (all of one family).

    Returns:
        ``{"mlp": test accuracy, "train_accuracy": …, "val_accuracy": the held-out fifth of ``train``
        at the chosen epoch, "majority": accuracy of the most frequent training answer on test}``
        (fractions).
    """
    families = {s.family for s in [*train, *test]}
    if len(families) != 1:
        raise SR3DInputError(f"train and test must hold one cross-frame family, got {sorted(families)}")
    family = families.pop()
    choices = ANSWER_CHOICES[family]
    x_tr = torch.from_numpy(np.stack([shortcut_features(s) for s in train]))
    y_tr = torch.tensor([choices.index(s.answer) for s in train])
    x_te = torch.from_numpy(np.stack([shortcut_features(s) for s in test]))
    y_te = torch.tensor([choices.index(s.answer) for s in test])
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(x_tr.shape[1], hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, len(choices)),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p.shape[-1]) ** 0.5))
    # a fifth of the training questions picks the epoch (the MLP memorises its training set otherwise)
    cut = max(1, len(x_tr) // 5)
    x_val, y_val, x_fit, y_fit = x_tr[:cut], y_tr[:cut], x_tr[cut:], y_tr[cut:]
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
    best, best_state = -1.0, None
    for _ in range(epochs):
        perm = torch.randperm(len(x_fit), generator=gen)
        for i in range(0, len(perm), 128):
            idx = perm[i : i + 128]
            loss = torch.nn.functional.cross_entropy(net(x_fit[idx]), y_fit[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            val = float((net(x_val).argmax(-1) == y_val).float().mean())
        if val > best:
            best, best_state = val, {k: v.clone() for k, v in net.state_dict().items()}
    assert best_state is not None
    net.load_state_dict(best_state)
    with torch.no_grad():
        acc = float((net(x_te).argmax(-1) == y_te).float().mean())
        train_acc = float((net(x_fit).argmax(-1) == y_fit).float().mean())
    majority = int(torch.bincount(y_tr, minlength=len(choices)).argmax())
    return {
        "mlp": acc,
        "train_accuracy": train_acc,
        "val_accuracy": best,
        "majority": float((y_te == majority).float().mean()),
    }


def shortcut_report(
    test: Sequence[QASample], train_per_family: int = 2000, seed: int = 0, image_size: int = 64
) -> dict[str, dict[str, float]]:
    """:func:`fit_2d_shortcut` per cross-frame family of ``test``, trained on ``train_per_family``
    training-split questions of that family (training scenes, disjoint from the test scenes)."""
    out = {}
    for family in MULTI_VIEW_FAMILIES:
        fam_test = [s for s in test if s.family == family]
        if not fam_test:
            continue
        train = training_samples(train_per_family, [family], split="train", seed=seed + 101, image_size=image_size)
        out[family] = {**fit_2d_shortcut(train, fam_test, seed=seed), "train_questions": train_per_family}
    return out
