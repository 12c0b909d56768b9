"""FP8 (E4M3, block-scaled) linear on the CPU, compiled on first use (csrc/fp8_gemm.cpp).

`fp8_linear` picks by the number of rows of x: up to MAX_ROWS a GEMV that reads the FP8 bytes
once and applies the block scales inside the kernel; beyond, a panel of rows of the weight at a
time dequantized into x's dtype and handed to torch's matmul. Both are held to
`thrifty.quant.fp8.reference_linear` by tests/test_fp8_kernels.py. Needs AVX-512 with BF16 and
VBMI (byte permutes); elsewhere, or if the build fails, `available()` is False and the caller
uses the reference.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from thrifty.kernels.build import CSRC, Kernel
from thrifty.quant import fp8

# Up to this many rows the GEMV beats the panel path (benchmarks/fp8_kernels.py).
MAX_ROWS = 8

_CFLAGS = (
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mavx512vbmi",
    "-fopenmp",
)
_CPU_FLAGS = ("avx512_bf16", "avx512vbmi")


def available() -> bool:
    """Whether the compiled FP8 kernels are loaded (builds them on the first call)."""
    return _extension() is not None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block_rows: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ (weight * scale)^T + bias for a float8_e4m3fn weight (N, K) on the CPU.

    scale: float32 (ceil(N / block_rows), ceil(K / 128)); x: bf16 or float32 (..., K); bias in
    x's dtype. Call only when `available()`.
    """
    ext = _extension()
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows <= MAX_ROWS and x.dtype == torch.bfloat16:
        return ext.fp8_gemv(x, weight, scale, block_rows, bias)
    return ext.fp8_gemm(x, weight, scale, block_rows, bias)


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, block_rows: int, dtype: torch.dtype
) -> torch.Tensor:
    """weight * scale as a float32 or bf16 matrix (the compiled twin of quant.fp8.dequantize)."""
    return _extension().fp8_dequantize(weight, scale, block_rows, dtype)


def _extension() -> ModuleType | None:
    return KERNEL.load()


def _cpu_has(flags: tuple[str, ...]) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.partition(":")[2].split())
    return all(f in have for f in flags)


KERNEL = Kernel(
    "thrifty_fp8_gemm",
    CSRC / "fp8_gemm.cpp",
    _CFLAGS,
    "the torch reference (dequantizes the whole weight on every call)",
    lambda: _cpu_has(_CPU_FLAGS),
)


def linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """The FP8 branch of models.layers.linear: the compiled kernel where it runs, else the
    reference (which dequantizes the whole weight on every call)."""
    if scale is None:
        raise ValueError(f"an fp8 weight {tuple(weight.shape)} needs its block scales")
    if (
        weight.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float32)
        and weight.is_contiguous()
        and scale.is_contiguous()
        and available()
    ):
        return fp8_linear(x, weight, scale, fp8.block_rows(weight, scale), bias)
    if weight.device.type != "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return dequantized_linear(x, weight, scale, bias)
    return fp8.reference_linear(x, weight, scale, bias)


def dequantized_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The accelerator path (CUDA and other torch devices): dequantize the weight straight into
    x's 16-bit dtype on the device, then one matmul with the device's own kernel. The full
    weight lives only for the call; its bytes from memory are the FP8 ones plus the scales."""
    w = fp8.dequantize(weight, scale, x.dtype)
    return torch.nn.functional.linear(x, w, bias)
