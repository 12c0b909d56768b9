"""Building blocks shared by the model families: linear dispatch, RMSNorm, rotary embeddings."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from thrifty import kernels
from thrifty.config import RopeConfig
from thrifty.kernels import fp8 as fp8_kernels
from thrifty.kernels import ggml as ggml_kernels


class Module(nn.Module):
    """An nn.Module whose call is its forward, without nn.Module's hook and tracing checks:
    thrifty registers no hooks, and a SmolLM2 decode step makes some 270 module calls, whose
    checks cost about 0.4 ms of a 10 ms step on a 2-core CPU. Every model module derives from
    this one."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)  # the instance's: tensor-parallel layers swap it


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W^T + b, the kernel picked from the weight's storage by `linear_kernel` (the one
    place that does; a Linear keeps what it picks).

    A bf16 weight packed for the CPU (3-d, see pack_linears) goes to the packed AVX-512 BF16
    kernel, at every batch size. An unpacked bf16 weight on the CPU times a few rows (decode)
    streams through the AVX-512 BF16 GEMV, which reads each weight byte once; everything else goes
    to torch's matmul. An FP8 weight (float8_e4m3fn) comes with its block scales (`scale`, the
    checkpoint's weight_scale_inv): W = weight * scale, per 128x128 block (thrifty/quant/fp8.py).
    A GGUF weight repacked as q4 / q5 (uint8) or q8 (int8) comes with its group scales in the same
    slot (thrifty/quant/ggml.py).
    """
    return linear_kernel(weight, bias, scale)(x)


def _dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    if (
        x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and x.numel() <= kernels.MAX_ROWS * x.shape[-1]
        and kernels.available()
    ):
        return kernels.bf16_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_kernel(
    weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`linear` for one weight with its kernel chosen once, from the weight's storage and the
    CPU's features: what a Linear calls on the hot path. Packed bf16 and GGUF weights get their
    compiled kernels bound (rows of x still pick GEMV or GEMM per call); a dense weight picks
    the bf16 GEMV or torch's matmul each call."""
    if weight.dtype == torch.float8_e4m3fn:  # checkpoint layout or packed (3-d): fp8 decides
        return fp8_kernels.linear_kernel(weight, scale, bias)
    if weight.dim() == 3:
        return kernels.packed_kernel(weight, bias)
    if weight.dtype in (torch.uint8, torch.int8):
        return ggml_kernels.linear_kernel(weight, scale, bias)
    return functools.partial(_dense_linear, weight=weight, bias=bias)


def native_linear(
    kernel: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype
) -> tuple | None:
    """A bound kernel (`linear_kernel`) as the compiled decode layer loop takes it, for
    activations of `dtype`: (capsule, weight, scale, bias, a, b) of a compiled GGUF kernel, or
    of a packed weight's (kernels.packed_kernel, in x's dtype, where AMX does not take it); a
    float32 weight kept dense under float32 x as (None, weight, None, bias, 0, 0), which the
    loop hands to torch's linear as `_dense_linear` does; None for the rest (other bf16 and FP8
    kernels, the references, a forward that all-reduces)."""
    native = getattr(kernel, "native", None)
    if native is not None:
        weight = native[1]  # a float weight (packed) must be in the activations' dtype
        return native if not weight.is_floating_point() or weight.dtype == dtype else None
    if isinstance(kernel, functools.partial) and kernel.func is _dense_linear:
        weight, bias = kernel.keywords["weight"], kernel.keywords["bias"]
        if dtype == weight.dtype == torch.float32 and weight.is_cpu:
            return (None, weight, None, bias, 0, 0)
    return None


