"""What this machine offers, read at run time: the cores this process may use and the CPU's
instruction-set extensions."""

from __future__ import annotations

import os
from dataclasses import dataclass


def cpu_count() -> int:
    """Cores this process may run on (respects affinity masks and container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# The instruction-set extensions that decide how fast reduced-precision matrix products run:
# AVX-512 BF16 / AMX give bfloat16 dot products, VNNI (AVX-512 or AVX) and AMX-INT8 give int8
# dot products that accumulate in int32 without the int16 saturation of plain AVX2; ARM's
# bf16/i8mm are the counterparts there.
_KNOWN_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "bf16",
    "i8mm",
    "sve",
)


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU reports about itself (``/proc/cpuinfo``), read at run time.

    Attributes
    ----------
    model : str
        The model name, or "" where the system does not say.
    flags : frozenset of str
        Every flag the kernel lists for the first CPU (x86 ``flags``, ARM ``Features``).
    """

    model: str
    flags: frozenset[str]

    @property
    def bf16_dot(self) -> bool:
        """Native bfloat16 dot products (AVX-512 BF16, AMX-BF16 or ARM BF16)."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16"}) or "bf16" in self.flags

    @property
    def int8_dot(self) -> bool:
        """int8 dot products accumulating in int32 without saturation (VNNI, AMX, ARM i8mm)."""
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8", "i8mm"})

    def summary(self) -> dict[str, bool]:
        """The flags that matter for matrix products, each present or not (for reports)."""
        return {flag: flag in self.flags for flag in _KNOWN_FLAGS}


def parse_cpuinfo(text: str) -> CpuFeatures:
    """The model and flags of the first processor listed in ``/proc/cpuinfo``-format text."""
    model = ""
    flags: frozenset[str] = frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return CpuFeatures(model=model, flags=flags)


def cpu_features(path: str = "/proc/cpuinfo") -> CpuFeatures:
    """The running CPU's model and flags; empty where the file does not exist (not Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return parse_cpuinfo(fh.read())
    except OSError:
        return CpuFeatures(model="", flags=frozenset())
