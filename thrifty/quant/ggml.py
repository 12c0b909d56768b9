"""GGUF's block-quantized weights, repacked into three formats one kernel family runs natively.

llama.cpp's types differ in their bit layouts but all compute w = d * q + m per group of 16 or
32 weights along a row. At load each is repacked, exactly, into one of:

  q4  uint8 (N, K / 2): per group of 32 weights 16 bytes, byte j holding q_j in its low nibble
      and q_{j+16} in its high one; scale (N, 2, K / 32) of d and m: w = d * q + m.
      Q4_0 (m = -8 d), Q4_1, and Q4_K's sub-blocks (d * sc and -dmin * min).
  q5  uint8 (N, 20 K / 32): per group the 16 nibble bytes of q4, then 4 bytes (a little-endian
      uint32) whose bit j is bit 4 of q_j; scale as q4. Q5_0 (m = -16 d) and Q5_1.
  q8  int8 (N, K); scale (N, 1, K / G): w = d * q for groups of G = 32 (Q8_0) or
      16 (Q6_K, whose q - 32 and d * sc are exact).

Scales are float16 where the file's are (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; -8 d and -16 d are exact
too): the bytes a decode step reads are the file's own, SmolLM2's Q4_1 at 20 per group of 32
where float32 scales made 24. A K-quant's d * sc is not a float16: its scales are float32.
Every product above is exact in float32, so `dequantize` equals gguf's own dequantization bit
for bit. A weight's format is read off its dtype and shapes (`format_of`): the scale travels
beside the weight, nothing else does.

On CPUs whose kernels take them (AVX-512 BF16, bf16 activations), q4 and q5 weights are laid out
again at load in panels of 16 output rows, `q4p` / `q5p` (`to_panels`, below): the same values,
for the kernel that serves every batch size (csrc/ggml_panels.h).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf.quants import Q4_K

GROUP = 32  # weights per q4 / q5 group
SCALE_DTYPES = (torch.float32, torch.float16)
_Q5_GROUP_BYTES = 20
PANEL_ROWS = 16  # output rows per panel (q4p / q5p)
_PANEL_BYTES = {"q4p": 256, "q5p": 320}  # bytes per panel and group of 32 columns
PANEL_FORMATS = tuple(_PANEL_BYTES)


def format_of(weight: torch.Tensor, scale: torch.Tensor) -> tuple[str, int]:
    """(format, group size) of a repacked weight and its scale; ValueError if they do not fit."""
    if scale.dim() == 4:
        return _panel_format(weight, scale), GROUP
    n, groups = weight.shape[0], scale.shape[-1]
    if scale.dtype not in SCALE_DTYPES or scale.dim() != 3 or scale.shape[0] != n or groups == 0:
        raise ValueError(
            f"a GGUF scale must be float32 or float16 (N, 1 or 2, groups), got {scale.dtype} "
            f"{tuple(scale.shape)}"
        )
    row = weight.shape[1]
    if weight.dtype == torch.int8 and scale.shape[1] == 1 and row % groups == 0:
        return "q8", row // groups
    if weight.dtype == torch.uint8 and scale.shape[1] == 2:
        if row == groups * GROUP // 2:
            return "q4", GROUP
        if row == groups * _Q5_GROUP_BYTES:
            return "q5", GROUP
    raise ValueError(
        f"no GGUF format has a {weight.dtype} weight {tuple(weight.shape)} with scale "
        f"{tuple(scale.shape)}"
    )


def _panel_format(weight: torch.Tensor, scale: torch.Tensor) -> str:
    panels, groups = scale.shape[0], scale.shape[1]
    if (
        scale.dtype in SCALE_DTYPES
        and scale.shape[2:] == (2, PANEL_ROWS)
        and weight.dtype == torch.uint8
        and weight.dim() == 2
        and weight.shape[0] == panels
        and groups > 0
    ):
        for fmt, nbytes in _PANEL_BYTES.items():
            if weight.shape[1] == groups * nbytes:
                return fmt
    raise ValueError(
        f"no GGUF panel format has a {weight.dtype} weight {tuple(weight.shape)} with scale "
        f"{scale.dtype} {tuple(scale.shape)}"
    )


def in_features(weight: torch.Tensor, scale: torch.Tensor) -> int:
    fmt, group = format_of(weight, scale)
    if fmt in _PANEL_BYTES:
        return scale.shape[1] * group
    return weight.shape[1] if fmt == "q8" else scale.shape[-1] * group


def out_features(weight: torch.Tensor, scale: torch.Tensor) -> int:
    fmt, _ = format_of(weight, scale)
    return weight.shape[0] * (PANEL_ROWS if fmt in _PANEL_BYTES else 1)


# --- panels: q4 / q5 laid out for the CPU kernel that takes every batch size ------------------
#
# Panel p holds output rows 16p .. 16p + 15. Per group g of 32 columns, 16 steps j, each the
# columns 2j, 2j + 1 of the 16 rows: lane L = 2i + e is row i's column 2j + e. The group's 256
# bytes are 4 chunks of 32 little-endian 16-bit words, nibble s of chunk c's word L holding the
# low 4 bits of step 4c + s's lane L; q5 adds 64 bytes, step j's uint32 whose bit L is bit 4 of
# its lane L. The scale (panels, groups, 2, 16) holds d and m of the 16 rows, float16 where
# the file's are.


def _q_values(weight: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """q (N, groups, 32) as uint8 of a row-major q4 / q5 weight."""
    n, groups = weight.shape[0], scale.shape[-1]
    nibbles = weight.view(n, groups, -1)[..., :16]
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1)
    if fmt == "q5":
        high = weight.view(n, groups, _Q5_GROUP_BYTES)[..., 16:, None]
        bits = (high >> torch.arange(8, dtype=torch.uint8, device=weight.device)) & 1
        q = q | (bits.reshape(n, groups, GROUP) << 4)
    return q


def fits_panels(weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether a repacked weight can go in panels: q4 / q5, its rows in sixteens."""
    return format_of(weight, scale)[0] in ("q4", "q5") and weight.shape[0] % PANEL_ROWS == 0