class Linear(Module):
    """A weight (and optional bias) in the checkpoint's layout (out_features, in_features).

    Its kernel is chosen on the first forward (`linear_kernel`) and chosen again after any of
    weight, bias or weight_scale_inv is set anew (the loader packs and repacks weights).
    """

    _TENSORS = frozenset(("weight", "bias", "weight_scale_inv"))

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        # Block scales of an FP8 weight, set by the loader when the checkpoint has them.
        self.register_buffer("weight_scale_inv", None)

    def __setattr__(self, name: str, value: object) -> None:
        if name in Linear._TENSORS:
            self.__dict__.pop("_kernel", None)
        super().__setattr__(name, value)

    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True):
        self.__dict__.pop("_kernel", None)
        super().register_buffer(name, tensor, persistent)

    def _apply(self, fn, recurse=True):  # .to(), .float(): buffers are swapped in place
        self.__dict__.pop("_kernel", None)
        return super()._apply(fn, recurse)

    def _folded_bias(self) -> torch.Tensor | None:
        """The bias the kernel adds (a row-parallel layer adds it after its all-reduce)."""
        return self.bias

    def bound_kernel(self) -> Callable[[torch.Tensor], torch.Tensor]:
        kernel = self.__dict__.get("_kernel")
        if kernel is None:
            kernel = linear_kernel(self.weight, self._folded_bias(), self.weight_scale_inv)
            self.__dict__["_kernel"] = kernel
        return kernel

    def output_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What computes this layer's output, for a caller that binds it once: the bound
        kernel, or the forward an instance swapped in (a row-parallel layer's, which
        all-reduces under tensor parallelism)."""
        return self.__dict__.get("forward") or self.bound_kernel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bound_kernel()(x)


class Embedding(Module):
    """Token embeddings (vocab, hidden); also reads a weight packed for a tied head, and a
    GGUF-quantized table (its rows dequantized into `dtype`, the model's)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)
        self.register_buffer("weight_scale_inv", None)  # group scales of a GGUF table
        self.out_dtype: torch.dtype | None = None  # a GGUF table's rows: the model's dtype

    def output_dtype(self) -> torch.dtype:
        """The dtype of the rows `forward` returns: the model's activations."""
        return self.out_dtype or self.weight.dtype

    def takes_cpu_ops(self) -> bool:
        """Whether the activations this table starts can take the compiled CPU ops."""
        return cpu_ops_take_on(self.weight.is_cpu, self.output_dtype())

    def native_rows(self) -> tuple | None:
        """The table as the compiled decode step reads its rows: (capsule, weight, scale, a, b)
        of a GGUF table with its kernels built, (None, weight, None, 0, 0) of a dense one
        (torch's embedding); None for a packed table, or a forward that all-reduces."""
        if "forward" in self.__dict__ or self.weight.dim() == 3 or not self.weight.is_cpu:
            return None
        if self.weight_scale_inv is None:
            return (None, self.weight, None, 0, 0)
        return ggml_kernels.native_rows(self.weight, self.weight_scale_inv)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 3:
            return kernels.unpack_rows(self.weight, ids)
        if self.weight_scale_inv is not None:
            return ggml_kernels.embedding(ids, self.weight, self.weight_scale_inv, self.out_dtype)
        return F.embedding(ids, self.weight)


def pack_linears(model: nn.Module) -> int:
    """Lay out each bf16 CPU Linear weight for the packed kernel, once at load; returns how many.

    On Zen 4 the packed kernel matches the GEMV at one row and beats both it and oneDNN from 4
    rows up (benchmarks/kernels_bf16.py), with the same bytes. The packed panels are also AMX's
    B-tile layout, so on Intel CPUs with AMX the same weight serves prefill and batches from
    kernels.AMX_MIN_ROWS rows on the tiles (faster than oneDNN with its own prepacked copy).
    An embedding tied to a packed head shares the packed weight and reads its rows from it.
    """
    if not kernels.available():
        return 0
    packed: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, Linear) and kernels.can_pack(module.weight):
            w = module.weight
            if id(w) not in packed:
                packed[id(w)] = nn.Parameter(kernels.pack_weight(w.data), requires_grad=False)
            module.weight = packed[id(w)]
    for module in model.modules():
        if isinstance(module, Embedding) and id(module.weight) in packed:
            module.weight = packed[id(module.weight)]
    return len(packed)


