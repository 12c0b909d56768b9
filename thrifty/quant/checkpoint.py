"""`thrifty quantize`: any checkpoint thrifty loads -> a Hugging Face-style FP8 checkpoint.

The output is what DeepSeek-V3 ships: each linear weight as float8_e4m3fn beside its
`<name>.weight_scale_inv` (float32, 128x128 blocks), every other tensor (embeddings, norms,
lm_head, biases) in bf16 except those the model keeps in float32 (DeepSeek's routing bias), a
config.json with `quantization_config`, and the tokenizer files copied. Which tensors are linear
weights is decided by the same rule the loader uses, on the model built without memory: MLA's
kv_b_proj, which the loader would dequantize anyway, stays in bf16.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from thrifty.config import ModelConfig
from thrifty.errors import ThriftyError
from thrifty.files import read_json_object
from thrifty.hub import CONVERTED_MARKER
from thrifty.loader.checkpoint import check_safetensors, checkpoint_files, iter_tensors
from thrifty.loader.fp8 import HIGH_PRECISION
from thrifty.models import model_class
from thrifty.models.layers import Linear
from thrifty.quant import fp8

SHARD_BYTES = 2 << 30  # start a new safetensors shard past this many bytes
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt", "*.pth", "*.gguf")


def quantize_checkpoint(
    src: Path, dst: Path, scale_fmt: str = "ue8m0", *, progress: bool = True
) -> Path:
    """Write the FP8 checkpoint of HF directory `src` into `dst` (created; must be empty)."""
    src, dst = Path(src), Path(dst)
    if scale_fmt not in fp8.SCALE_FMTS:
        raise ThriftyError(f"unknown scale format {scale_fmt!r} (choose from ue8m0, float)")
    cfg = ModelConfig.from_dir(src)
    hf = read_json_object(src / "config.json")
    if hf.get("quantization_config"):
        raise ThriftyError(f"{src} is already quantized ({hf['quantization_config']})")
    _check_destination(dst)
    with torch.device("meta"):  # the loader's view of the weights, without memory
        model = model_class(cfg)(cfg)
    linear = _linear_weight_names(model)
    keep_fp32 = tuple(getattr(model, "float32_param_suffixes", ()))
    files = checkpoint_files(src)
    num_tensors = _count_tensors(files)

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    bar = tqdm(
        total=num_tensors, desc=f"quantize ({scale_fmt})", unit="tensor", disable=not progress
    )
    for name, tensor in iter_tensors(src):
        if name in linear and tensor.dim() == 2:
            weight, scale = fp8.quantize(tensor, scale_fmt)
            out = {name: weight, name + fp8.SCALE_SUFFIX: scale}
        else:
            keep = torch.float32 if keep_fp32 and name.endswith(keep_fp32) else torch.bfloat16
            out = {name: tensor.to(keep) if tensor.is_floating_point() else tensor}
        size = sum(t.numel() * t.element_size() for t in out.values())
        if shard_bytes and shard_bytes + size > SHARD_BYTES:
            shards.append({})
            shard_bytes = 0
        shards[-1].update({k: v.contiguous() for k, v in out.items()})
        shard_bytes += size
        bar.update()
    bar.close()
    _save(shards, dst)

    hf["quantization_config"] = fp8.Fp8Config(scale_fmt).to_hf()
    hf.pop("dtype", None)
    hf["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for f in sorted(src.iterdir()):  # tokenizer, generation config, chat template, ...
        if (
            f.is_file()
            and f.name not in ("config.json", CONVERTED_MARKER)  # a converted GGUF's marker
            and not any(f.match(p) for p in WEIGHT_FILES)
        ):
            shutil.copy2(f, dst / f.name)
    for f in dst.iterdir():  # a checkpoint is not a secret: copy2 keeps a 0600 source's mode
        f.chmod(0o644)
    return dst


def _check_destination(dst: Path) -> None:
    """Create `dst` (or take it, empty) and make sure it can be written, before any work."""
    if dst.exists() and not dst.is_dir():
        raise ThriftyError(f"{dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        raise ThriftyError(f"{dst} exists and is not empty")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # under a file, a read-only file system, no permission
        raise ThriftyError(f"cannot create {dst}: {e.strerror or e}") from None
    try:
        with tempfile.TemporaryFile(dir=dst):
            pass
    except OSError as e:
        raise ThriftyError(f"cannot write to {dst}: {e.strerror or e}") from None


def _linear_weight_names(model: torch.nn.Module) -> set[str]:
    """Checkpoint names of the weights the loader runs as Linear: merged targets are split
    back into their checkpoint shards (qkv_proj -> q_proj, k_proj, v_proj)."""
    packed = model.packed_modules()
    names = set()
    for module_name, module in model.named_modules():
        target = f"{module_name}.weight"
        if not isinstance(module, Linear) or target in HIGH_PRECISION:
            continue
        short = module_name.rpartition(".")[2]
        sources = [src for src, _ in packed[short]] if short in packed else [short]
        prefix = module_name.rpartition(".")[0]
        names.update(f"{prefix}.{src}.weight" for src in sources)
    return names


def _count_tensors(files: list[Path]) -> int:
    from safetensors import safe_open

    total = 0
    for f in files:
        if f.suffix == ".safetensors":
            check_safetensors(f)
            with safe_open(f, framework="pt") as st:
                total += len(st.keys())
    return total or None  # type: ignore[return-value]


def _save(shards: list[dict[str, torch.Tensor]], dst: Path) -> None:
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], dst / "model.safetensors", metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, dst / fname, metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
