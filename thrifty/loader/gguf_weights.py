"""A converted GGUF directory's weights, read straight from the GGUF file (mmapped).

The converted directory (thrifty/loader/gguf.py) holds config and tokenizer files and a marker
naming its GGUF file; the weights stay in that file. A tensor of a type with a native kernel
(thrifty/quant/ggml.py: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K) is repacked and kept quantized
when it is a Linear weight or the token embedding on the CPU; anything else is dequantized to the
model's dtype as before (another device, `quantization="fp8"`, a type without a kernel, norms).
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.hub import CONVERTED_MARKER
from thrifty.loader.gguf_table import check_gguf
from thrifty.models.layers import Embedding, Linear
from thrifty.quant import ggml


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the GGUF file under its HF name and shape, read only when asked."""

    name: str  # the GGUF name, for errors
    shape: torch.Size  # HF's (out, in)
    tensor_type: gguf.GGMLQuantizationType
    data: np.ndarray  # uint8 (rows, bytes per row): a view of the mmapped file
    num_heads: int | None  # llama q/k: rows to un-permute (llama.cpp's rope order)

    @property
    def native(self) -> bool:
        return self.tensor_type in ggml.native_types() and len(self.shape) == 2

    def rows(self) -> np.ndarray | None:
        """The row order that undoes llama.cpp's q/k permutation, or None."""
        if self.num_heads is None:
            return None
        from thrifty.loader.gguf import _unpermute_rope

        return _unpermute_rope(np.arange(self.shape[0])[:, None], self.num_heads)[:, 0]

    def dequantize(self) -> torch.Tensor:
        """The float32 tensor, as llama.cpp computes with it."""
        try:
            w = np.asarray(dequantize(self.data, self.tensor_type), np.float32)
        except NotImplementedError as e:
            raise ThriftyError(f"GGUF tensor {self.name}: {e}") from e
        w = w.reshape(tuple(self.shape))
        rows = self.rows()
        w = w[rows] if rows is not None else w
        return torch.from_numpy(w if w.flags.writeable else w.copy())  # F32: the file's bytes

    def narrow(self, dim: int, start: int, length: int) -> GgufTensor | None:
        """Rows (dim 0) or columns (dim 1) [start, start + length) of this tensor, as a rank
        reads its slice under tensor parallelism: only their bytes, since each row is its own
        run of blocks. None where columns would cut a block (a K-quant's 256) or the tensor is
        not a matrix: the caller cuts the dequantized whole."""
        if len(self.shape) != 2:
            return None
        n, k = self.shape
        if dim == 0:  # rows in the model's order; the un-permutation is done by picking them
            rows = self.rows()
            pick = (
                np.arange(start, start + length) if rows is None else rows[start : start + length]
            )
            data = np.ascontiguousarray(self.data[pick])
            return replace(self, shape=torch.Size((length, k)), data=data, num_heads=None)
        block, block_bytes = gguf.GGML_QUANT_SIZES[self.tensor_type]
        if start % block or length % block:
            return None
        first, last = start // block * block_bytes, (start + length) // block * block_bytes
        data = np.ascontiguousarray(self.data[:, first:last])
        return replace(self, shape=torch.Size((n, length)), data=data)

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, scale) repacked into a native format (see `native`)."""
        n, k = self.shape
        packed = ggml.repack(self.data, self.tensor_type, (n, k))
        assert packed is not None, self.name
        weight, scale = packed
        rows = self.rows()
        if rows is not None:  # whole rows move: the blocks run along K, inside a row
            index = torch.from_numpy(rows)
            weight, scale = weight[index], scale[index]
        return weight, scale


def gguf_source(model_dir: Path) -> Path | None:
    """The GGUF file a converted directory reads its weights from, or None for any other
    directory. Raises ThriftyError if that file is gone or changed since the conversion."""
    marker = model_dir / CONVERTED_MARKER
    if not marker.is_file() or any(model_dir.glob("*.safetensors")):
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or "size" not in info or "source" not in info:
        return None  # an older conversion: its weights are its own safetensors
    source = Path(info["source"])
    try:
        stat = source.stat()
    except OSError:
        raise ThriftyError(f"{model_dir}: its GGUF file {source} is gone") from None
    if (stat.st_size, stat.st_mtime_ns) != (info["size"], info.get("mtime_ns")):
        raise ThriftyError(
            f"{model_dir}: its GGUF file {source} changed since it was converted; "
            "load the .gguf file itself to convert it again"
        )
    return source


def iter_gguf_tensors(
    model_dir: Path, source: Path, *, quantized: bool
) -> Iterator[tuple[str, torch.Tensor | GgufTensor]]:
    """(HF name, tensor) for every tensor of the GGUF file. With `quantized`, the tensors of a
    type with a native kernel come as GgufTensor (the loader decides); otherwise float32."""
    from thrifty.loader.gguf import hf_tensors

    config = json.loads((model_dir / "config.json").read_text())
    raw = np.memmap(source, dtype=np.uint8, mode="r")  # the header only is read up front
    for hf_name, t in hf_tensors(check_gguf(source), raw, config):
        if quantized and t.native:
            yield hf_name, t
        else:
            yield hf_name, t.dequantize()


class GgufWeights:
    """Keeps the quantized GGUF weights aside during one `load_model` call, merges their
    shards (q/k/v, gate/up) and attaches them, with their scales, to their modules."""

    def __init__(
        self, model: nn.Module, dtype: torch.dtype, device: torch.device | str, keep: bool
    ):
        self.model, self.dtype, self.device = model, dtype, torch.device(device)
        # Native formats run on the CPU kernels (or their torch reference); elsewhere, or when
        # the weights are to be quantized to FP8, everything is dequantized.
        self.keep = keep and self.device.type in ("cpu", "meta")
        self.modules = dict(model.named_modules())
        self.shards: dict[str, dict[int | None, Future[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.scales: dict[str, torch.Tensor] = {}  # parameter name -> its group scales
        # Repacking is numpy work that releases the GIL: on worker threads it overlaps the
        # reading of the next tensors and uses every core (Qwen2.5-0.5B's 170 weights: 1.06 s
        # on one thread, 0.61 s on two, this 2-core EPYC). finish() collects the results; a
        # load that fails first drops the repacks not yet started.
        self.pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1), "thrifty-repack")
        weakref.finalize(self, self.pool.shutdown, wait=False, cancel_futures=True)

    def take_weight(
        self, target: str, shard: int | None, tensor: GgufTensor
    ) -> torch.Tensor | None:
        """Keep `tensor` (all of `target` or one shard) quantized and return None, or return
        it dequantized for the ordinary path."""
        module_name, _, attr = target.rpartition(".")
        module = self.modules.get(module_name)
        if not (self.keep and attr == "weight" and isinstance(module, Linear | Embedding)):
            return tensor.dequantize()
        if self.device.type == "meta":  # shapes only (the converter's check): nothing is read
            return torch.empty(tensor.shape, dtype=self.dtype, device="meta")
        self.shards.setdefault(target, {})[shard] = self.pool.submit(tensor.quantized)
        return None

    def finish(
        self,
        loaded: dict[str, torch.Tensor],
        pending: dict[str, list[torch.Tensor | None]],
        packed: dict[str, list],
    ) -> None:
        """Merge each weight's shards into `loaded` (incomplete sets into `pending`, for
        load_model to name); shards of different formats share q8 where that is exact, and
        are dequantized to the model's dtype where it is not."""
        shards = {t: {i: f.result() for i, f in parts.items()} for t, parts in self.shards.items()}
        self.pool.shutdown()
        for target, parts in shards.items():
            num_shards = len(packed[target.split(".")[-2]]) if None not in parts else 1
            if len(parts) != num_shards:
                got = [parts.get(i) for i in range(num_shards)]
                pending[target] = [None if p is None else p[0] for p in got]
                continue
            pairs = [parts[i] for i in sorted(parts, key=lambda i: i or 0)]
            merged = _merge(pairs)
            if merged is None:
                dense = [ggml.dequantize(w, s, self.dtype) for w, s in pairs]
                loaded[target] = torch.cat(dense).to(self.device)
                continue
            loaded[target], self.scales[target] = merged
        self.shards.clear()  # the shards merged or attached hereafter: free as they are replaced

    def attach(self) -> None:
        from thrifty.kernels import ggml as ggml_kernels  # it imports the models' layers

        half = not self.scales or ggml_kernels.takes_half_scales()
        panels = self.dtype == torch.bfloat16 and ggml_kernels.takes_panels()
        for target, scale in self.scales.items():
            module = self.modules[target.rpartition(".")[0]]
            if panels and isinstance(module, Linear) and ggml.fits_panels(module.weight, scale):
                # q4 / q5 for the kernel that takes every batch size (csrc/ggml_panels.h),
                # float16 scales kept: it widens 16 rows' at a time
                weight, scale = ggml_kernels.to_panels(module.weight.data, scale)
                module.weight = nn.Parameter(weight, requires_grad=False)
                module.weight_scale_inv = scale
                continue
            # The AVX-512 row kernels read float32 scales: widened once here, exactly.
            module.weight_scale_inv = scale if half else scale.float()
            if isinstance(module, Embedding):
                module.out_dtype = self.dtype


