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

// Copies N bytes from `src` (aligned to the widest vector dividing N) to `dst`.
template <int N>
__device__ __forceinline__ void load_bytes(uint8_t* dst, const uint8_t* __restrict__ src) {
  if constexpr (N % 16 == 0) {
#pragma unroll
    for (int i = 0; i < N / 16; ++i)
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
  } else if constexpr (N % 8 == 0) {
#pragma unroll
    for (int i = 0; i < N / 8; ++i)
      reinterpret_cast<uint2*>(dst)[i] = reinterpret_cast<const uint2*>(src)[i];
  } else {
#pragma unroll
    for (int i = 0; i < N / 4; ++i)
      reinterpret_cast<uint32_t*>(dst)[i] = reinterpret_cast<const uint32_t*>(src)[i];
  }
}

// sum over blocks b0 .. b0 + NB - 1 of w_b * <v_b, q_b> of pool row `rec` (= slot * Hkv +
// head); the caller scales by ||q||. NB divides B and b0 is a multiple of NB, so every
// load is aligned (signs NB bytes, mags 3 NB bytes, weights 2 NB bytes per part, at
// multiples of those sizes). Splitting a record over threads shortens each thread's
// chain of dependent loads and adds.
template <int B, int NB>
__device__ inline float rerank_partial(const uint8_t* __restrict__ signs,
                                       const uint8_t* __restrict__ mags,
                                       const __half* __restrict__ weights, int64_t rec,
                                       const float* table, int b0) {
  static_assert(B % NB == 0 && NB % 4 == 0, "NB must divide B and be a multiple of 4");
  uint8_t s[NB];
  uint8_t m[3 * NB];
  __half w[NB];
  load_bytes<NB>(s, signs + rec * B + b0);
  load_bytes<3 * NB>(m, mags + rec * 3 * B + 3 * b0);
  load_bytes<2 * NB>(reinterpret_cast<uint8_t*>(w),
                     reinterpret_cast<const uint8_t*>(weights + rec * B + b0));
  float acc = 0.f;
#pragma unroll
  for (int bb = 0; bb < NB; ++bb) {
    const int b = b0 + bb;
    const uint32_t word = m[3 * bb] | (m[3 * bb + 1] << 8) | (m[3 * bb + 2] << 16);
    const uint32_t sg = s[bb];
    float dot0 = 0.f, dot1 = 0.f;  // two chains of adds, not one
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
      const uint32_t e0 = ((word >> (3 * j)) & 7u) | (((sg >> j) & 1u) << 3);
      const uint32_t e1 = ((word >> (3 * j + 3)) & 7u) | (((sg >> (j + 1)) & 1u) << 3);
      dot0 += table[(b * 8 + j) * 16 + e0];
      dot1 += table[(b * 8 + j + 1) * 16 + e1];
    }
    acc += __half2float(w[bb]) * (dot0 + dot1);
  }
  return acc;
}

// The whole record: sum_b w_b * <v_b, q_b>.
template <int B>
__device__ inline float rerank_estimate(const uint8_t* __restrict__ signs,
                                        const uint8_t* __restrict__ mags,
                                        const __half* __restrict__ weights, int64_t rec,
                                        const float* table) {
  return rerank_partial<B, B>(signs, mags, weights, rec, table, 0);
}

}  // namespace pariskv
