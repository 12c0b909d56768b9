"""FP8 weights with block scales, in DeepSeek-V3's checkpoint format, and the pure-torch reference.

A weight (N, K) is stored as float8_e4m3fn with one float32 scale per 128x128 block, named
`<name>.weight_scale_inv`: despite the name, the dequantized weight is `w_fp8 * scale`. Blocks at
the right and bottom edges may be partial (N or K not a multiple of 128); the scale grid is
(ceil(N / 128), ceil(K / 128)). Two scale formats:

- "float": scale = amax / 448, any positive float32 (DeepSeek-V3);
- "ue8m0": scale = 2^ceil(log2(amax / 448)), an exact power of two (DeepSeek-V3.1), so that
  applying it is an exponent add and the quantized values never exceed E4M3's 448.

In memory a merged projection (q/k/v stacked along rows) may carry scales on a finer row grid
(64, 32 or 16 rows per block) when its shards are not multiples of 128 rows: `block_rows` infers
that grid from the shapes, so the weight and its scale tensor are all a kernel needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from thrifty.errors import ThriftyError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite E4M3 value
BLOCK = 128  # weight_block_size along both dims, the only one DeepSeek ships
SCALE_FMTS = ("ue8m0", "float")
ROW_BLOCKS = (128, 64, 32, 16)  # row grids a merged weight's scales may use, coarsest first
SCALE_SUFFIX = "_scale_inv"  # `<module>.weight` -> `<module>.weight_scale_inv`
# EngineConfig.quantization -> the scale format it writes. "fp8" follows DeepSeek's rule (the
# head stays in high precision); "fp8-all" quantizes an untied lm_head too, as llama.cpp's Q8_0
# does with its output tensor: on small models with big vocabularies the head is a large share
# of the bytes each decode step reads.
QUANTIZATIONS = {"fp8": "ue8m0", "fp8-all": "ue8m0"}
QUANTIZES_HEAD = ("fp8-all",)


@dataclass(frozen=True)
class Fp8Config:
    """The checkpoint's `quantization_config`, checked; what `thrifty quantize` writes back."""

    scale_fmt: str = "ue8m0"  # "ue8m0" or "float"

    def to_hf(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK],
        }
        if self.scale_fmt == "ue8m0":
            cfg["scale_fmt"] = "ue8m0"
        return cfg

    @staticmethod
    def from_hf(q: dict[str, Any]) -> Fp8Config:
        """Parse a `quantization_config`; anything this engine cannot run is refused by name."""
        method = q.get("quant_method")
        if method != "fp8":
            raise ThriftyError(f"unsupported quantization_config.quant_method {method!r} (fp8)")
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ThriftyError(f"unsupported quantization_config.fmt {fmt!r} (supported: e4m3)")
        scheme = q.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ThriftyError(
                f"unsupported quantization_config.activation_scheme {scheme!r} (dynamic)"
            )
        block = q.get("weight_block_size")
        if block is not None and list(block) != [BLOCK, BLOCK]:
            raise ThriftyError(
                f"unsupported quantization_config.weight_block_size {block!r} "
                f"(supported: [{BLOCK}, {BLOCK}])"
            )
        scale_fmt = q.get("scale_fmt") or "float"
        if scale_fmt not in SCALE_FMTS:
            raise ThriftyError(
                f"unsupported quantization_config.scale_fmt {scale_fmt!r} (ue8m0, or none)"
            )
        return Fp8Config(scale_fmt=scale_fmt)


def scale_shape(weight_shape: tuple[int, ...] | torch.Size, rows: int = BLOCK) -> tuple[int, int]:
    n, k = weight_shape
    return math.ceil(n / rows), math.ceil(k / BLOCK)


def block_rows(weight: torch.Tensor, scale: torch.Tensor) -> int:
    """Rows per scale block, from the shapes: the coarsest grid in ROW_BLOCKS that fits.

    Two grids with the same number of block rows map every row to the same block, so the
    choice is unambiguous where it matters.
    """
    for rows in ROW_BLOCKS:
        if scale_shape(weight.shape, rows) == tuple(scale.shape):
            return rows
    raise ValueError(f"scale {tuple(scale.shape)} does not fit weight {tuple(weight.shape)}")


