"""Human sizes ("12GiB", "512M") and durations ("20m", "1h30m"), parsed strictly."""

from __future__ import annotations

import re

from llama_tuner.errors import UserError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)", re.IGNORECASE)


def parse_size(text: str, option: str = "size") -> int:
    """Bytes in ``text``: 12GiB and 12G are binary (GiB), 12GB is decimal; a bare number is bytes.

    Raises:
        UserError: ``text`` is not a size (the message names ``option``).
    """
    m = _SIZE.match(str(text))
    if not m or (m.group(3) and not m.group(2)):
        raise UserError(f"{option} {text!r} is not a size", "write it like 12GiB, 12G or 512MiB")
    number, prefix, binary, byte = m.groups()
    # "12G" and "12GiB" mean GiB, as GPU memory is sold; only an explicit "GB" is decimal.
    base = 1000 if (byte and not binary and prefix) else 1024
    return int(float(number) * base ** _POWERS[prefix.lower()])


def parse_duration(text: str, option: str = "duration") -> float:
    """Seconds in ``text``: 90s, 20m, 1h30m; a bare number is seconds.

    Raises:
        UserError: ``text`` is not a duration (the message names ``option``).
    """
    s = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = _DURATION.findall(s)
    if not parts or "".join(f"{n}{u}" for n, u in parts).lower() != s.replace(" ", "").lower():
        raise UserError(f"{option} {text!r} is not a duration", "write it like 90s, 20m or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u.lower()] for n, u in parts)


def format_size(n: float | None) -> str:
    """A byte count as GiB (two decimals), MiB or KiB ("-" for None)."""
    if n is None:
        return "-"
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:.0f} KiB"
