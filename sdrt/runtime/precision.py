"""Arithmetic precision on CPU: ``fp32`` (the default, exact parity) or ``bf16``.

bf16 needs the CPU's bf16 instructions (AVX512_BF16, or AMX's tile units): without them a bf16 engine would
convert every operand and run slower than fp32, so it is refused in one line naming what is missing. It runs
through OpenVINO (INFERENCE_PRECISION_HINT bf16): ONNX Runtime's CPU provider has no bf16 kernels on x86.
"""

from __future__ import annotations

from pathlib import Path

from sdrt.errors import UserError

PRECISIONS = ("fp32", "bf16")
BF16_BACKENDS = ("openvino",)
# what bf16 changes: the UNet graphs and the text encoders; the VAE decoders stay fp32 (bf16 costs the image
# more there than anywhere else, benchmarks/quality.py)
BF16_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "unet_deep", "unet_shallow")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")   # /proc/cpuinfo's names


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_missing(flags: set[str] | None = None) -> str | None:
    """None when the CPU has bf16 arithmetic, else what it lacks, in words."""
    flags = cpu_flags() if flags is None else flags
    if any(f in flags for f in BF16_CPU_FLAGS):
        return None
    return "this CPU has no bf16 arithmetic (neither AVX512_BF16 nor AMX-BF16 in its flags)"


def check_precision(precision, backend: str, flags: set[str] | None = None) -> str:
    """The precision, checked: a known name, a backend that runs it, a CPU that has it."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        if backend not in BF16_BACKENDS:
            raise UserError(f"precision 'bf16' with backend {backend!r}: bf16 runs on backend "
                            f"{' or '.join(map(repr, BF16_BACKENDS))} (ONNX Runtime's CPU provider has no bf16 "
                            "arithmetic on x86)")
        missing = bf16_missing(flags)
        if missing:
            raise UserError(f"precision 'bf16': {missing}; use fp32")
    return precision
