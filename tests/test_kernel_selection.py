"""Each CPU kernel is chosen from this CPU's features, and models run correctly on what was chosen.

On a CPU with AVX-512 BF16 the bf16, FP8 and GGUF kernels are the AVX-512 builds; on an AVX2-only
CPU (an AMD EPYC before Zen 4, most laptops) the GGUF GEMV is its AVX2 build and bf16 / FP8
weights go to torch. These hold on either machine, so the suite checks the dispatch wherever it
runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from thrifty import kernels
from thrifty.kernels import fp8 as fp8_kernels
from thrifty.kernels import ggml as ggml_kernels
from thrifty.kernels.build import cpu_has
from thrifty.models.layers import Linear, pack_linears
from thrifty.quant import ggml

AVX512_BF16 = cpu_has(("avx512f", "avx512bw", "avx512vl", "avx512_bf16"))
AVX2 = cpu_has(("avx2", "fma"))


def test_the_bf16_and_fp8_kernels_exist_exactly_where_the_cpu_runs_them():
    assert kernels.available() == AVX512_BF16
    assert fp8_kernels.packed_available() == cpu_has(("avx512_bf16",))


def test_the_gguf_gemv_is_built_for_the_widest_vectors_here():
    want = "thrifty_ggml_gemv" if AVX512_BF16 else "thrifty_ggml_gemv_avx2"
    assert ggml_kernels.kernel().name == want
    assert ggml_kernels.available() == (AVX512_BF16 or AVX2)
    # AVX2 has no bf16 dot products: it rounds x to int16 and multiplies integers (vpmaddwd).
    assert ggml_kernels.quantizes_x() == (not AVX512_BF16 and AVX2)
    # The GEMV pays to 8 rows on either build; AVX2 then has its int16 GEMM to 64 rows.
    assert ggml_kernels.max_rows() == 8
    assert ggml_kernels.i16_rows() == (0 if AVX512_BF16 or not AVX2 else 64)


def test_the_start_up_line_names_what_each_kernel_runs_on():
    line = kernels.prepare(lambda _: None)
    assert ggml_kernels.kernel().name + " compiled" in line
    if not AVX512_BF16:
        assert "thrifty_bf16_gemv -> torch's matmul" in line


def test_a_bf16_linear_packs_where_it_can_and_matches_torch_either_way():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(Linear(256, 96))
    model[0].weight = torch.nn.Parameter(torch.randn(96, 256, generator=g).bfloat16(), False)
    x = torch.randn(3, 256, generator=g).bfloat16()
    want = kernels.reference_linear(x, model[0].weight)
    assert pack_linears(model) == (1 if AVX512_BF16 else 0)
    assert model[0].weight.dim() == (3 if AVX512_BF16 else 2)
    torch.testing.assert_close(model(x).float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("rows", [1, 8, 9, 16, 17, 64, 65])
def test_a_gguf_linear_runs_compiled_on_this_cpu(rows):
    g = torch.Generator().manual_seed(rows)
    n, k = 40, 256
    weight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, 2, k // 32, generator=g) * 0.1
    layer = Linear(k, n)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    layer.weight_scale_inv = scale
    x = torch.randn(rows, k, generator=g)
    # Up to max_rows() the GEMV (on AVX2 x rounded to int16), then on AVX2 to i16_rows() the
    # int16 GEMM (x rounded alike), beyond the dequantizing GEMM.
    want = (
        ggml_kernels.reference_gemv(x, weight, scale)
        if rows <= max(ggml_kernels.max_rows(), ggml_kernels.i16_rows())
        else F.linear(x, ggml.dequantize(weight, scale))
    )
    torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-4)


def test_auto_dtype_is_float32_only_for_gguf_models_on_cpus_without_bf16(tmp_path):
    from thrifty import hub
    from thrifty.config import resolve_dtype

    gguf = hub.resolve("smollm2-135m-instruct", progress=False)
    assert resolve_dtype("auto", gguf, "cpu") == (torch.bfloat16 if AVX512_BF16 else torch.float32)
    assert resolve_dtype("auto", gguf, "cuda") == torch.bfloat16
    assert resolve_dtype("auto", tmp_path, "cpu") == torch.bfloat16  # a dense checkpoint
    assert resolve_dtype("bf16", gguf, "cpu") == torch.bfloat16  # what the user names, always


def test_auto_kv_cache_is_bfloat16_for_a_gguf_model_on_any_cpu():
    # --dtype auto's float32 (no AVX-512 BF16) keeps the bfloat16 cache the BF16 CPUs have; an
    # explicit float32, or a named cache dtype, is what the user asked for.
    from thrifty import LLM
    from thrifty.config import resolve_kv_cache_dtype

    f32, bf16 = torch.float32, torch.bfloat16
    assert resolve_kv_cache_dtype("auto", "auto", f32) == bf16
    assert resolve_kv_cache_dtype("auto", "auto", bf16) is None  # the activations' bfloat16
    assert resolve_kv_cache_dtype("auto", "float32", f32) is None
    assert resolve_kv_cache_dtype("float32", "auto", f32) == f32
    assert resolve_kv_cache_dtype("bf16", "float32", f32) == bf16
    llm = LLM("smollm2-135m-instruct", progress=False, kv_cache_memory_bytes=1 << 20)
    assert llm.engine.runner.kv_cache.dtype == bf16


def test_thrifty_cpu_isa_avx2_chooses_what_an_avx2_only_cpu_runs():
    """THRIFTY_CPU_ISA=avx2, in a fresh process: AVX-512 and AMX hidden from every choice (the
    GGUF and FP8 builds, the bf16 kernels, --dtype auto); a name it does not know is one line."""
    script = (
        "from thrifty import kernels; from thrifty.kernels import fp8, ggml;"
        "from thrifty.kernels.build import cpu_has;"
        "print(ggml.kernel().name, fp8.kernel().name, kernels.available(),"
        " cpu_has(('avx512f',)), cpu_has(('avx2',)))"
    )
    env = {**os.environ, "THRIFTY_CPU_ISA": "avx2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "thrifty_ggml_gemv_avx2", "thrifty_fp8_avx2", "False", "False", str(AVX2)
    ]  # fmt: skip
    env["THRIFTY_CPU_ISA"] = "avx9"
    run = [sys.executable, "-m", "thrifty", "run", "--local", "smollm2-135m-instruct", "hi"]
    out = subprocess.run(run, env=env, capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: $THRIFTY_CPU_ISA='avx9': choose native (the default) or avx2"
    ]
