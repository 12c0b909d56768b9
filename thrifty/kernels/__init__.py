"""CPU fast paths, compiled on first use, each with the pure-torch reference its tests hold it to.

`bf16_linear` is the decode-time matmul: bf16 activations with a few rows times a bf16 weight,
streamed once from memory with AVX-512 BF16 dot products (csrc/bf16_gemv.cpp). The extensions
are built by torch.utils.cpp_extension (needs a C++ compiler and ninja) once per install
(kernels/build.py); where the CPU lacks avx512_bf16 or the build fails (a warning says so),
`available()` is False and `bf16_linear` falls back to `F.linear`. `prepare()` builds them all
up front, as `thrifty serve` does before it reports ready.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from thrifty.errors import ThriftyError
from thrifty.kernels.build import CSRC, Kernel, compile_extension, isa_capped

# Up to this many rows of x (tokens in the step), bf16_linear beats or matches torch's CPU bf16
# matmul (benchmarks/kernels_bf16.py, and batch-32 decode end to end); beyond it oneDNN wins.
MAX_ROWS = 32

_SOURCE = CSRC / "bf16_gemv.cpp"
_CFLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp")


def reference_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear in float32 on the same bf16 inputs, rounded once to x's dtype."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), b).to(x.dtype)


def available() -> bool:
    """Whether the compiled bf16 kernel is loaded (builds it on the first call)."""
    return _extension() is not None


def bf16_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ weight^T + bias for bf16 x (..., in) and a contiguous bf16 weight (out, in).

    Fast for few rows of x (up to MAX_ROWS); correct for any. x need not be contiguous (it is
    copied); a non-contiguous weight or a bias that is not a bf16 vector raises ValueError.
    """
    ext = _extension()
    if ext is None:
        return F.linear(x, weight, bias)
    return ext.bf16_linear(x, weight, bias)


def _cpu_has_avx512_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return not isa_capped() and bool(check and check())


def _cpu_has_amx() -> bool:
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return not isa_capped() and bool(check and check())


def _build(
    name: str = "thrifty_bf16_gemv", source: Path = _SOURCE, cflags: tuple[str, ...] = _CFLAGS
) -> ModuleType:
    """Build and import one extension, raising what the build raises (for tests)."""
    return compile_extension(name, source, list(cflags))


def _native_cflags() -> tuple[str, ...]:
    """-march=native (built where it runs), less AVX-512 under THRIFTY_CPU_ISA=avx2 (a value it
    does not know is left to the kernel choice to refuse)."""
    try:
        capped = isa_capped()
    except ThriftyError:
        capped = False
    return ("-march=native", "-mno-avx512f") if capped else ("-march=native",)


# Reassociation lets gcc vectorise the float reductions.
_ATTENTION_CFLAGS = (
    "-O3",
    *_native_cflags(),
    "-fopenmp",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
)
BF16 = Kernel("thrifty_bf16_gemv", _SOURCE, _CFLAGS, "torch's matmul", _cpu_has_avx512_bf16)
AMX = Kernel(
    "thrifty_amx_gemm",
    CSRC / "amx_gemm.cpp",
    ("-O3", "-mamx-tile", "-mamx-bf16", *_CFLAGS[1:]),
    "the bf16 GEMV (or torch's matmul without it) at every batch size",
    lambda: _cpu_has_avx512_bf16() and _cpu_has_amx(),
)
CPU_OPS = Kernel(
    "thrifty_cpu_ops", CSRC / "cpu_ops.cpp", _ATTENTION_CFLAGS, "torch's attention and norm ops"
)
SAMPLING = Kernel("thrifty_sampling", CSRC / "sampling.cpp", _ATTENTION_CFLAGS, "torch's sampler")


def _all_kernels() -> tuple[Kernel, ...]:
    from thrifty.kernels import fp8, ggml  # they import this module

    return (BF16, AMX, CPU_OPS, SAMPLING, fp8.kernel(), ggml.kernel())


