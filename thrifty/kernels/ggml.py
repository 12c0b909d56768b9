"""GGUF-quantized (q4 / q5 / q8) linear on the CPU, compiled on first use (csrc/ggml_gemv.cpp).

Up to MAX_ROWS rows of x a GEMV that reads the quantized bytes once and decodes them in
registers; beyond, a panel of rows of the weight at a time dequantized into x's dtype for
torch's matmul (oneDNN, with AMX on this Xeon). Both are held to
`thrifty.quant.ggml.reference_linear` by tests/test_quant_gguf.py. Needs AVX-512 (F, BW, VL and
BF16 for rounding the output); elsewhere, or if the build fails, the reference runs (it
dequantizes the whole weight on every call).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from thrifty.kernels.build import CSRC, Kernel
from thrifty.kernels.fp8 import _cpu_has
from thrifty.quant import ggml

# Up to this many rows the GEMV beats dequantize + torch's matmul on every weight shape of SmolLM2
# and Qwen2.5-0.5B; at 16 the matmul wins on most (benchmarks/gguf_native.py --crossover).
MAX_ROWS = 8

_FORMATS = {"q4": 0, "q5": 1, "q8": 2}
_CFLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp")

KERNEL = Kernel(
    "thrifty_ggml_gemv",
    CSRC / "ggml_gemv.cpp",
    _CFLAGS,
    "the torch reference (dequantizes the whole weight on every call)",
    lambda: _cpu_has(("avx512f", "avx512bw", "avx512vl", "avx512_bf16")),
)


def _extension() -> ModuleType | None:
    return KERNEL.load()


def available() -> bool:
    """Whether the compiled kernels are loaded (builds them on the first call)."""
    return _extension() is not None


def linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """The GGUF branch of models.layers.linear: y = x @ W^T + bias for a repacked weight."""
    return linear_kernel(weight, scale, bias)(x)


def linear_kernel(
    weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`linear` for one weight, its format and kernels looked up once: the GEMV up to MAX_ROWS
    rows of x, the dequantizing GEMM beyond, the reference where the kernels cannot run."""
    if scale is None:
        raise ValueError(f"a GGUF-quantized weight {tuple(weight.shape)} needs its group scales")
    fmt, group = ggml.format_of(weight, scale)
    ext = _extension() if weight.device.type == "cpu" else None
    if ext is None or not (weight.is_contiguous() and scale.is_contiguous()):
        return lambda x: ggml.reference_linear(x, weight, scale, bias)
    code, gemv, gemm = _FORMATS[fmt], ext.ggml_gemv, ext.ggml_gemm
    max_numel = MAX_ROWS * ggml.in_features(weight, scale)

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32):
            return ggml.reference_linear(x, weight, scale, bias)
        return (gemv if x.numel() <= max_numel else gemm)(x, weight, scale, bias, code, group)

    return run


def gemm(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The large-M path at any M (for tests and the crossover benchmark)."""
    fmt, group = ggml.format_of(weight, scale)
    return _extension().ggml_gemm(x, weight, scale, bias, _FORMATS[fmt], group)


def gemv(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The GEMV path at any M (for tests and the crossover benchmark)."""
    fmt, group = ggml.format_of(weight, scale)
    return _extension().ggml_gemv(x, weight, scale, bias, _FORMATS[fmt], group)


def embedding(
    ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Rows `ids` of the quantized table, dequantized into `dtype`."""
    if weight.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and available():
        fmt, group = ggml.format_of(weight, scale)
        return _extension().ggml_rows(weight, scale, ids, _FORMATS[fmt], group, dtype)
    return ggml.embedding(ids, weight, scale, dtype)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight in `dtype` (compiled where it can be; the reference otherwise)."""
    if weight.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and available():
        fmt, group = ggml.format_of(weight, scale)
        return _extension().ggml_dequantize(weight, scale, _FORMATS[fmt], group, dtype)
    return ggml.dequantize(weight, scale, dtype)