class RMSNorm(Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm(x); or, given the residual stream, (RMSNorm(residual + x), residual + x) with
        the residual updated in place (the add before each norm of a pre-norm transformer)."""
        # On the CPU torch's rms_norm is six ops; the compiled one is a single pass.
        compiled = cpu_ops_take(x)
        if residual is None:
            if compiled:
                return kernels.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        if compiled and residual.is_contiguous():
            return kernels.add_rms_norm(x, residual, self.weight, self.eps), residual
        residual = residual + x
        return F.rms_norm(residual, (x.shape[-1],), self.weight, self.eps), residual


def cpu_ops_take(x: torch.Tensor) -> bool:
    """Whether the compiled CPU ops (csrc/cpu_ops.cpp: norms, rope, SiLU, the KV store and
    decode attention) take x: float32 or bfloat16 on the CPU, with the ops built."""
    # x.is_cpu, not x.device.type: that builds a device object, 0.5 us a call
    return cpu_ops_take_on(x.is_cpu, x.dtype)


def cpu_ops_take_on(is_cpu: bool, dtype: torch.dtype) -> bool:
    """`cpu_ops_take` for activations of `dtype`, on the CPU or not."""
    return is_cpu and dtype in (torch.float32, torch.bfloat16) and kernels.cpu_ops_available()


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] on the last dim: the SwiGLU of the MLPs."""
    if cpu_ops_take(x):
        return kernels.silu_and_mul(x)  # one pass instead of chunk, silu, mul
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inv_freq(rope: RopeConfig, rotary_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rotary_dim / 2,) and the cos/sin scale for each rope type."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.type == "default":
        return inv_freq, 1.0
    if rope.type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        original = rope.original_max_position_embeddings
        low_wavelen = original / rope.low_freq_factor
        high_wavelen = original / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (original / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled), 1.0
    if rope.type == "yarn":
        return _yarn_inv_freq(rope, rotary_dim, inv_freq)
    raise ValueError(f"unknown rope type {rope.type}")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(
    rope: RopeConfig, dim: int, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, float]:
    # YaRN (Peng et al. 2023, arXiv:2309.00071): interpolate the low frequencies by `factor`,
    # extrapolate the high ones, ramp linearly between the dims that turn beta_fast / beta_slow
    # times over the original context.
    original = rope.original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (inv_freq / rope.factor) * (1 - extrapolate) + inv_freq * extrapolate
    if rope.attention_factor is not None:
        scale = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        scale = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(
            rope.factor, rope.mscale_all_dim
        )
    else:
        scale = yarn_mscale(rope.factor)
    return inv_freq, scale


class RotaryEmbedding(Module):
    """Rotary position embedding in the rotate-half (GPT-NeoX) layout, from a cos/sin table.

    The table covers positions [0, max_positions). Made on the meta device (the loader builds
    models there) it takes no memory: `build` then sizes it for the context actually served, not
    for the checkpoint's claimed max_position_embeddings.
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int):
        super().__init__()
        self.rope = rope
        self.rotary_dim = int(head_dim * rope.partial_rotary_factor)
        self.build(max_positions, torch.get_default_device())

    def build(self, max_positions: int, device: torch.device | str = "cpu") -> None:
        """Make the cos/sin table for positions [0, max_positions) on `device`."""
        if torch.device(device).type == "meta":
            cos = sin = torch.empty(max_positions, self.rotary_dim // 2, device="meta")
        else:
            with torch.device("cpu"):
                inv_freq, scale = rope_inv_freq(self.rope, self.rotary_dim)
                t = torch.arange(max_positions, dtype=torch.float32)
                freqs = torch.outer(t, inv_freq)  # (P, rotary_dim / 2)
                cos, sin = freqs.cos() * scale, freqs.sin() * scale
        self.register_buffer("cos", cos.to(device), persistent=False)
        self.register_buffer("sin", sin.to(device), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The angles of `positions` (N,), looked up once per forward for every layer."""
        cos = self.cos[positions].unsqueeze(1).to(dtype)  # (N, 1, rotary_dim / 2)
        sin = self.sin[positions].unsqueeze(1).to(dtype)
        return cos, sin

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x of shape (N, heads, head_dim) by angles from `cos_sin`."""
        if x.dim() == 3 and x.stride(-1) == 1 and cpu_ops_take(x):
            return kernels.rope(x, cos, sin)  # one pass instead of a dozen ops
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return torch.cat((out, rest), dim=-1) if rest.numel() else out