def _merge(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...] | None:
    if len(pairs) == 1:
        return pairs[0]
    formats = {ggml.format_of(w, s) for w, s in pairs}
    if len(formats) > 1:
        group = min(g for _, g in formats)
        converted = [ggml.as_q8(w, s, group) for w, s in pairs]
        if any(c is None for c in converted):
            return None
        pairs = converted  # type: ignore[assignment]
    scales = [s for _, s in pairs]
    if len({s.dtype for s in scales}) > 1:  # float16 beside a K-quant's float32: exact
        scales = [s.float() for s in scales]
    return torch.cat([w for w, _ in pairs]), torch.cat(scales)


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every quantized GGUF weight of `model` by its dequantization in `dtype` (the
    bf16 path, for comparison); returns how many. Tied weights stay tied."""
    from thrifty.kernels import ggml as ggml_kernels

    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        scale = getattr(module, "weight_scale_inv", None)
        if not isinstance(module, Linear | Embedding) or scale is None or scale.dim() < 3:
            continue
        w = module.weight
        if id(w) not in done:
            dense = ggml_kernels.dequantize(w.data, scale, dtype)
            done[id(w)] = nn.Parameter(dense, requires_grad=False)
        module.weight = done[id(w)]
        module.weight_scale_inv = None
    return len(done)