def prepare(announce: Callable[[str], None]) -> str:
    """Build (or load) every CPU kernel now rather than on first use, so that a server is fast
    from its first request; `announce` gets one line before each build that compiles. Returns
    a line saying what each runs on.

    The builds run side by side, one per core: each is one translation unit (one compiler
    process), so a fresh install of four kernels on two cores takes two builds' time.
    """
    chosen = _all_kernels()
    with ThreadPoolExecutor(max_workers=max(1, min(len(chosen), os.cpu_count() or 1))) as pool:
        loaded = list(pool.map(lambda kernel: kernel.load(announce), chosen))
    parts = [
        f"{kernel.name} {'compiled' if module is not None else '-> ' + kernel.fallback}"
        for kernel, module in zip(chosen, loaded, strict=True)
    ]
    return "thrifty: CPU kernels: " + ", ".join(parts)


def _extension() -> ModuleType | None:
    return BF16.load()


def _cpu_ops() -> ModuleType | None:
    return CPU_OPS.load()


def cpu_ops() -> ModuleType:
    """The compiled CPU ops module itself, for a hot loop that calls its functions directly (the
    wrappers below look it up on every call); only where cpu_ops_available()."""
    ext = _cpu_ops()
    assert ext is not None, "the compiled CPU ops are not built"
    return ext


def cpu_ops_available() -> bool:
    """Whether the compiled decode-attention and RMSNorm ops are loaded (built on first call)."""
    return _cpu_ops() is not None


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query per sequence over the paged cache, read through the block table
    (a bfloat16 cache under float32 q too: takes_cache).

    q: (B, H, D); caches: (num_blocks, block_size, Hkv, D); block_tables: (B, max_blocks) int64;
    context_lens: (B,) int64. Returns (B, H * D).
    """
    return _cpu_ops().paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def reference_paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Pure torch, float32, one sequence at a time: what the kernel is held to."""
    outs = []
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        pos = torch.arange(n)
        slots = block_tables[b, pos // block_size] * block_size + pos % block_size
        k = k_cache.flatten(0, 1)[slots].float().transpose(0, 1)  # (Hkv, T, D)
        v = v_cache.flatten(0, 1)[slots].float().transpose(0, 1)
        qb = q[b].float().view(hkv, -1, q.shape[-1])  # (Hkv, G, D)
        p = (qb @ k.transpose(1, 2) * scale).softmax(-1)
        outs.append((p @ v).reshape(-1))
    return torch.stack(outs).to(q.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (float32 inside), compiled: one call instead of six ops."""
    return _cpu_ops().rms_norm(x, weight, eps)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """residual += x (in place), then RMSNorm(residual): the residual stream's add and the next
    norm in one pass over the row, compiled."""
    return _cpu_ops().add_rms_norm(x, residual, weight, eps)


def reference_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    residual.add_(x)
    return reference_rms_norm(residual, weight, eps)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k, v (N, Hkv, D) into the caches at flat slots slot_mapping (N,) int64, rounded to
    the caches' dtype where it differs (takes_cache)."""
    _cpu_ops().store_kv(k, v, k_cache, v_cache, slot_mapping)


def reference_store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """store_kv in torch ops: k, v rounded to the caches' dtype where it differs."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def takes_cache(x_dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
    """Whether the compiled attention ops (the decode kernel, store_kv, rope_store_kv) take
    activations of x_dtype over a KV cache of cache_dtype: float32 or bfloat16 for both, or a
    bfloat16 cache under float32 activations."""
    pair = (x_dtype, cache_dtype)
    return pair in ((torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float32, torch.bfloat16))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of x (N, H, D) by cos, sin (N, 1, rotary_dim / 2) in x's
    dtype: one pass in float32, rounded once, into a new contiguous tensor."""
    return _cpu_ops().rope(x, cos, sin)


def reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = cos.shape[-1]
    xf, c, s = x.float(), cos.float(), sin.float()
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, rest), dim=-1).to(x.dtype)


def rope_store_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """From the fused projection qkv (N, (H + 2 Hkv) D): rotate q and k, write k and v into
    their cache slots (in the caches' dtype: takes_cache), return q (N, H, D); one pass instead
    of slicing, rope and the store."""
    return _cpu_ops().rope_store_kv(
        qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads
    )


