"""FP8 (E4M3, block-scaled) linear on the CPU, compiled on first use.

A bf16 model's FP8 weights are packed at load (`pack`: panels of 16 rows, csrc/fp8_packed.cpp)
and `packed_linear` runs them: up to `amx_min_rows()` rows of x an AVX-512 BF16 GEMV that
turns each byte into bf16 with two shifts and a mask and streams the weight once; from there,
on CPUs with AMX, panels dequantized to bf16 on the tiles. Weights that cannot be packed (rows
not a multiple of 16, columns not of 4), float32 models and CPUs without AVX-512 keep the
checkpoint's layout and go to `fp8_linear`: up to `max_rows()` rows of x a GEMV that reads the
weight once, beyond, a panel at a time dequantized for torch's matmul. That kernel has two
builds, chosen once from the CPU's features: AVX-512 (csrc/fp8_gemm.cpp: byte lookups, BF16
dot products, bf16 x) and AVX2 + FMA + F16C (csrc/fp8_avx2.cpp: each byte made a half-precision
number with a shift and a mask, float32 sums, float32 or bf16 x). All are held to
`thrifty.quant.fp8.reference_linear` by tests/test_fp8_kernels.py. On CPUs with neither, or if
a build fails, `available()` is False and the caller uses the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch

from thrifty.kernels.build import CSRC, Kernel, cpu_has
from thrifty.quant import fp8

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
_FALLBACK = "the torch reference (dequantizes the whole weight on every call)"


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
    if rows <= max_rows() and (x.dtype == torch.bfloat16 or ext.gemv_float32):
        return ext.fp8_gemv(x, weight, scale, block_rows, bias)
    return ext.fp8_gemm(x, weight, scale, block_rows, bias)


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, block_rows: int, dtype: torch.dtype
) -> torch.Tensor:
    """weight * scale as a float32 or bf16 matrix (the compiled twin of quant.fp8.dequantize)."""
    return _extension().fp8_dequantize(weight, scale, block_rows, dtype)


KERNEL = Kernel(
    "thrifty_fp8_gemm", CSRC / "fp8_gemm.cpp", _CFLAGS, _FALLBACK, lambda: cpu_has(_CPU_FLAGS)
)
AVX2_KERNEL = Kernel(
    "thrifty_fp8_avx2",
    CSRC / "fp8_avx2.cpp",
    ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"),
    _FALLBACK,
    lambda: cpu_has(("avx2", "fma", "f16c")),
)
# Up to this many rows of x the GEMV beats the panel path, per build: AVX-512 from
# benchmarks/fp8_kernels.py (which needs the packed AVX-512 kernel); AVX2 from a hand-timed
# sweep on the EPYC (GEMV against panel on Qwen2.5-0.5B's shapes: about even at 16 rows).
MAX_ROWS = {KERNEL.name: 8, AVX2_KERNEL.name: 16}


@functools.cache
def kernel() -> Kernel:
    """The build of `fp8_linear` this CPU runs: AVX-512 where it has BF16 and VBMI, else AVX2
    (whose `load` warns and returns None on a CPU without it)."""
    return KERNEL if KERNEL.supported() else AVX2_KERNEL


def max_rows() -> int:
    """The most rows of x this CPU's build sends to the GEMV."""
    return MAX_ROWS[kernel().name]


def _extension() -> ModuleType | None:
    return kernel().load()


PACKED = Kernel(
    "thrifty_fp8_packed",
    CSRC / "fp8_packed.cpp",
    (
        "-O3",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512bf16",
        "-mamx-tile",
        "-mamx-bf16",
        "-fopenmp",
    ),  # fmt: skip
    "FP8 weights in the checkpoint's layout",
    lambda: cpu_has(("avx512_bf16",)),
)

