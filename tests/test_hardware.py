"""tasks.hardware: the CPU's instruction-set extensions, parsed from /proc/cpuinfo text."""

from __future__ import annotations

from pathlib import Path

from tasks.hardware import cpu_count, cpu_features, parse_cpuinfo

AVX2_ONLY = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx f16c fma avx2 bmi2 sha_ni
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx f16c fma avx2 bmi2 sha_ni avx512f
"""

SAPPHIRE_RAPIDS = """\
processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8
"""

NEOVERSE_V1 = """\
processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes sha1 sha2 crc32 atomics fphp asimdhp bf16 i8mm sve
CPU implementer\t: 0x41
"""


def test_avx2_only_cpu_has_neither_bf16_nor_saturation_free_int8() -> None:
    cpu = parse_cpuinfo(AVX2_ONLY)
    assert cpu.model == "AMD EPYC 7B13"
    assert {"avx2", "fma", "f16c"} <= cpu.flags
    assert "avx512f" not in cpu.flags  # only the first processor's line counts
    assert not cpu.bf16_dot and not cpu.int8_dot
    summary = cpu.summary()
    assert summary["avx2"] is True and summary["avx512_bf16"] is False


def test_amx_cpu_reports_bf16_and_int8_dot_products() -> None:
    cpu = parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert cpu.model.startswith("Intel(R) Xeon(R) Platinum")
    assert cpu.bf16_dot and cpu.int8_dot
    assert cpu.summary()["amx_int8"] is True


def test_arm_features_line_is_read() -> None:
    cpu = parse_cpuinfo(NEOVERSE_V1)
    assert cpu.model == ""
    assert {"asimd", "bf16", "i8mm", "sve"} <= cpu.flags
    assert cpu.bf16_dot and cpu.int8_dot


def test_missing_file_and_empty_text_give_no_flags(tmp_path: Path) -> None:
    assert cpu_features(str(tmp_path / "absent")).flags == frozenset()
    assert parse_cpuinfo("").model == ""


def test_this_machine() -> None:
    cpu = cpu_features()
    assert cpu_count() >= 1
    if Path("/proc/cpuinfo").exists():
        assert cpu.flags, "a Linux machine lists its CPU flags"