def reference_rope_store_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    n, h, hkv = qkv.shape[0], num_heads, num_kv_heads
    d = qkv.shape[1] // (h + 2 * hkv)
    qk = reference_rope(qkv[:, : (h + hkv) * d].reshape(n, h + hkv, d), cos, sin)
    reference_store_kv(qk[:, h:], qkv[:, (h + hkv) * d :].reshape(n, hkv, d), k_cache, v_cache,
                       slot_mapping)  # fmt: skip
    return qk[:, :h]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] on the last dim, float32 inside, rounded once."""
    return _cpu_ops().silu_and_mul(x)


def reference_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of float32 (B, V) logits (first index on ties), as torch.argmax(-1)."""
    return _cpu_ops().argmax_rows(logits)


def _sampling_ops() -> ModuleType | None:
    return SAMPLING.load()


def sampling_available() -> bool:
    """Whether the compiled sampler (csrc/sampling.cpp) is loaded (built on first call)."""
    return _sampling_ops() is not None


# Tokens whose tempered probability is at least this are the ones the sampling kernel sorts
# first; a row whose top-k or top-p set reaches below them is decided again with more.
SAMPLING_MIN_PROB = 2.0**-12


@dataclass(frozen=True)
class SampledRows:
    tokens: torch.Tensor  # (B,) int64
    lse: torch.Tensor  # (B,) float32 logsumexp of each row at temperature 1 (logprob = x - lse)
    top_ids: torch.Tensor  # (B, K) int64, K = the most logprobs a row asked for
    top_logprobs: torch.Tensor  # (B, K) float32, descending; -inf past a row's own count


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    greedy: torch.Tensor,
    uniform: torch.Tensor,
    num_logprobs: torch.Tensor,
    min_prob: float = SAMPLING_MIN_PROB,
) -> SampledRows:
    """One token per row of float32 (B, V) logits (csrc/sampling.cpp), each row with its own
    temperature, top-k (V: off), top-p, min-p (0: off), greedy flag, uniform draw in [0, 1) and
    number of top logprobs (-1: none). Held to `reference_sample_rows`."""
    return SampledRows(
        *_sampling_ops().sample_rows(
            logits, temperature, top_k, top_p, min_p, greedy, uniform, num_logprobs, min_prob
        )
    )


def reference_sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    greedy: torch.Tensor,
    uniform: torch.Tensor,
    num_logprobs: torch.Tensor,
) -> SampledRows:
    """The kernel's contract in float64 torch, a row at a time, over the whole vocabulary: the
    kept set of top_k_top_p_min_p (min-p, top-k, then top-p renormalized over what they left),
    drawn by inverse CDF with the row's uniform over the kept tokens in descending order (ties:
    lower id first), or in id order where neither top-k nor top-p truncates the row."""
    batch, vocab = logits.shape
    k_max = max(int(num_logprobs.max()), 0) if batch else 0
    tokens = torch.empty(batch, dtype=torch.long)
    top_ids = torch.zeros(batch, k_max, dtype=torch.long)
    top_lp = torch.full((batch, k_max), float("-inf"))
    lse = logits.double().logsumexp(dim=-1)
    for b in range(batch):
        x = logits[b].double()
        k = min(int(num_logprobs[b]), vocab)
        if k > 0:  # ties: the lower id first
            values, ids = x.sort(descending=True, stable=True)
            values, ids = values[:k], ids[:k]
            top_ids[b, :k], top_lp[b, :k] = ids, (values - lse[b]).float()
        if greedy[b]:
            tokens[b] = int(x.argmax())
            continue
        p = ((x - x.max()) / float(temperature[b])).exp()
        keep = p >= float(min_p[b]) if float(min_p[b]) > 0 else torch.ones_like(p, dtype=torch.bool)
        truncated = int(top_k[b]) < vocab or float(top_p[b]) < 1
        if not truncated:
            order = torch.arange(vocab)[keep]
        else:
            order = torch.tensor(sorted(range(vocab), key=lambda i: (-float(x[i]), i)))
            order = order[keep[order]][: int(top_k[b])]
            mass = p[order] / p[order].sum()
            before = mass.cumsum(0) - mass
            order = order[before < float(top_p[b])]
        cdf = p[order].cumsum(0)
        tokens[b] = order[
            min(
                int(torch.searchsorted(cdf, float(uniform[b]) * cdf[-1], right=True)),
                len(order) - 1,
            )
        ]
    return SampledRows(tokens, lse.float(), top_ids, top_lp)


