// y = x @ W^T (+ b) for bf16 x (M, K) and a bf16 W packed in panels of 16 rows, on Intel AMX:
// the prefill and large-batch matmul.
//
// The packed layout (kernels/__init__.py pack_weight: (N / 16, K / 2, 32), pair j of columns of
// panel p holding W[16p + i, 2j + e] at lane 2i + e) is exactly the layout AMX wants for its B
// operand: 16 rows of 64 bytes, each a pair of K for 16 outputs. So one B tile is 16 consecutive
// pair-rows of a panel, a contiguous 1 KB, and the weight needs no repacking for AMX. x is the
// A operand as it is: 16 rows of 32 bf16, its row stride apart.
//
// Blocking: 2 x 2 tiles of C (32 rows of x times 32 outputs, fp32) stay in tmm0-3 over the whole
// K, fed by two A tiles (tmm4-5) and two B tiles (tmm6-7): 4 tile products per 4 tile loads.
// Threads split the output panels; each keeps its pair of panels (2 x 18 KB at K = 576) in L1/L2
// while it walks down the rows of x. Rows of x past a multiple of 16 are read from a zero-padded
// copy. K must be a multiple of 32 (a whole A tile row); the Python side checks that.
//
// Compiled with -mamx-tile -mamx-bf16 -mavx512f -mavx512bf16; loaded only on CPUs with amx_bf16,
// after the kernel has asked Linux for the right to use the tile registers.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include "torch_api.h"
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kTileRows = 16;           // rows of x per A tile, outputs per panel
constexpr int kTileK = 32;              // bf16 columns of x per A tile (64 bytes)
constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an extended state component
constexpr long kXfeatureXtiledata = 18;     // the AMX tile data

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0-3: C (16 rows x 16 fp32), tmm4-5: A (16 x 32 bf16), tmm6-7: B (16 pair-rows x 32 bf16).
TileConfig make_config() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = kTileRows;
  }
  return c;
}

bool request_amx() {
  static const bool granted =
      syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}

// C tiles for rows [m0, m0 + 16 MT) of x and panels [p0, p0 + NT) of W, stored as fp32 into c
// (32 x 32, row stride 32 floats).
template <int MT, int NT>
inline void tile_block(const uint16_t* x, int64_t ldx, const uint16_t* panel0, int64_t stride,
                       int64_t K, float* c) {
  _tile_zero(0);
  if constexpr (NT > 1) _tile_zero(1);
  if constexpr (MT > 1) _tile_zero(2);
  if constexpr (MT > 1 && NT > 1) _tile_zero(3);
  const int64_t ldx_bytes = ldx * 2;
  for (int64_t k = 0; k < K; k += kTileK) {
    const uint16_t* b = panel0 + k * kTileRows;  // pair-row k / 2 of the panel
    _tile_loadd(4, x + k, ldx_bytes);
    _tile_loadd(6, b, 64);
    if constexpr (NT > 1) _tile_loadd(7, b + stride, 64);
    if constexpr (MT > 1) _tile_loadd(5, x + kTileRows * ldx + k, ldx_bytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MT > 1 && NT > 1) _tile_dpbf16ps(3, 5, 7);
  }
  constexpr int64_t ldc = 2 * kTileRows * sizeof(float);  // 32 floats a row
  _tile_stored(0, c, ldc);
  if constexpr (NT > 1) _tile_stored(1, c + kTileRows, ldc);
  if constexpr (MT > 1) _tile_stored(2, c + kTileRows * 32, ldc);
  if constexpr (MT > 1 && NT > 1) _tile_stored(3, c + kTileRows * 32 + kTileRows, ldc);
}

// y[m, n] = bf16(c[m, n] + bias[n]) for the valid rows and columns of a block.
inline void store_block(const float* c, int rows, int cols, const uint16_t* bias, uint16_t* y,
                        int64_t N) {
  for (int m = 0; m < rows; ++m) {
    for (int n = 0; n < cols; n += kTileRows) {
      __m512 v = _mm512_loadu_ps(c + m * 32 + n);
      if (bias != nullptr) {
        const __m256i b16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias + n));
        v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b16), 16)));
      }
      // Round to nearest even, as a float -> bf16 cast does.
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * N + n), (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

torch::Tensor amx_packed_linear(const torch::Tensor& x, const torch::Tensor& packed,
                                const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(request_amx(), "amx_packed_linear: Linux refused the AMX tile state");
  TORCH_CHECK_VALUE(x.device().is_cpu() && packed.device().is_cpu(),
                    "amx_packed_linear: CPU tensors only");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
                    "amx_packed_linear: x and the weight must be bfloat16");
  TORCH_CHECK_VALUE(packed.dim() == 3 && packed.size(2) == 2 * kTileRows && packed.is_contiguous(),
                    "amx_packed_linear: weight must be packed as (N / 16, K / 2, 32)");
  const int64_t N = packed.size(0) * kTileRows, K = packed.size(1) * 2;
  TORCH_CHECK_VALUE(K % kTileK == 0, "amx_packed_linear: in_features ", K,
                    " is not a multiple of 32");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "amx_packed_linear: x is ", x.sizes(),
                    " but the packed weight has in_features ", K);
  const uint16_t* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == at::kBFloat16 && bias->dim() == 1 &&
                          bias->size(0) == N && bias->is_contiguous() && bias->device().is_cpu(),
                      "amx_packed_linear: bias must be a contiguous bfloat16 vector of N");
    bp = reinterpret_cast<const uint16_t*>(bias->data_ptr());
  }
  torch::Tensor x2 = x.reshape({-1, K}).contiguous();  // (M, K)
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  torch::Tensor y = torch::empty(out_shape, x.options());
  if (M == 0 || N == 0) return y;
  const int64_t m_pad = (M + kTileRows - 1) / kTileRows * kTileRows;
  if (m_pad != M) {  // whole A tiles: the rows past M are zeros, their outputs dropped
    x2 = torch::cat({x2, torch::zeros({m_pad - M, K}, x2.options())});
  }
  const auto* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const int64_t panels = N / kTileRows, stride = K * kTileRows;  // elements per panel
  const int64_t pairs = (panels + 1) / 2;
  at::parallel_for(0, pairs, 1, [&](int64_t g0, int64_t g1) {
    const TileConfig config = make_config();
    _tile_loadconfig(&config);  // tile configuration is per thread
    alignas(64) float c[32 * 32];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t p0 = 2 * g;
      const bool two = p0 + 1 < panels;
      const uint16_t* panel = wp + p0 * stride;
      const uint16_t* b = bp == nullptr ? nullptr : bp + p0 * kTileRows;
      for (int64_t m0 = 0; m0 < m_pad; m0 += 2 * kTileRows) {
        const bool tall = m0 + kTileRows < m_pad;
        const uint16_t* xm = xp + m0 * K;
        if (tall && two) tile_block<2, 2>(xm, K, panel, stride, K, c);
        else if (tall) tile_block<2, 1>(xm, K, panel, stride, K, c);
        else if (two) tile_block<1, 2>(xm, K, panel, stride, K, c);
        else tile_block<1, 1>(xm, K, panel, stride, K, c);
        const int rows = static_cast<int>(std::min<int64_t>(2 * kTileRows, M - m0));
        if (rows > 0) store_block(c, rows, two ? 32 : 16, b, yp + m0 * N + p0 * kTileRows, N);
      }
    }
    _tile_release();
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &request_amx, "whether Linux lets this process use the AMX tiles");
  m.def("amx_packed_linear", &amx_packed_linear,
        "y = x @ W^T + bias on AMX, W bf16 packed in panels of 16 rows");
}
