"""GGUF-quantized (q4 / q5 / q8) linear on the CPU, compiled on first use (csrc/ggml_gemv.cpp).

q4 / q5 weights in panels (AVX-512 BF16, bf16 x; `takes_panels()`): one kernel for 1-64 rows
of x (csrc/ggml_panels.h), dequantized panels for torch's matmul beyond. Otherwise: up to
`max_rows()` rows of x a GEMV that reads the quantized bytes once and decodes them in
registers; on AVX2, up to `i16_rows()` rows an int16 GEMM blocked for registers (csrc/
ggml_gemm_i16.h: x rounded to int16 as the GEMV rounds it); beyond, a panel of rows of the
weight at a time dequantized into x's dtype for torch's matmul (oneDNN, with AMX on a Xeon). All
are held to `thrifty.quant.ggml.reference_linear` or `reference_gemv` by
tests/test_quant_gguf.py. Built for AVX-512 (F, BW, VL, BF16) or, on CPUs without it, for AVX2 +
FMA; elsewhere, or if the build fails, the reference runs (it dequantizes the whole weight on
every call).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

from thrifty.kernels.build import CSRC, Kernel, cpu_has
from thrifty.quant import ggml

_FORMATS = {"q4": 0, "q5": 1, "q8": 2, "q4p": 3, "q5p": 4}
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma", "f16c")
_AVX2 = ("avx2", "fma", "f16c")
_FALLBACK = "the torch reference (dequantizes the whole weight on every call)"

# One source, two builds: AVX-512 (with BF16 dot products for bf16 activations) where the CPU
# has it, else AVX2 + FMA (16 lanes in two registers, csrc/vec16.h; F16C widens float16 scales):
# chosen once, at start-up.
AVX512_KERNEL = Kernel(
    "thrifty_ggml_gemv",
    CSRC / "ggml_gemv.cpp",
    # FMA and F16C for the int16 GEMV (AVX2 instructions) it runs for q4 at one row
    ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-mf16c", "-fopenmp"),
    _FALLBACK,
    lambda: cpu_has(_AVX512),
)
AVX2_KERNEL = Kernel(
    "thrifty_ggml_gemv_avx2",
    CSRC / "ggml_gemv.cpp",
    ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"),
    _FALLBACK,
    lambda: cpu_has(_AVX2),
)


@functools.cache
def kernel() -> Kernel:
    """The build this CPU runs: AVX-512 where it has it, else AVX2 (whose `load` warns and
    returns None on a CPU with neither)."""
    return AVX512_KERNEL if AVX512_KERNEL.supported() else AVX2_KERNEL


def _extension() -> ModuleType | None:
    return kernel().load()


def max_rows() -> int:
    """The most rows of x this CPU's build sends to the GEMV (csrc/ggml_gemv.cpp: kGemvRows;
    0 where the kernels cannot run)."""
    ext = _extension()
    return ext.gemv_rows if ext is not None else 0


def i16_rows() -> int:
    """The most rows of x this CPU's build sends to its int16 GEMM (0: it has none)."""
    ext = _extension()
    return ext.i16_rows if ext is not None else 0


def takes_panels() -> bool:
    """Whether this CPU's build runs q4 / q5 weights in panels of 16 rows (csrc/ggml_panels.h:
    AVX-512 BF16, bf16 x), the layout the loader then gives them."""
    ext = _extension()
    return ext is not None and bool(ext.panels)


def to_panels(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`thrifty.quant.ggml.to_panels`, its bytes laid out by the compiled kernels."""
    if not ggml.fits_panels(weight, scale):
        raise ValueError("only q4 / q5 weights with rows in sixteens go in panels")
    fmt, _ = ggml.format_of(weight, scale)
    packed = _extension().ggml_to_panels(weight.contiguous(), _FORMATS[fmt])
    return packed, ggml.panel_scales(scale)


def takes_half_scales() -> bool:
    """Whether this CPU's kernels read float16 scales as they are (the AVX2 build, and the
    torch reference); the AVX-512 build takes float32 (the loader widens them for it)."""
    ext = _extension()
    return ext is None or bool(ext.half_scales)


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
    """`linear` for one weight, its format and kernel looked up once: the compiled dispatch by
    x's rows (the GEMV up to max_rows(), the int16 GEMM up to i16_rows() on AVX2, the
    dequantizing GEMM beyond), the reference where the kernels cannot run. The compiled one
    carries `native`: what the decode step's compiled layer loop calls instead
    (kernels.native_linear)."""
    if scale is None:
        raise ValueError(f"a GGUF-quantized weight {tuple(weight.shape)} needs its group scales")
    fmt, group = ggml.format_of(weight, scale)
    ext = _extension() if weight.device.type == "cpu" else None
    if ext is None or not (weight.is_contiguous() and scale.is_contiguous()):
        return lambda x: ggml.reference_linear(x, weight, scale, bias)
    code, linear_rows = _FORMATS[fmt], ext.ggml_linear
    if fmt in ggml.PANEL_FORMATS and not ext.panels:
        return lambda x: ggml.reference_linear(x, weight, scale, bias)
    dtypes = (torch.bfloat16,) if fmt in ggml.PANEL_FORMATS else (torch.bfloat16, torch.float32)

    def run(x: torch.Tensor) -> torch.Tensor:
        # x.is_cpu, not x.device.type: 0.06 us against 0.5, on ~120 calls a decode step
        if not x.is_cpu or x.dtype not in dtypes:
            return ggml.reference_linear(x, weight, scale, bias)
        return linear_rows(x, weight, scale, bias, code, group)

    run.native = (ext.linear_capsule, weight, scale, bias, code, group)  # type: ignore[attr-defined]
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


def gemm_i16(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The int16 GEMM at any M (AVX2 builds only; for tests and the crossover benchmark): what
    reference_gemv computes, as the GEMV does."""
    fmt, group = ggml.format_of(weight, scale)
    return _extension().ggml_gemm_i16(x, weight, scale, bias, _FORMATS[fmt], group)