def panel_scales(scale: torch.Tensor) -> torch.Tensor:
    """A q4 / q5 weight's scales (N, 2, groups) as its panels take them: (N / 16, groups, 2,
    16), in their own dtype."""
    n, groups = scale.shape[0], scale.shape[-1]
    return scale.view(n // PANEL_ROWS, PANEL_ROWS, 2, groups).permute(0, 3, 2, 1).contiguous()


def to_panels(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A row-major q4 / q5 weight (N a multiple of 16) in panels: (weight, scale) as q4p / q5p,
    the same values, the scales in their own dtype. (The kernels' own `ggml_to_panels` lays out
    the bytes the same way, faster.)"""
    if not fits_panels(weight, scale):
        raise ValueError("only q4 / q5 weights with rows in sixteens go in panels")
    fmt, _ = format_of(weight, scale)
    n, groups = weight.shape[0], scale.shape[-1]
    panels = n // PANEL_ROWS
    q = _q_values(weight, scale, fmt).to(torch.int32)
    # (panels, 16 rows i, groups, 16 steps j, 2 e) -> (panels, groups, j, lane 2i + e)
    lanes = q.view(panels, PANEL_ROWS, groups, 16, 2).permute(0, 2, 3, 1, 4)
    lanes = lanes.reshape(panels, groups, 4, 4, 2 * PANEL_ROWS)  # (.., chunk c, nibble s, L)
    shifts = (4 * torch.arange(4, dtype=torch.int32)).view(1, 1, 1, 4, 1)
    words = ((lanes & 0x0F) << shifts).sum(dim=3).to(torch.int16)  # (panels, groups, 4, 32)
    parts = [words.reshape(panels, groups, -1).view(torch.uint8)]
    if fmt == "q5":
        bits = ((lanes >> 4) & 1).reshape(panels, groups, 16, 2 * PANEL_ROWS).to(torch.int64)
        plane = (bits << torch.arange(32, dtype=torch.int64)).sum(dim=-1).to(torch.int32)
        parts.append(plane.view(torch.uint8))
    return torch.cat(parts, dim=-1).reshape(panels, -1).contiguous(), panel_scales(scale)


def _panel_q(weight: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """q (N, groups, 32) of a weight in panels."""
    panels, groups = scale.shape[0], scale.shape[1]
    per_group = weight.view(panels, groups, _PANEL_BYTES[fmt])
    words = per_group[..., :256].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    shifts = (4 * torch.arange(4, dtype=torch.int32)).view(1, 1, 1, 4, 1)
    q = (words.view(panels, groups, 4, 1, 32) >> shifts) & 0x0F  # (.., chunk, s, L)
    q = q.reshape(panels, groups, 16, 2 * PANEL_ROWS)
    if fmt == "q5p":
        plane = per_group[..., 256:].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        q = q | (((plane[..., None] >> torch.arange(32, dtype=torch.int64)) & 1) << 4).to(q.dtype)
    # (panels, groups, j, i, e) -> (panels, i, groups, j, e)
    q = q.view(panels, groups, 16, PANEL_ROWS, 2).permute(0, 3, 1, 2, 4)
    return q.reshape(panels * PANEL_ROWS, groups, GROUP)


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The (N, K) matrix d * q + m in float32, rounded once to `dtype`."""
    fmt, group = format_of(weight, scale)
    if fmt in _PANEL_BYTES:
        q = _panel_q(weight, scale, fmt)
        dm = scale.float().permute(0, 3, 2, 1).reshape(q.shape[0], 2, -1)  # (N, 2, groups)
        return (
            torch.addcmul(dm[:, 1, :, None], dm[:, 0, :, None], q.float())
            .reshape(q.shape[0], -1)
            .to(dtype)
        )
    n, groups = weight.shape[0], scale.shape[-1]
    scale = scale.float()  # exact from float16
    if fmt == "q8":
        q = weight.view(n, groups, group).float()
        return (q * scale[:, 0, :, None]).reshape(n, -1).to(dtype)
    q = _q_values(weight, scale, fmt)  # (N, groups, 32)
    # d q is exact in float32, so adding m rounds once, as gguf's d * q + m does.
    w = torch.addcmul(scale[:, 1, :, None], scale[:, 0, :, None], q.float())
    return w.reshape(n, -1).to(dtype)


def reference_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear in float32 on the dequantized weight, rounded once to x's dtype."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), dequantize(weight, scale), b).to(x.dtype)


def embedding(
    ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Rows `ids` of the dequantized table, in `dtype`: only those rows are decoded."""
    flat = ids.reshape(-1)
    rows = dequantize(weight[flat], scale[flat], dtype)
    return rows.reshape(*ids.shape, rows.shape[-1])


def as_q8(weight: torch.Tensor, scale: torch.Tensor, group: int) -> tuple[torch.Tensor, ...] | None:
    """The same weight as q8 with groups of `group` (dividing its own), if exactly expressible:
    q4 / q5 whose m is -8 d / -16 d (Q4_0, Q5_0) and any q8. Lets shards of different types
    (Qwen's Q5_0 q/k beside a Q8_0 v) share one merged weight. None otherwise."""
    fmt, own = format_of(weight, scale)
    if own % group:
        return None
    if fmt == "q8":
        q, d = weight, scale[:, 0]
    else:
        offset = 8 if fmt == "q4" else 16
        d, m = scale[:, 0], scale[:, 1]
        if not torch.equal(m, -offset * d):
            return None
        n = weight.shape[0]
        ones = torch.ones_like(d)  # dequantize q itself: d = 1, m = -offset
        q = dequantize(weight, torch.stack([ones, -offset * ones], dim=1)).to(torch.int8)
        q = q.view(n, -1)
    d = d.repeat_interleave(own // group, dim=-1)
    return q.contiguous(), d.unsqueeze(1).contiguous()


# --- repacking GGUF blocks --------------------------------------------------------------------


def repack(
    data: np.ndarray, qtype: T, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight, scale) in a native format for GGUF tensor bytes `data` of type `qtype` and
    logical shape (N, K); None for a type with no native format (dequantize it instead)."""
    fn = _REPACK.get(qtype)
    if fn is None:
        return None
    n, k = shape
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(n, -1)
    weight, scale = fn(blocks, n)
    return torch.from_numpy(weight), torch.from_numpy(np.ascontiguousarray(scale))


def native_types() -> tuple[T, ...]:
    return tuple(_REPACK)


def _f16(b: np.ndarray) -> np.ndarray:
    """The float16 scales at bytes `b` (..., 2), in float32 (for the K-quants' products)."""
    return _half(b).astype(np.float32)


def _half(b: np.ndarray) -> np.ndarray:
    """The float16 scales at bytes `b` (..., 2), as they are."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _offset(d: np.ndarray, k: int) -> np.ndarray:
    """m = -k d: exact in float16 (k is a power of two) unless it overflows, then float32."""
    m = -k * d.astype(np.float32)
    return m.astype(np.float16) if np.abs(m).max(initial=0) <= np.finfo(np.float16).max else m


def _rows(q: np.ndarray, n: int) -> np.ndarray:
    """The quants of every block (a strided view of the file) as (N, bytes), copied once:
    reshape, then copy, would copy twice (a third of a second of Qwen2.5-0.5B's load)."""
    return np.ascontiguousarray(q).reshape(n, -1)


def _dm(d: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.stack([d, m], axis=1)  # (N, 2, groups), float32 if either is


def _q4_0(b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    b = b.reshape(n, -1, 18)
    d = _half(b[..., 0:2])
    return _rows(b[..., 2:], n), _dm(d, _offset(d, 8))


def _q4_1(b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    b = b.reshape(n, -1, 20)
    return _rows(b[..., 4:], n), _dm(_half(b[..., 0:2]), _half(b[..., 2:4]))


def _q5(b: np.ndarray, d: np.ndarray, m: np.ndarray, qh: np.ndarray, qs: np.ndarray):
    n = b.shape[0]
    return np.concatenate([qs, qh], axis=-1).reshape(n, -1), _dm(d, m)


def _q5_0(b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    b = b.reshape(n, -1, 22)
    d = _half(b[..., 0:2])
    return _q5(b, d, _offset(d, 16), b[..., 2:6], b[..., 6:])


def _q5_1(b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    b = b.reshape(n, -1, 24)
    return _q5(b, _half(b[..., 0:2]), _half(b[..., 2:4]), b[..., 4:8], b[..., 8:])


def _q8_0(b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    b = b.reshape(n, -1, 34)
    return _rows(b[..., 2:], n).view(np.int8), _half(b[..., 0:2])[:, None]


def _q4_k(b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    # 256 weights: d, dmin, 12 bytes of 6-bit (sc, min) x 8, then 4 x 32 bytes whose low / high
    # nibbles are sub-blocks 2j / 2j + 1.
    b = b.reshape(-1, 144)
    d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    sc, mn = Q4_K.get_scale_min(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(-1, 8, 32)
    packed = q[..., :16] | (q[..., 16:] << 4)
    scale = _dm((d * sc).reshape(n, -1), (-(dmin * mn)).reshape(n, -1))
    return packed.reshape(n, -1), scale


def _q6_k(b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    # 256 weights: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, d; groups of 16.
    b = b.reshape(-1, 210)
    ql, qh = b[:, :128], b[:, 128:192]
    sc, d = b[:, 192:208].view(np.int8).astype(np.float32), _f16(b[:, 208:210])[:, None]
    ql = ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(-1, 2, 4, 32)  # (blocks, half, quarter, 32)
    qh = qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = qh & 0x03
    q = (ql | (qh << 4)).astype(np.int8) - np.int8(32)
    return q.reshape(n, -1), (d * sc).reshape(n, 1, -1)


_REPACK = {
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q8_0: _q8_0,
    T.Q4_K: _q4_k,
    T.Q6_K: _q6_k,
}
