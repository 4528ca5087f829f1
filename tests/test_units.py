"""Sizes and durations as users type them, and sizes as reports print them."""

from __future__ import annotations

import pytest

from llama_tuner.errors import UserError
from llama_tuner.units import format_size, parse_duration, parse_size


@pytest.mark.parametrize("text,expected", [
    ("12GiB", 12 * 2**30), ("12G", 12 * 2**30), ("12gib", 12 * 2**30), ("12GB", 12 * 10**9),
    ("512MiB", 512 * 2**20), ("512M", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30)), ("4096", 4096),
    (" 8 KiB ", 8 * 1024), ("1T", 2**40), ("100kB", 100_000),
])
def test_sizes_are_binary_unless_written_as_decimal_bytes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "", "12 GiB GiB", "-1G", "12iB", "G", "12Q"])
def test_a_bad_size_names_the_option_and_the_fix(text):
    with pytest.raises(UserError, match=r"--vram-budget .* is not a size; write it like 12GiB"):
        parse_size(text, "--vram-budget")


@pytest.mark.parametrize("text,seconds", [("90", 90.0), ("90s", 90.0), ("20m", 1200.0), ("1h30m", 5400.0),
                                          ("1.5h", 5400.0), ("1h 30m 5s", 5405.0), ("2.5", 2.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "20x", "m", "20m soon", "1h-30m", ""])
def test_a_bad_duration_names_the_option(text):
    with pytest.raises(UserError, match="--timeout .* is not a duration"):
        parse_duration(text, "--timeout")


@pytest.mark.parametrize("n,text", [(None, "-"), (0, "0 KiB"), (1536, "2 KiB"), (3 * 2**20, "3 MiB"),
                                    (int(1.25 * 2**30), "1.25 GiB"), (-2 * 2**30, "-2.00 GiB")])
def test_format_size(n, text):
    assert format_size(n) == text
