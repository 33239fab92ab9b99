import platform

import pytest

from instructx2x import devices


@pytest.mark.parametrize(
    "vendor,flags,expected",
    [
        ("Intel", {"avx512f", "avx512_bf16", "amx_bf16"}, "Intel x86_64 {} +bf16 (AMX)"),
        ("AMD", {"avx512f", "avx512_bf16"}, "AMD x86_64 {} +bf16 (AVX-512 BF16)"),
        ("AMD", {"avx2"}, "AMD x86_64 {}"),
    ],
)
def test_the_cpu_description_names_the_vendor_and_the_bf16_path(monkeypatch, vendor, flags, expected):
    """Timings are recorded beside it, and the three CPU kinds we meet time very differently."""
    monkeypatch.setattr(devices, "_cpu_vendor_and_flags", lambda: (vendor, frozenset(flags)))
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    capability = devices.torch.backends.cpu.get_cpu_capability()
    assert devices.cpu_description() == expected.format(capability)
    assert devices.cpu_has_native_bf16() is ("avx512_bf16" in flags)
