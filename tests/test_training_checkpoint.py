"""Checkpoints: atomic (a crash while saving leaves no checkpoint-N and no temporary folder), no pickles
(safetensors + JSON states restored exactly), a manifest verified before anything is read (tampered,
truncated, pickle-carrying and old-format checkpoints refused, a pickle bomb never runs), disk faults
(full / read-only) as one-line errors with the last checkpoint intact, resume lookup and CLI text."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sr3d_plugin.errors import SR3DCheckpointError, SR3DConfigError, SR3DDiskError
from sr3d_plugin.testing import build_tiny_model
from sr3d_plugin.training import checkpoint as ckpt_mod
from sr3d_plugin.training.checkpoint import (
    MANIFEST_NAME,
    decode_state,
    encode_state,
    load_training_state,
    verify_checkpoint,
    write_manifest,
)
from sr3d_plugin.training.model_setup import prepare_for_training
from sr3d_plugin.training.recipe import load_recipe
from sr3d_plugin.training.trainer import TrainState, _save_checkpoint, check_writable, find_checkpoint


class _Boom(RuntimeError):
    pass


class _FailingProcessor:
    def save_pretrained(self, folder: str) -> None:
        raise _Boom("disk full")


def _setup(seed: int = 0):
    """A prepared tiny LoRA model with AdamW and a cosine schedule, on a fresh CPU Accelerator."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    recipe, _ = load_recipe({"model": {"preset": "tiny", "dtype": "float32"}, "data": {"generator": "x:y"}})
    model, proc = build_tiny_model(seed=seed)
    model, _ = prepare_for_training(model, recipe)
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.99))
    model, opt = acc.prepare(model, opt)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=10)
    return acc, model, opt, sched, proc, recipe


