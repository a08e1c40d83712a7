// The 3-bit estimate of <k, q> for one code record, shared by csrc/rerank.cu and
// csrc/select_rerank.cu (included by both; cuda_ops.py hashes included headers into the
// build cache key).
//
//   est = ||q|| * sum_b w_b * sum_j sign_bj * a[t_bj] * q_bj
// with one shared-memory lookup per term in a per-(request, head) table
//   T[b][j][sign * 8 + t] = (sign ? +1 : -1) * a[t] * q_bj   (B * 8 * 16 floats),
// whose 16 entries for one (b, j) sit in 16 distinct banks: conflict-free.
#pragma once

#include <cstdint>
#include <cuda_fp16.h>

namespace pariskv {

// Fill `table` (shared, B * 8 * 16 floats) from the row's rotated query blocks `q` (B * 8).
template <int B>
__device__ inline void build_rerank_table(float* table, const float* q, const float* levels,
                                          int tid, int nthreads) {
  for (int i = tid; i < B * 8 * 16; i += nthreads) {
    const int bj = i >> 4, e = i & 15;
    const float v = levels[e & 7] * q[bj];
    table[i] = (e & 8) ? v : -v;
  }
}

// sum_b w_b * <v_b, q_b> of pool row `rec` (= slot * Hkv + head); the caller scales by ||q||.
// Vector loads: signs B bytes, mags 3B bytes, weights 2B bytes (alignment: B, 3B and 2B
// times the row index, all multiples of 8 for B in {8, 16}).
template <int B>
__device__ inline float rerank_estimate(const uint8_t* __restrict__ signs,
                                        const uint8_t* __restrict__ mags,
                                        const __half* __restrict__ weights, int64_t rec,
                                        const float* table) {
  uint8_t s[B];
  uint8_t m[3 * B];
  __half w[B];
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
  return acc;
}

}  // namespace pariskv
