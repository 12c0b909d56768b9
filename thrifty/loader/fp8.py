"""FP8 weights while loading: a checkpoint's own (DeepSeek layout), or quantized on load.

A native FP8 checkpoint stores `<module>.weight` as float8_e4m3fn beside
`<module>.weight_scale_inv` (float32, one per 128x128 block). Those pairs are kept aside while
the other tensors load, checked (a weight holding NaN, a missing, mis-shaped, NaN or
non-positive scale is refused by name), merged where the model stacks shards (q/k/v, gate/up)
and attached to their Linear module as `weight` + `weight_scale_inv`. With `quantize` set,
every other Linear weight (not embeddings, norms, router gates or lm_head, which are not Linear
or are excluded by name) is quantized after its shards are merged.
"""

from __future__ import annotations

import torch
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.kernels import fp8 as fp8_kernels
from thrifty.models.layers import Linear
from thrifty.quant import fp8

# The output head stays in the checkpoint's precision, as in DeepSeek's checkpoints.
HIGH_PRECISION = ("lm_head.weight",)


class Fp8Weights:
    """Collects FP8 weights and their scales during one `load_model` call."""

    def __init__(
        self,
        model: nn.Module,
        checkpoint: fp8.Fp8Config | None,
        quantize: str | None,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.model = model
        self.scale_fmt = checkpoint.scale_fmt if checkpoint else "float"
        if quantize is not None and quantize not in fp8.QUANTIZATIONS:
            raise ThriftyError(
                f"unknown quantization {quantize!r} (choose from {', '.join(fp8.QUANTIZATIONS)})"
            )
        self.quantize_fmt = fp8.QUANTIZATIONS[quantize] if quantize else None
        self.keep_high = () if quantize in fp8.QUANTIZES_HEAD else HIGH_PRECISION
        self.dtype, self.device = dtype, device
        self.scales: dict[str, torch.Tensor] = {}  # weight name -> scale tensor
        self.shards: dict[str, dict[int | None, tuple[str, torch.Tensor]]] = {}
        self.attached: dict[str, torch.Tensor] = {}  # parameter name -> its block scales
        self.dense_names: set[str] = set()  # high-precision weights seen, to catch stray scales

    def take_scale(self, name: str, tensor: torch.Tensor) -> bool:
        if not name.endswith(".weight" + fp8.SCALE_SUFFIX):
            return False
        self.scales[name.removesuffix(fp8.SCALE_SUFFIX)] = tensor
        return True

    def take_weight(self, name: str, target: str, shard: int | None, tensor: torch.Tensor) -> bool:
        """Keep an FP8 tensor (a whole weight or one shard of `target`) aside; False if not FP8."""
        if tensor.dtype != fp8.FP8_DTYPE:
            self.dense_names.add(name)
            return False
        self.shards.setdefault(target, {})[shard] = (name, tensor.to(self.device))
        return True

    def finish(
        self,
        loaded: dict[str, torch.Tensor],
        pending: dict[str, list[torch.Tensor | None]],
        packed: dict[str, list],
    ) -> None:
        """Check and merge the FP8 weights into `loaded` (incomplete shard sets into `pending`,
        for load_model to report); then quantize the rest if asked."""
        for target, parts in self.shards.items():
            num_shards = len(packed[target.split(".")[-2]]) if None not in parts else 1
            if len(parts) != num_shards:
                got = [parts.get(i) for i in range(num_shards)]
                pending[target] = [None if p is None else p[1] for p in got]
                continue
            pairs = []
            for _, (name, w) in sorted(parts.items(), key=lambda kv: kv[0] or 0):
                fp8.check_weight(name, w)
                scale = fp8.check_scale(name, w, self.scales.pop(name, None))
                pairs.append((w, scale.to(self.device)))
            weight, scale = pairs[0] if len(pairs) == 1 else fp8.merge(pairs, self.scale_fmt)
            if not self._linear(target):  # an FP8 weight the model cannot run as one
                loaded[target] = fp8.dequantize(weight, scale, self.dtype)
                continue
            loaded[target] = weight
            self.attached[target] = scale
        # Scales of skipped tensors (ignored, a tied head) are dropped with them.
        stray = sorted(self.dense_names & set(self.scales))
        if stray:
            raise ThriftyError(
                f"scale tensor {stray[0] + fp8.SCALE_SUFFIX!r} belongs to a weight that is not "
                "float8_e4m3fn"
            )
        if self.quantize_fmt is None:
            return
        for target, tensor in loaded.items():
            if target in self.attached or target in self.keep_high or not self._linear(target):
                continue
            loaded[target], self.attached[target] = fp8.quantize(tensor, self.quantize_fmt)
            del tensor  # the high-precision copy goes as soon as its FP8 twin exists

    def _linear(self, target: str) -> bool:
        """Whether `target` is the weight of a Linear module that may hold FP8. Weights a model
        reads as a matrix (MLA's absorbed kv_b_proj, the router) are not Linears: they stay
        in high precision."""
        module_name, _, attr = target.rpartition(".")
        return attr == "weight" and isinstance(self.model.get_submodule(module_name), Linear)

    def attach(self) -> None:
        """Set each FP8 weight's Linear module's block scales (after the weights are set), and
        on the CPU, in a bf16 model that takes packed weights, pack the weight for the packed
        FP8 kernel (kernels/fp8.py) where its shape allows."""
        pack = (
            getattr(self.model, "packs_weights", False)
            and self.dtype == torch.bfloat16
            and torch.device(self.device).type == "cpu"
            and fp8_kernels.packed_available()
        )
        for target, scale in self.attached.items():
            module = self.model.get_submodule(target.rpartition(".")[0])
            module.weight_scale_inv = scale
            if pack and fp8_kernels.can_pack(module.weight):
                w = fp8_kernels.pack(module.weight.data)
                module.weight = nn.Parameter(w, requires_grad=False)