def compute_scales(amax: torch.Tensor, scale_fmt: str) -> torch.Tensor:
    """The per-block scale from each block's max |w|; UE8M0 rounds it up to a power of two."""
    if scale_fmt not in SCALE_FMTS:
        raise ThriftyError(f"unknown scale format {scale_fmt!r} (choose from ue8m0, float)")
    # An all-zero block gets a tiny positive scale (any works) instead of 0 or inf.
    s = amax.float().clamp(min=1e-30) / FP8_MAX
    if scale_fmt == "ue8m0":
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return s


def quantize(
    weight: torch.Tensor, scale_fmt: str = "ue8m0", rows: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight (N, K) -> (float8_e4m3fn weight (N, K), float32 scales on the block grid)."""
    if weight.dim() != 2:
        raise ValueError(f"fp8 quantize expects a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    sn, sk = scale_shape(weight.shape, rows)
    w = F.pad(weight.float(), (0, sk * BLOCK - k, 0, sn * rows - n))  # zeros don't move amax
    blocks = w.view(sn, rows, sk, BLOCK)
    scale = compute_scales(blocks.abs().amax(dim=(1, 3)), scale_fmt)  # (sn, sk)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(sn * rows, sk * BLOCK)[:n, :k].contiguous(), scale


def expand_scales(scale: torch.Tensor, rows: int, n: int, k: int) -> torch.Tensor:
    """Scales on a grid of `rows` x 128 blocks -> one scale per element (n, k)."""
    return scale.repeat_interleave(rows, dim=0)[:n].repeat_interleave(BLOCK, dim=1)[:, :k]


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """w_fp8 * scale in float32, rounded once to `dtype`: the reference every kernel is held to."""
    n, k = weight.shape
    full = expand_scales(scale.float(), block_rows(weight, scale), n, k)
    return (weight.float() * full).to(dtype)


def reference_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantize the whole weight, then y = x @ W^T + b in float32, rounded once to x's dtype."""
    w = dequantize(weight, scale)
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w, b).to(x.dtype)


def check_weight(name: str, weight: torch.Tensor) -> None:
    """Refuse fp8 tensor `name` if it holds E4M3's NaN (bytes 0x7F, 0xFF): no quantizer writes
    one, a model holding one computes NaN, and the compiled kernels read those bytes as numbers."""
    nan = (weight.view(torch.uint8) & 0x7F) == 0x7F
    if bool(nan.any()):
        i, j = (int(v) for v in nan.nonzero()[0])
        raise ThriftyError(
            f"fp8 tensor {name!r} holds NaN at ({i}, {j}) ({int(nan.sum())} of {nan.numel()} "
            "values)"
        )


def check_scale(name: str, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The checkpoint's scale for fp8 tensor `name`, as float32; refuses a bad one by name."""
    scale_name = name + SCALE_SUFFIX
    if scale is None:
        raise ThriftyError(f"fp8 tensor {name!r} has no scale tensor {scale_name!r}")
    expected = scale_shape(weight.shape)
    if tuple(scale.shape) != expected:
        raise ThriftyError(
            f"scale tensor {scale_name!r} has shape {tuple(scale.shape)}, expected {expected} "
            f"for a {tuple(weight.shape)} weight in {BLOCK}x{BLOCK} blocks"
        )
    if not scale.is_floating_point():
        raise ThriftyError(f"scale tensor {scale_name!r} has dtype {scale.dtype}, expected float32")
    scale = scale.float()
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bad.any():
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ThriftyError(
            f"scale tensor {scale_name!r} holds {scale[i, j].item()} at block ({i}, {j}); "
            "scales must be finite and positive"
        )
    return scale


def merge(
    parts: list[tuple[torch.Tensor, torch.Tensor]], scale_fmt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack fp8 shards (q, k, v or gate, up) along rows, keeping their bits and scales.

    The merged scales use the coarsest row grid on which every shard boundary falls: 128 rows
    for DeepSeek-sized projections, 64 for heads of 64 that are not a multiple of 128. Shards
    that break even a 16-row grid are dequantized and quantized again as one weight.
    """
    sizes = [w.shape[0] for w, _ in parts]
    rows = math.gcd(BLOCK, *sizes[:-1]) if len(sizes) > 1 else BLOCK
    weight = torch.cat([w for w, _ in parts])
    if rows < ROW_BLOCKS[-1]:
        full = torch.cat([dequantize(w, s) for w, s in parts])
        return quantize(full, scale_fmt)
    # The last shard's partial edge block is the merged weight's edge block: no gcd needed.
    scale = torch.cat(
        [
            s.repeat_interleave(BLOCK // rows, dim=0)[: math.ceil(w.shape[0] / rows)]
            for w, s in parts
        ]
    )
    return weight, scale
