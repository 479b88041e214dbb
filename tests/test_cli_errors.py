"""Library errors name Python parameters (``name=``); the ``sr3d`` command words them as its flags, in one place."""

from __future__ import annotations

import pytest

from sr3d_plugin import cli
from sr3d_plugin.cli import PARAMETER_FLAGS, build_parser, flag_wording
from sr3d_plugin.errors import SR3DConfigError, SR3DInputError


def test_flag_wording_uses_the_sub_command_options() -> None:
    msg = (
        "pass depth= (one depth map per frame) with intrinsics='K.txt', num_frames=8 and depth_scale=1000; "
        "model.path='x' and image_aspect_ratio='pad' stay as written"
    )
    out = flag_wording(msg, "ask")
    assert out == (
        "pass --depth (one depth map per frame) with --intrinsics K.txt, --num-frames 8 and --depth-scale 1000; "
        "model.path='x' and image_aspect_ratio='pad' stay as written"
    )
    # an on/off flag given as True stands alone; a flag with an optional value too
    assert flag_wording("pass overwrite=True to replace it", "convert") == "pass --overwrite to replace it"
    assert flag_wording("pass resume=True to continue", "train") == "pass --resume to continue"
    assert flag_wording("resume='ckpt-3': not a checkpoint", "train") == "--resume ckpt-3: not a checkpoint"
    # quoted user input and paths are left alone
    assert flag_wording("model argument 'num_frames=8' in /x/num_frames=8", "ask") == (
        "model argument 'num_frames=8' in /x/num_frames=8"
    )
    # names that are not options of this sub-command are left alone (prepare has no --depth)
    assert flag_wording("pass depth= here", "prepare") == "pass depth= here"
    assert flag_wording("pass split= or skip_missing=True.", "prepare") == "pass --split or --skip-missing."


def test_extra_parameter_flags_are_real_flags_of_their_command() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for command, table in PARAMETER_FLAGS.items():
        flags = (
            {o for p in sub.choices.values() for a in p._actions for o in a.option_strings}
            if command == "*"
            else {o for a in sub.choices[command]._actions for o in a.option_strings}
        )
        assert set(table.values()) <= flags, (command, table)


@pytest.mark.parametrize(
    ("command", "argv", "error", "shown"),
    [
        # the wording the point-map sources use (parameters of the visual-input functions)
        (
            "pointmap",
            ["pointmap", "--image", "x.png"],
            SR3DInputError("depth_anything needs depth= or intrinsics=; pass depth= (per frame) with intrinsics="),
            "depth_anything needs --depth or --intrinsics; pass --depth (per frame) with --intrinsics",
        ),
        (
            "train",
            ["train", "tiny", "--dry-run"],
            SR3DConfigError("out already holds checkpoints; pass resume=True to continue"),
            "out already holds checkpoints; pass --resume to continue",
        ),
    ],
)
def test_the_command_translates_errors_where_it_catches_them(command, argv, error, shown, monkeypatch, capsys) -> None:
    module = __import__(f"sr3d_plugin.cli.{command}_cmd", fromlist=["run"])

    def fail(args):
        raise error

    monkeypatch.setattr(module, "run", fail)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"sr3d {command}: error: {shown}"