# Packed weights: W (N, K) -> panels of 16 output rows, each column (for bf16, each pair of
# columns interleaved) holding the panel's 16 values side by side: (N / 16, K / 2, 32) for bf16,
# (N / 16, K, 16) for float32. The layout AVX-512 dot products and FMAs want (csrc/bf16_gemv.cpp).
PANEL_ROWS = 16
_PANEL_COLS = {torch.bfloat16: 2, torch.float32: 1}  # columns of x per step of the kernel


def can_pack(weight: torch.Tensor) -> bool:
    """Whether this weight can take the packed layout."""
    cols = _PANEL_COLS.get(weight.dtype)
    if cols is None or weight.dim() != 2 or weight.device.type != "cpu":
        return False
    n, k = weight.shape
    return n > 0 and k > 0 and n % PANEL_ROWS == 0 and k % cols == 0


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N / 16, K / c, 16 c), c = 2 for bf16, 1 for float32; see can_pack."""
    n, k = weight.shape
    c = _PANEL_COLS[weight.dtype]
    panels = weight.reshape(n // PANEL_ROWS, PANEL_ROWS, k // c, c).permute(0, 2, 1, 3)
    return panels.contiguous().view(n // PANEL_ROWS, k // c, c * PANEL_ROWS)


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_weight."""
    p, steps, width = packed.shape
    c = width // PANEL_ROWS
    panels = packed.view(p, steps, PANEL_ROWS, c).permute(0, 2, 1, 3)
    return panels.reshape(p * PANEL_ROWS, steps * c)


def unpack_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (any shape of int64) of the unpacked weight: embeddings tied to a packed head."""
    p, steps, width = packed.shape
    c = width // PANEL_ROWS
    flat = rows.reshape(-1)
    out = packed.view(p, steps, PANEL_ROWS, c)[flat // PANEL_ROWS, :, flat % PANEL_ROWS]
    return out.reshape(*rows.shape, steps * c)  # out: (T, K / c, c)


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ W^T + bias for x (..., K) in the weight's dtype and W packed by pack_weight."""
    return packed_kernel(packed, bias)(x)


def packed_kernel(
    packed: torch.Tensor, bias: torch.Tensor | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """packed_linear for one weight, its kernels looked up once (the decode step calls it a
    hundred times a token).

    From AMX_MIN_ROWS rows of x a bf16 weight goes to the AMX tiles where the CPU has them
    (csrc/amx_gemm.cpp reads the same packed layout); fewer rows stream through AVX-512 BF16.
    """
    ext = _extension()
    gemv = ext.packed_linear
    amx = _amx() if packed.dtype == torch.bfloat16 and packed.shape[1] % 16 == 0 else None
    if amx is None:

        def run_gemv(x: torch.Tensor) -> torch.Tensor:
            return gemv(x, packed, bias)

        # what the decode step's compiled layer loop calls (layers.native_linear)
        run_gemv.native = (ext.linear_capsule, packed, None, bias, 0, 0)  # type: ignore[attr-defined]
        return run_gemv
    gemm, min_numel = amx.amx_packed_linear, AMX_MIN_ROWS * packed.shape[1] * 2

    def run(x: torch.Tensor) -> torch.Tensor:
        return (gemm if x.numel() >= min_numel else gemv)(x, packed, bias)

    return run


# From this many rows of x the AMX kernel beats the AVX-512 BF16 one on a 2-core Sapphire
# Rapids-class Xeon (benchmarks/kernels_bf16.py; one AMX tile is 16 rows, so below that the
# tile's padding is paid for).
AMX_MIN_ROWS = 8


def amx_available() -> bool:
    """Whether the AMX kernel is loaded and Linux granted this process the tile state."""
    return _amx() is not None


@functools.cache
def _amx() -> ModuleType | None:
    ext = AMX.load()
    return ext if ext is not None and ext.available() else None
