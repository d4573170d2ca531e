"""The host CPU's model and features, as the start-up log and `kvrun plugins` name them."""

from __future__ import annotations

from kvrun.host_cpu import HostCpu, host_cpu, parse_cpuinfo, request_amx_tiles

SAPPHIRE_RAPIDS = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Another
flags\t\t: fpu
"""
ZEN4 = """\
processor\t: 0
model name\t: AMD EPYC 9R14
flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni
"""


def test_sapphire_rapids_names_fp16_and_amx() -> None:
    cpu = parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert cpu.model == "Intel(R) Xeon(R) Processor"
    assert cpu.features == (
        "AVX2", "AVX512", "AVX512_BF16", "AVX512_FP16", "AMX_BF16", "AMX_INT8"
    )  # fmt: skip
    assert cpu.describe() == (
        "Intel(R) Xeon(R) Processor: AVX2 AVX512 AVX512_BF16 AVX512_FP16 AMX_BF16 AMX_INT8"
    )
    assert cpu.has("AMX_BF16") and not cpu.has("AMX_FP16")


def test_zen4_has_bf16_but_no_fp16_or_amx() -> None:
    cpu = parse_cpuinfo(ZEN4)
    assert cpu.describe() == "AMD EPYC 9R14: AVX2 AVX512 AVX512_BF16"
    assert not cpu.has("AVX512_FP16") and not cpu.has("AMX_BF16")


def test_a_cpu_with_none_of_the_features_says_so() -> None:
    cpu = parse_cpuinfo("model name\t: Tiny\nflags\t\t: fpu sse2\n")
    assert cpu.describe() == "Tiny: no AVX2, AVX-512 or AMX"


def test_this_machine_is_read_once() -> None:
    assert host_cpu() is host_cpu()
    assert host_cpu().model


def test_the_amx_tile_answer_is_named_after_the_features() -> None:
    cpu = HostCpu("Intel(R) Xeon(R) Processor", ("AVX512", "AMX_BF16"), "refused: EPERM")
    assert (
        cpu.describe() == "Intel(R) Xeon(R) Processor: AVX512 AMX_BF16 (AMX tiles refused: EPERM)"
    )
    assert parse_cpuinfo(SAPPHIRE_RAPIDS).amx_tiles is None  # parsing asks Linux nothing


def test_this_machine_asks_for_the_tiles_only_with_amx() -> None:
    cpu = host_cpu()
    if cpu.has("AMX_BF16"):
        # Linux grants them to a process that asks (every kernel since 5.16 with AMX).
        assert cpu.amx_tiles == request_amx_tiles() == "granted"
    else:
        assert cpu.amx_tiles is None
