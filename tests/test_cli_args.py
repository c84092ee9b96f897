"""The commands' shared arguments (fss.cli_args), and how library errors become their one-line errors."""

import argparse
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fss.cli_args import input_size, load_from_args, port, positive_float, positive_int
from fss.command import run_command
from fss.errors import EmptyMaskError, FssError, SettingError, ShotError
from fss.io.masks import check_shot


def test_setting_errors_name_arguments_in_the_library_and_flags_in_commands(capsys):
    err = SettingError("{fold} and {val_classes} both choose: give one; {kept}", "data", kept="a{b}.pt")
    assert str(err) == "fold and val_classes both choose: give one; a{b}.pt (data)"
    assert str(err.flagged()) == "--fold and --val-classes both choose: give one; a{b}.pt (data)"

    def body():
        raise err

    assert run_command("fss-x", body) == 2
    assert (
        capsys.readouterr().err
        == "fss-x: error: --fold and --val-classes both choose: give one; a{b}.pt (data)\n"
    )


def test_validators_refuse_in_one_argparse_line(capsys):
    p = argparse.ArgumentParser(prog="fss-x")
    p.add_argument("--n", type=positive_int)
    p.add_argument("--port", type=port)
    p.add_argument("--size", type=input_size)
    p.add_argument("--lr", type=positive_float)
    assert vars(p.parse_args(["--n", "2", "--port", "80", "--size", "64", "--lr", "0.5"])) == {
        "n": 2, "port": 80, "size": 64, "lr": 0.5,
    }  # fmt: skip
    refusals = {
        ("--n", "0"): "argument --n: must be at least 1, got 0",
        ("--n", "x"): "argument --n: invalid positive_int value: 'x'",
        ("--port", "65536"): "argument --port: not a TCP port: 65536",
        ("--size", "7"): "argument --size: must be from 8 to",
        ("--lr", "nan"): "argument --lr: must be a finite number, got nan",
        ("--lr", "0"): "argument --lr: must be more than 0, got 0",
    }
    for argv, message in refusals.items():
        with pytest.raises(SystemExit) as exit_info:
            p.parse_args(list(argv))
        assert exit_info.value.code == 2 and f"fss-x: error: {message}" in capsys.readouterr().err


def test_one_shot_check_for_every_caller():
    mask = np.zeros((3, 5), np.uint8)
    mask[1, 2] = 1
    check_shot((5, 3), mask)
    with pytest.raises(
        ShotError, match="mask size 5x3 differs from image size 3x5; masks refer to the image as"
    ):
        check_shot((3, 5), mask, "m.png")
    with pytest.raises(EmptyMaskError, match=r"mask has no foreground pixel \(m.png\)"):
        check_shot((5, 3), np.zeros((3, 5), np.uint8), "m.png")
    assert issubclass(ShotError, FssError) and issubclass(ShotError, ValueError)  # Segmenter's callers


def test_a_missing_cuda_device_is_worded_with_the_flag(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = SimpleNamespace(ckpt=None, bundle=None, backend="auto", device="cuda")
    with pytest.raises(FssError, match="^--device cuda asked for, but torch sees no CUDA device$"):
        load_from_args(args)
