// ParisKV rerank (CUDA): 3-bit estimate of <k, q> for every candidate.
//
// Same contract as sglang_pariskv/kernels/rerank.py (the Triton fallback). One thread per
// (candidate, head): it loads the record's signs, packed magnitudes and fp16 weights with
// vector loads (all independent, so many are in flight), and evaluates
//   est = ||q|| * sum_b w_b * sum_j sign_bj * a[t_bj] * q_bj
// with one shared-memory lookup per term in a per-(request, head) table
//   T[b][j][sign * 8 + t] = (sign ? +1 : -1) * a[t] * q_bj   (B * 8 * 16 floats),
// whose 16 entries for one (b, j) sit in 16 distinct banks: conflict-free.
// Entries at or past a row's count C get -inf, so a top-k over the whole row is valid.

#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

template <int B>
__global__ void rerank_kernel(const int32_t* __restrict__ cand, const int64_t* __restrict__ counts,
                              const uint8_t* __restrict__ signs, const uint8_t* __restrict__ mags,
                              const __half* __restrict__ weights, const float* __restrict__ qb,
                              const float* __restrict__ qn, const float* __restrict__ levels,
                              float* __restrict__ est, int64_t cmax, int H) {
  __shared__ float table[B * 8 * 16];
  const int row = blockIdx.y;
  const int r = row / H, h = row % H;
  const int64_t c = counts[r];
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float* out = est + static_cast<int64_t>(row) * cmax;
  if (static_cast<int64_t>(blockIdx.x) * blockDim.x >= c) {
    if (idx < cmax) out[idx] = -INFINITY;
    return;
  }
  const float* q = qb + static_cast<int64_t>(row) * B * 8;
  for (int i = threadIdx.x; i < B * 8 * 16; i += blockDim.x) {
    const int bj = i >> 4, e = i & 15;
    const float v = levels[e & 7] * q[bj];
    table[i] = (e & 8) ? v : -v;
  }
  __syncthreads();
  if (idx >= cmax) return;
  if (idx >= c) {
    out[idx] = -INFINITY;
    return;
  }
  const int64_t rec = static_cast<int64_t>(cand[static_cast<int64_t>(row) * cmax + idx]) * H + h;
  uint8_t s[B];
  uint8_t m[3 * B];
  __half w[B];
  // Vector loads: signs B bytes, mags 3B bytes, weights 2B bytes (alignment: B, 3B and
  // 2B times the row index, all multiples of 8 for B in {8, 16}).
  if constexpr (B == 16) {
    *reinterpret_cast<uint4*>(s) = *reinterpret_cast<const uint4*>(signs + rec * 16);
#pragma unroll
    for (int i = 0; i < 3; ++i)
      reinterpret_cast<uint4*>(m)[i] = reinterpret_cast<const uint4*>(mags + rec * 48)[i];
#pragma unroll
    for (int i = 0; i < 2; ++i)
      reinterpret_cast<uint4*>(w)[i] = reinterpret_cast<const uint4*>(weights + rec * 16)[i];
  } else {
    *reinterpret_cast<uint2*>(s) = *reinterpret_cast<const uint2*>(signs + rec * 8);
#pragma unroll
    for (int i = 0; i < 3; ++i)
      reinterpret_cast<uint2*>(m)[i] = reinterpret_cast<const uint2*>(mags + rec * 24)[i];
    *reinterpret_cast<uint4*>(w) = *reinterpret_cast<const uint4*>(weights + rec * 8);
  }
  float acc = 0.f;
#pragma unroll
  for (int b = 0; b < B; ++b) {
    const uint32_t word = m[3 * b] | (m[3 * b + 1] << 8) | (m[3 * b + 2] << 16);
    const uint32_t sg = s[b];
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t e = ((word >> (3 * j)) & 7u) | (((sg >> j) & 1u) << 3);
      dot += table[(b * 8 + j) * 16 + e];
    }
    acc += __half2float(w[b]) * dot;
  }
  out[idx] = acc * qn[row];
}

}  // namespace

extern "C" int pariskv_rerank(const void* cand, const void* counts, const void* signs,
                              const void* mags, const void* weights, const void* qb,
                              const void* qn, const void* levels, void* est, int64_t cmax, int R,
                              int H, int B, void* stream) {
  if (R == 0 || cmax == 0) return 0;
  const int threads = 256;
  dim3 grid(static_cast<unsigned>((cmax + threads - 1) / threads), static_cast<unsigned>(R * H));
  auto st = static_cast<cudaStream_t>(stream);
#define PARISKV_LAUNCH(BB)                                                                    \
  rerank_kernel<BB><<<grid, threads, 0, st>>>(                                                \
      static_cast<const int32_t*>(cand), static_cast<const int64_t*>(counts),                 \
      static_cast<const uint8_t*>(signs), static_cast<const uint8_t*>(mags),                  \
      static_cast<const __half*>(weights), static_cast<const float*>(qb),                     \
      static_cast<const float*>(qn), static_cast<const float*>(levels),                       \
      static_cast<float*>(est), cmax, H)
  if (B == 16) {
    PARISKV_LAUNCH(16);
  } else if (B == 8) {
    PARISKV_LAUNCH(8);
  } else {
    return -2;
  }
#undef PARISKV_LAUNCH
  return static_cast<int>(cudaGetLastError());
}