def quantizes_x() -> bool:
    """Whether this CPU's GEMV rounds x to int16 per group of 32 before its integer dot products
    on every format (the AVX2 build, where K is a multiple of 32); the AVX-512 build multiplies
    x as it is, except at one row of bf16 x on q4 weights (gemv_quantizes_x)."""
    ext = _extension()
    return bool(ext is not None and ext.quantizes_x)


def gemv_quantizes_x(fmt: str, rows: int, dtype: torch.dtype) -> bool:
    """Whether the GEMV rounds x to int16 for a weight of this format at `rows` rows of x in
    `dtype`: everywhere on AVX2; on AVX-512, q4 at one row of bf16 x (csrc/ggml_gemv.cpp:
    faster there than its BF16 dot products)."""
    ext = _extension()
    if ext is None:
        return False
    one_row_q4 = getattr(ext, "quantizes_q4_one_row", False)
    return bool(ext.quantizes_x or (one_row_q4 and fmt == "q4" and rows == 1
                                    and dtype == torch.bfloat16))  # fmt: skip


def reference_quantize_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qx, dx): x (..., K) in groups of 32 as integers qx in [-32767, 32767] (held in float32)
    times dx = max|x| / 32767 per group (..., K / 32, 1), qx = x * (1 / dx) rounded half to
    even."""
    xg = x.float().reshape(*x.shape[:-1], -1, 32)
    d = xg.abs().amax(-1, keepdim=True) / 32767
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return torch.round(xg * inv).clamp(-32767, 32767), d


def reference_gemv(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What `gemv` computes on this CPU, in torch: the dequantized float32 matmul, or where the
    GEMV quantizes x (groups of 32), sum_g d_g dx_g (q . qx) + m_g sum(x over g)."""
    fmt, _ = ggml.format_of(weight, scale)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    # q8 in groups of 16 too, when K allows
    if not (gemv_quantizes_x(fmt, rows, x.dtype) and x.shape[-1] % 32 == 0):
        return ggml.reference_linear(x, weight, scale, bias)
    qx, dx = reference_quantize_x(x)
    y = F.linear((qx * dx).flatten(-2), ggml.dequantize(weight, scale))
    if fmt != "q8":  # the offsets m meet x's own sums, not the rounded x's
        shift = x.float().reshape(qx.shape).sum(-1) - (qx * dx).sum(-1)
        y = y + F.linear(shift, scale[:, 1].float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def embedding(
    ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Rows `ids` of the quantized table, dequantized into `dtype`."""
    if weight.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and available():
        fmt, group = ggml.format_of(weight, scale)
        return _extension().ggml_rows(weight, scale, ids, _FORMATS[fmt], group, dtype)
    return ggml.embedding(ids, weight, scale, dtype)


def native_rows(weight: torch.Tensor, scale: torch.Tensor) -> tuple | None:
    """The quantized table as the compiled decode step reads its rows (capsule, weight, scale,
    format, group); None where the kernels cannot run."""
    ext = _extension()
    if ext is None or not (weight.is_contiguous() and scale.is_contiguous()):
        return None
    fmt, group = ggml.format_of(weight, scale)
    return (ext.rows_capsule, weight, scale, _FORMATS[fmt], group)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight in `dtype` (compiled where it can be; the reference otherwise)."""
    fmt, group = ggml.format_of(weight, scale)
    if (
        weight.device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float32)
        and fmt not in ggml.PANEL_FORMATS
        and available()
    ):
        return _extension().ggml_dequantize(weight, scale, _FORMATS[fmt], group, dtype)
    return ggml.dequantize(weight, scale, dtype)
