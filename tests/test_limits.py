"""cnnvis.limits: sizes, where the budget comes from, the one-line refusal; the CLI's checked
numeric types (cli/common.py) that share its role of refusing bad values before work starts."""
import argparse
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from cnnvis import limits
from cnnvis.cli import common
from cnnvis.errors import CnnvisError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_limit_env(monkeypatch):
    monkeypatch.delenv(limits.ENV_VAR, raising=False)
    limits.set_memory_limit(None)
    yield
    limits.set_memory_limit(None)


@pytest.mark.parametrize("text, expected", [
    ("1", 1), ("1000000", 1_000_000), ("512M", 512 * 2 ** 20), ("4G", 4 * 2 ** 30), ("4g", 4 * 2 ** 30),
    ("1.5GiB", 3 * 2 ** 29), ("2 GB", 2 * 2 ** 30), ("100K", 102_400), ("1T", 2 ** 40), (".5K", 512),
])
def test_parse_size(text, expected):
    assert limits.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "0.1", "nan", "inf", "4X", "1e9", "G", "4GG"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="expected"):
        limits.parse_size(text)


def test_format_bytes():
    assert limits.format_bytes(0) == "0 B"
    assert limits.format_bytes(1023) == "1023 B"
    assert limits.format_bytes(1024) == "1.0 KiB"
    assert limits.format_bytes(3 * 2 ** 29) == "1.5 GiB"
    assert limits.format_bytes(2 ** 60) == "1024.0 PiB"


def test_budget_precedence(monkeypatch):
    default = limits.memory_limit()
    assert default == limits.default_limit()
    monkeypatch.setenv(limits.ENV_VAR, "300M")
    assert limits.memory_limit() == 300 * 2 ** 20
    with limits.memory_limit_set(2 ** 20):
        assert limits.memory_limit() == 2 ** 20  # the option wins over the environment
        with limits.memory_limit_set(None):
            assert limits.memory_limit() == 300 * 2 ** 20
        assert limits.memory_limit() == 2 ** 20
    assert limits.memory_limit() == 300 * 2 ** 20
    monkeypatch.setenv(limits.ENV_VAR, "much")
    with pytest.raises(CnnvisError, match=r"^CNNVIS_MEMORY_LIMIT: expected a size such as 512M or 4G, got 'much'$"):
        limits.memory_limit()


def test_default_is_half_of_ram_and_of_rlimit_as():
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert limits.physical_memory() == ram
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    expected = ram if soft == resource.RLIM_INFINITY else min(ram, soft)
    assert limits.default_limit() == int(0.5 * expected)
    # in a process capped at 1 GiB the default budget is 512 MiB, whatever the RAM
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
            "from cnnvis import limits; print(limits.address_space_limit(), limits.default_limit())")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(limits.ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(1 << 30), str(1 << 29)]


def test_check_names_value_and_limit():
    with limits.memory_limit_set(1000):
        assert limits.check(1000, "x") == 1000
        with pytest.raises(CnnvisError) as info:
            limits.check(1001, "--ncols 7: a grid")
    assert str(info.value) == ("--ncols 7: a grid: needs 1001 B, more than the memory limit 1000 B "
                               "(set memory_limit=SIZE or CNNVIS_MEMORY_LIMIT)")
    assert info.value.params == ("memory_limit",)  # the CLI prints --memory-limit SIZE
    with limits.memory_limit_set(2 ** 30):
        with pytest.raises(CnnvisError, match=r"^y: needs 2\.0 GiB, more than the memory limit 1\.0 GiB "):
            limits.check(2 ** 31, "y")


def test_check_elements_has_no_overflow():
    # 2e9 × 2e9 × 3 float32 overflows int64 (1.2e19 elements × 4 bytes): still refused, with the true size
    with pytest.raises(CnnvisError, match=r"needs 42632\.6 PiB"):
        limits.check_elements((1, 3, 2_000_000_000, 2_000_000_000), 4, "input")
    with limits.memory_limit_set(4 * 24):
        assert limits.check_elements((2, 3, 4), 4, "small") == 96
        with pytest.raises(CnnvisError):
            limits.check_elements((2, 3, 4), 4, "small", copies=1.5)


def test_max_image_pixels_follows_the_budget():
    with limits.memory_limit_set(64 * 1000):
        assert limits.max_image_pixels() == 1000


def test_cli_memory_limit_option_holds_for_the_command_only(tmp_path, capsys):
    from cnnvis.cli import main

    model_file = ROOT / "models" / "fashion_caffenet.onnx"
    code = main(["layers", "--model", str(model_file), "--memory-limit", "64K"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "fashion_caffenet.onnx" in err[0] and "memory limit 64.0 KiB" in err[0]
    assert limits.memory_limit() == limits.default_limit()  # reset after the command
    assert main(["layers", "--model", str(model_file)]) == 0


# ------------------------------------------------------------------ the CLI's checked numbers

@pytest.mark.parametrize("check, good, bad", [
    (common.positive_int, [("1", 1), (" 7 ", 7)], ["0", "-1", "1.5", "x", ""]),
    (common.nonnegative_int, [("0", 0), ("3", 3)], ["-1", "nan", "2.0"]),
    (common.seed, [("0", 0), ("4294967295", 2 ** 32 - 1)], ["-1", "4294967296"]),
    (common.thread_count, [("1", 1), (str(common.MAX_THREADS), common.MAX_THREADS)],
     ["0", str(common.MAX_THREADS + 1), "5000"]),
    (common.int_range(1, 10), [("1", 1), ("10", 10)], ["0", "11"]),
    (common.finite_float, [("-2.5", -2.5), ("1e3", 1000.0)], ["nan", "inf", "-inf", "NaN", "x"]),
    (common.positive_float, [("1e-9", 1e-9)], ["0", "-0.0", "-1", "nan", "inf"]),
    (common.nonnegative_float, [("0", 0.0), ("2", 2.0)], ["-1e-9", "nan", "inf"]),
    (common.fraction, [("0", 0.0), ("1", 1.0), ("0.25", 0.25)], ["1.0001", "-0.1", "nan"]),
    (common.float_range(-1, 1), [("-1", -1.0), ("1", 1.0)], ["1.5", "nan"]),
    (common.memory_size, [("4G", 4 * 2 ** 30)], ["4X", "-4G"]),
])
def test_checked_types(check, good, bad):
    for text, value in good:
        assert check(text) == value and type(check(text)) is type(value)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=f"{text!r}|expected"):
            check(text)
    assert not any(isinstance(check(t), float) and not math.isfinite(check(t)) for t, _ in good)


def test_writable_folder(tmp_path):
    assert common.writable_folder(str(tmp_path)) == str(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="expected an existing folder.*a file"):
        common.writable_folder(str(tmp_path / "f"))
    with pytest.raises(argparse.ArgumentTypeError, match="expected an existing folder"):
        common.writable_folder(str(tmp_path / "missing"))


def test_every_float_option_is_checked():
    """No option of any command takes a bare float or int: each goes through a checked type, so
    nan/inf and out-of-range values are refused in one place."""
    from cnnvis.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bare = []
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.type in (float, int):
                bare.append(f"{name} {action.option_strings or action.dest}")
    assert bare == []