def _step(model, opt, sched, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(out, checkpoint-3, draws)``: a checkpoint after 3 optimizer steps; ``draws`` are the RNG draws after it."""
    out = tmp_path_factory.mktemp("ckpt")
    acc, model, opt, sched, proc, recipe = _setup()
    for s in range(3):
        _step(model, opt, sched, s)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    path = _save_checkpoint(
        acc, model, opt, sched, proc, TrainState(global_step=3, batch_in_epoch=3), out, recipe, False
    )
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    reference = {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "opt": opt.state_dict(),
        "sched": sched.state_dict(),
    }
    return out, path, draws, reference


def test_interrupted_save_leaves_no_checkpoint(tmp_path) -> None:
    acc, model, opt, sched, proc, recipe = _setup()
    state = TrainState(global_step=3)
    with pytest.raises(_Boom):
        _save_checkpoint(acc, model, opt, sched, _FailingProcessor(), state, tmp_path, recipe, deepspeed=False)
    assert not (tmp_path / "checkpoint-3").exists()
    assert not (tmp_path / ".checkpoint-3.tmp").exists()  # nothing half-written left behind
    assert find_checkpoint(tmp_path) is None
    path = _save_checkpoint(acc, model, opt, sched, proc, state, tmp_path, recipe, deepspeed=False)
    assert path == tmp_path / "checkpoint-3" and find_checkpoint(tmp_path) == path
    assert not (tmp_path / ".checkpoint-3.tmp").exists()
    files = {p.name for p in path.iterdir()}
    expected = {"trainer_state.json", "adapter", "model.safetensors", "optimizer.json", "optimizer.safetensors"}
    assert expected | {"scheduler.json", "rng_0.json", "rng_0.safetensors", "recipe.yaml", MANIFEST_NAME} <= files
    suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
    assert suffixes <= ckpt_mod.READABLE_SUFFIXES, suffixes  # no .pkl / .bin / .pt anywhere
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    assert keys and all("lora_" in k or "modules_to_save" in k for k in keys)  # trained weights only
    manifest = verify_checkpoint(path)
    assert manifest["version"] == 1 and manifest["processes"] == 1 and "model.safetensors" in manifest["files"]
    assert "adapter/adapter_model.safetensors" in manifest["files"]
    with pytest.raises(SR3DConfigError, match="not a complete checkpoint"):
        find_checkpoint(tmp_path, str(tmp_path / "nothing"))


def test_codec_round_trip() -> None:
    value = {
        "t": torch.arange(6, dtype=torch.int16).reshape(2, 3),
        "tup": (1, 2.5, None, "x", True),
        "nonfinite": [float("nan"), float("inf"), -float("inf")],
        3: {"nested": np.arange(4, dtype=np.uint32)},
        "np": np.float64(0.1),
    }
    tensors: dict[str, torch.Tensor] = {}
    doc = json.loads(json.dumps(encode_state(value, tensors)))
    back = decode_state(doc, tensors)
    assert torch.equal(back["t"], value["t"]) and back["tup"] == value["tup"] and back["np"] == 0.1
    assert np.isnan(back["nonfinite"][0]) and back["nonfinite"][1:] == [float("inf"), -float("inf")]
    assert back[3]["nested"].dtype == np.uint32 and back[3]["nested"].tolist() == [0, 1, 2, 3]
    with pytest.raises(TypeError, match="without pickle"):
        encode_state({"f": lambda: 0}, {})
    with pytest.raises(TypeError, match="without pickle"):
        encode_state(np.array([{}], dtype=object), {})
    with pytest.raises(SR3DCheckpointError, match="unknown entry tag"):
        decode_state({"__sr3d__": "pickle", "data": "gASV"}, {})
    with pytest.raises(SR3DCheckpointError, match="malformed 'ndarray'"):
        decode_state({"__sr3d__": "ndarray", "dtype": "O", "shape": [1], "data": [1]}, {})


def test_resume_restores_weights_optimizer_scheduler_and_rng_exactly(saved) -> None:
    _, path, draws, ref = saved
    manifest = verify_checkpoint(path)
    acc, model, opt, sched, _, _ = _setup(seed=1)  # other initial weights: the checkpoint must overwrite them
    random.seed(0)
    counters = load_training_state(acc, path, manifest, model, opt, sched, deepspeed=False)
    assert counters["global_step"] == 3 and counters["batch_in_epoch"] == 3
    assert (random.random(), float(np.random.rand())) == draws[:2] and torch.equal(torch.rand(3), draws[2])
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, ref["weights"][n]), n
    got, want = opt.state_dict(), ref["opt"]
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys() and len(got["state"]) > 20
    for k in want["state"]:
        for name, v in want["state"][k].items():
            assert torch.equal(got["state"][k][name], v), (k, name)
    assert sched.state_dict() == ref["sched"]
    # the next step from the restored state equals the next step of the original run
    _, model2, opt2, sched2, _, _ = _setup(seed=0)
    for s in range(3):
        _step(model2, opt2, sched2, s)
    _step(model2, opt2, sched2, 3)
    _step(model, opt, sched, 3)
    p1 = dict(model.named_parameters())
    for n, p in model2.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, p1[n]), n
    assert sched.get_last_lr() == sched2.get_last_lr()


def _copy(path: Path, dest: Path) -> Path:
    shutil.copytree(path, dest)
    return dest


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))


def _marker_pickle(marker: Path) -> bytes:
    class Bomb:
        def __reduce__(self):
            return (Path.touch, (marker,))

    return pickle.dumps(Bomb())


def _rewrite_manifest(c: Path) -> None:
    """What an attacker who can write the folder does: a manifest that matches the hostile files."""
    (c / MANIFEST_NAME).unlink()
    write_manifest(c, {"step": 3, "processes": 1, "engine": "torch"})


HOSTILE = {
    "modified weights": (
        lambda c, m: _flip_byte(c / "model.safetensors"),
        "model.safetensors does not match its sha256",
    ),
    "truncated optimizer": (
        lambda c, m: (c / "optimizer.safetensors").write_bytes((c / "optimizer.safetensors").read_bytes()[:-9]),
        "optimizer.safetensors is .* bytes, the manifest says",
    ),
    "modified trainer state": (
        lambda c, m: (c / "trainer_state.json").write_text('{"global_step": 999999999}'),
        "trainer_state.json is",
    ),
    "pickle dropped in": (
        lambda c, m: (c / "custom_checkpoint_0.pkl").write_bytes(_marker_pickle(m)),
        "custom_checkpoint_0.pkl: files of type '.pkl' may carry pickles",
    ),
    "pickle listed in a rewritten manifest": (
        lambda c, m: ((c / "random_states_0.pkl").write_bytes(_marker_pickle(m)), _rewrite_manifest(c)),
        "random_states_0.pkl: files of type '.pkl'",
    ),
    "optimizer.bin in the adapter folder": (
        lambda c, m: (c / "adapter" / "optimizer.bin").write_bytes(_marker_pickle(m)),
        r"adapter/optimizer.bin: files of type '.bin'",
    ),
    "unlisted text file": (lambda c, m: (c / "notes.txt").write_text("hi"), "notes.txt is not listed"),
    "listed file missing": (lambda c, m: (c / "scheduler.json").unlink(), "scheduler.json is listed .* but missing"),
    "no manifest": (lambda c, m: (c / MANIFEST_NAME).unlink(), "no manifest.json"),
    "manifest not JSON": (lambda c, m: (c / MANIFEST_NAME).write_bytes(_marker_pickle(m)), "not valid JSON"),
    "manifest of another version": (
        lambda c, m: (c / MANIFEST_NAME).write_text(
            json.dumps({"format": "sr3d-checkpoint", "version": 9, "files": {}})
        ),
        "format version 9; expected 1",
    ),
    "manifest path outside": (
        lambda c, m: (c / MANIFEST_NAME).write_text(
            json.dumps({"format": "sr3d-checkpoint", "version": 1, "files": {"../x.json": {"sha256": "0", "size": 1}}})
        ),
        r"lists '../x.json', which is not a plain path",
    ),
    "link to a file outside": (
        lambda c, m: (c / "extra.json").symlink_to(c.parent / "outside.json"),
        "extra.json is a link",
    ),
    "pickle disguised as safetensors": (
        lambda c, m: ((c / "model.safetensors").write_bytes(_marker_pickle(m)), _rewrite_manifest(c)),
        "model.safetensors is not a valid safetensors file",
    ),
    "pickle disguised as JSON state": (
        lambda c, m: ((c / "scheduler.json").write_bytes(_marker_pickle(m)), _rewrite_manifest(c)),
        "scheduler.json is not valid JSON",
    ),
    "pickle tag inside a JSON state": (
        lambda c, m: (
            (c / "rng_0.json").write_text(json.dumps({"state": {"python": {"__sr3d__": "pickle", "data": "x"}}})),
            _rewrite_manifest(c),
        ),
        "unknown entry tag 'pickle'",
    ),
    "optimizer state of a foreign parameter": (
        lambda c, m: (
            (c / "optimizer.json").write_text(json.dumps({"state": {"state": {"evil": {}}, "param_groups": []}})),
            _rewrite_manifest(c),
        ),
        "state for 'evil', which is not a trainable parameter",
    ),
    "scheduler state injecting attributes": (
        lambda c, m: (_edit_state(c, "scheduler", lambda st: {**st, "optimizer": "gotcha"}), _rewrite_manifest(c)),
        r"scheduler.json: keys differ from this run's \(e.g. 'optimizer'\)",
    ),
    "learning rate as a string": (
        lambda c, m: (_edit_state(c, "optimizer", _lr_string), _rewrite_manifest(c)),
        r"param_groups\[0\].lr: a str where this run has a number",
    ),
    "wrong-size torch RNG state": (
        lambda c, m: (_retensor(c, "rng_0", lambda t: t[:100]), _rewrite_manifest(c)),
        "rng_0.json does not fit this run",
    ),
}


def _edit_state(c: Path, name: str, fn) -> None:
    doc = json.loads((c / f"{name}.json").read_text())
    doc["state"] = fn(doc["state"])
    (c / f"{name}.json").write_text(json.dumps(doc))


def _lr_string(state):
    state["param_groups"][0]["lr"] = "0.1"
    return state


def _retensor(c: Path, name: str, fn) -> None:
    from safetensors.torch import load_file, save_file

    tensors = {k: fn(v) for k, v in load_file(str(c / f"{name}.safetensors")).items()}
    save_file(tensors, str(c / f"{name}.safetensors"))


@pytest.mark.parametrize("variant", sorted(HOSTILE))
def test_hostile_checkpoint_is_refused_and_runs_no_code(saved, tmp_path, variant) -> None:
    _, path, _, _ = saved
    marker = tmp_path / "PWNED"
    c = _copy(path, tmp_path / "checkpoint-3")
    (tmp_path / "outside.json").write_text("{}")
    make, message = HOSTILE[variant]
    make(c, marker)
    with pytest.raises(SR3DCheckpointError, match=message) as info:
        manifest = verify_checkpoint(c)
        acc, model, opt, sched, _, _ = _setup()
        load_training_state(acc, c, manifest, model, opt, sched, deepspeed=False)
    assert str(c) in str(info.value)
    assert not marker.exists(), "code from the checkpoint ran"


def test_old_accelerate_checkpoint_refused_with_reason(tmp_path) -> None:
    c = tmp_path / "checkpoint-4"
    c.mkdir()
    marker = tmp_path / "PWNED"
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
        (c / name).write_bytes(_marker_pickle(marker))
    (c / "trainer_state.json").write_text('{"global_step": 4}')
    assert find_checkpoint(tmp_path) == c  # found, then refused with the reason
    with pytest.raises(SR3DCheckpointError, match=r"no manifest.json \(it holds custom_checkpoint_0.pkl.*older sr3d"):
        verify_checkpoint(c)
    assert not marker.exists()


def test_cli_resume_of_a_pickle_bomb_checkpoint_is_one_line_and_runs_nothing(saved, tmp_path, capsys) -> None:
    from sr3d_plugin.cli import main

    _, path, _, _ = saved
    marker = tmp_path / "PWNED"
    c = _copy(path, tmp_path / "run" / "checkpoint-3")
    for name in ("random_states_0.pkl", "custom_checkpoint_0.pkl", "scheduler.bin", "sampler.bin"):
        (c / name).write_bytes(_marker_pickle(marker))
    _rewrite_manifest(c)
    rc = main(["train", "tiny-cpu", f"training.output_dir={tmp_path / 'run'}", "logging.report_to=[]", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("sr3d train: error:")]
    assert len(lines) == 1 and str(c) in lines[0] and "may carry pickles" in lines[0]
    assert not marker.exists()


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]) if args else None)


@pytest.mark.parametrize("where", ["optimizer", "manifest", "rename"])
def test_failed_checkpoint_write_keeps_the_last_one_and_leaves_nothing(tmp_path, monkeypatch, where) -> None:
    acc, model, opt, sched, proc, recipe = _setup()
    _step(model, opt, sched, 0)
    first = _save_checkpoint(acc, model, opt, sched, proc, TrainState(global_step=2), tmp_path, recipe, False)
    before = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    _step(model, opt, sched, 1)
    if where == "optimizer":
        real = ckpt_mod.atomic_write_bytes

        def failing(path, data):
            if Path(path).name == "optimizer.safetensors":
                _enospc(path)
            return real(path, data)

        monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", failing)
    elif where == "manifest":
        monkeypatch.setattr("sr3d_plugin.training.trainer.write_manifest", lambda folder, extra=None: _enospc(folder))
    else:
        monkeypatch.setattr("sr3d_plugin.training.trainer.replace_folder", lambda tmp, final: _enospc(final))
    with pytest.raises(SR3DDiskError, match=r"(?i)writing checkpoint .*checkpoint-4'? failed: .*no space left") as info:
        _save_checkpoint(acc, model, opt, sched, proc, TrainState(global_step=4), tmp_path, recipe, False)
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # no temporary folder, no checkpoint-4
    assert {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    verify_checkpoint(first)


def test_check_writable_names_the_folder(tmp_path, monkeypatch) -> None:
    check_writable(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:  # a real read-only folder (root writes anyway: inject the fault instead)
        ro.chmod(0o555)
    else:
        monkeypatch.setattr(
            "sr3d_plugin.training.trainer.tempfile.mkstemp",
            lambda **kw: (_ for _ in ()).throw(OSError(errno.EROFS, os.strerror(errno.EROFS), kw["dir"])),
        )
    try:
        with pytest.raises(
            SR3DDiskError, match=r"(?i)training.output_dir: writing into .*ro'? failed: .*(permission|read-only)"
        ):
            check_writable(ro)
    finally:
        ro.chmod(0o755)


def test_cli_train_into_an_unwritable_folder_is_one_line_and_leaves_no_recipe(tmp_path, monkeypatch, capsys) -> None:
    from sr3d_plugin.cli import main

    out = tmp_path / "run"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
    else:
        import sr3d_plugin.training.trainer as trainer_mod

        real = trainer_mod.check_writable

        def full_disk(folder):
            with monkeypatch.context() as m:
                m.setattr(os, "write", lambda fd, data: _enospc(folder))
                real(folder)

        monkeypatch.setattr(trainer_mod, "check_writable", full_disk)
    try:
        rc = main(["train", "tiny-cpu", f"training.output_dir={out}", "logging.report_to=[]"])
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("sr3d train: error:")]
    assert len(lines) == 1 and str(out) in lines[0], err
    assert not list(out.iterdir())  # no recipe.yaml, no log, no temporary file


@pytest.mark.slow
def test_cli_train_stops_on_a_full_disk_at_a_checkpoint(tmp_path, monkeypatch, capsys) -> None:
    """A real (tiny, 4-step) run whose second checkpoint hits ENOSPC: one line, checkpoint-2 intact, nothing else."""
    from sr3d_plugin.cli import main

    out = tmp_path / "run"
    real = ckpt_mod.atomic_write_bytes

    def full_at_step_4(path, data):
        if ".checkpoint-4.tmp" in str(path):
            _enospc(path)
        return real(path, data)

    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", full_at_step_4)
    args = ["training.max_steps=4", "training.save_steps=2", "data.num_workers=0", "data.generator_args.num_scenes=1"]
    rc = main(["train", "tiny-cpu", f"training.output_dir={out}", "logging.report_to=[]", *args, "--json"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("sr3d train: error:")]
    assert len(lines) == 1, err
    assert (
        f"writing checkpoint '{out / 'checkpoint-4'}' failed" in lines[0] and "no space left on the device" in lines[0]
    )
    assert sorted(p.name for p in out.glob("*checkpoint*")) == ["checkpoint-2"]
    assert not (out / "adapter").exists()  # training stopped at the failed save
    verify_checkpoint(out / "checkpoint-2")


def test_text_events(capsys) -> None:
    from sr3d_plugin.cli.train_cmd import _print_event

    start = {
        "event": "start",
        "device": "cpu",
        "processes": 1,
        "samples": 5,
        "total_steps": 2,
        "output_dir": "x",
        "trainable_params": 10,
        "frozen_params": 20,
        "groups": {"lora": 10},
        "trainable": [{"name": "llm.model.layers.0.self_attn.q_proj.lora_A.default.weight", "numel": 10}],
    }
    _print_event(start)
    _print_event({"event": "log", "step": 1, "epoch": 0.5, "loss": 2.0, "lr": 1e-3})
    out = capsys.readouterr().out
    assert "trainable parameters: 10 (frozen: 20)" in out and "loss 2.0000" in out
    assert "q_proj.lora_A" not in out  # grouped by default
    _print_event(start, verbose=True)
    assert "q_proj.lora_A" in capsys.readouterr().out