# Packed layout: W (N, K) -> (N / 16, K / 4, 64) bytes, panel p chunk c holding columns
# 4c .. 4c + 3 of rows 16p .. 16p + 15; byte 2w + 1 is (row w // 2, column w % 2), byte 2w is
# (row w // 2, column 2 + w % 2). Read as words, the high bytes are one pair-row of the bf16
# packed layout (kernels.pack_weight) and the low bytes the next; see csrc/fp8_packed.cpp.
PANEL_ROWS, CHUNK_COLS = 16, 4
_BYTE_SOURCE = torch.tensor(  # chunk byte b <- (row, column) flattened as row * 4 + column
    [(b // 4) * 4 + (b // 2) % 2 + (0 if b % 2 else 2) for b in range(64)]
)
# From this many rows of x the AMX path beats the AVX-512 GEMV (benchmarks/fp8_kernels.py).
AMX_MIN_ROWS = 8


def can_pack(weight: torch.Tensor) -> bool:
    """Whether an FP8 weight can take the packed layout (and the packed kernel is here)."""
    if weight.dtype != fp8.FP8_DTYPE or weight.dim() != 2 or weight.device.type != "cpu":
        return False
    n, k = weight.shape
    return n > 0 and k > 0 and n % PANEL_ROWS == 0 and k % CHUNK_COLS == 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) float8_e4m3fn -> (N / 16, K / 4, 64) float8_e4m3fn; see can_pack. The GEMV would
    read E4M3's NaN bytes as numbers, so a weight holding any is refused."""
    n, k = weight.shape
    b = weight.view(torch.uint8)
    if bool(((b & 0x7F) == 0x7F).any()):
        raise ValueError(f"an fp8 weight {tuple(weight.shape)} holds NaN; it cannot be packed")
    chunks = b.view(n // PANEL_ROWS, PANEL_ROWS, k // CHUNK_COLS, CHUNK_COLS).transpose(1, 2)
    packed = chunks.reshape(n // PANEL_ROWS, k // CHUNK_COLS, 64)[..., _BYTE_SOURCE]
    return packed.contiguous().view(fp8.FP8_DTYPE)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack: the (N, K) weight in the checkpoint's layout."""
    p, c, _ = packed.shape
    chunks = torch.empty_like(packed.view(torch.uint8))
    chunks[..., _BYTE_SOURCE] = packed.view(torch.uint8)
    w = chunks.view(p, c, PANEL_ROWS, CHUNK_COLS).transpose(1, 2)
    return w.reshape(p * PANEL_ROWS, c * CHUNK_COLS).contiguous().view(fp8.FP8_DTYPE)


def packed_shape(packed: torch.Tensor) -> tuple[int, int]:
    """(N, K) of the weight a packed one holds."""
    return packed.shape[0] * PANEL_ROWS, packed.shape[1] * CHUNK_COLS


def packed_available() -> bool:
    """Whether the packed kernel is loaded (builds it on the first call)."""
    return PACKED.load() is not None


@functools.cache
def amx_min_rows() -> int:
    """Rows of x from which packed_linear runs on AMX: AMX_MIN_ROWS where this CPU and Linux
    give the process AMX tiles, else 0 (never: the AVX-512 GEMV at every batch size)."""
    ext = PACKED.load()
    return AMX_MIN_ROWS if ext is not None and ext.amx_available() else 0


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ (W * scale)^T + bias for a packed FP8 weight (see pack). bf16 x runs on the packed
    kernel; other dtypes (rare: weights are packed for bf16 models) unpack first."""
    if x.dtype == torch.bfloat16 and (ext := PACKED.load()) is not None:
        return ext.fp8_packed_linear(x, packed, scale, bias, amx_min_rows())  # infers block rows
    w = unpack(packed)
    return fp8_linear(x, w, scale, fp8.block_rows(w, scale), bias)


def linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """The FP8 branch of models.layers.linear: the compiled kernel where it runs, else the
    reference (which dequantizes the whole weight on every call)."""
    if scale is None:
        raise ValueError(f"an fp8 weight {tuple(weight.shape)} needs its block scales")
    if weight.dim() == 3:
        return packed_linear(x, weight, scale, bias)
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


def linear_kernel(
    weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`linear` for one FP8 weight with its kernel looked up once (models.layers.linear_kernel):
    a packed weight binds the packed kernel and its AMX threshold, any other goes through
    `linear` each call."""
    ext = PACKED.load() if weight.dim() == 3 else None
    if ext is None or scale is None:
        return functools.partial(linear, weight=weight, scale=scale, bias=bias)
    run, amx_rows = ext.fp8_packed_linear, amx_min_rows()

    def packed(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            return packed_linear(x, weight, scale, bias)
        return run(x, weight, scale, bias, amx_rows)

    return packed
