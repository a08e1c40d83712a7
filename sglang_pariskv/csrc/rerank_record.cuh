// The 3-bit estimate of <k, q> for one code record, used by csrc/select_rerank.cu
// (cuda_ops.py hashes included headers into the build cache key).
//
//   est = ||q|| * sum_b w_b * sum_j sign_bj * a[t_bj] * q_bj
// with one shared-memory lookup per term in a per-(request, head) table
//   T[b][j][t] = a[t] * q_bj   (B * 8 * 8 floats; the sign flips the loaded float's sign bit).
//
// Bank layout. A record may be split over NPART threads (adjacent lanes), part p taking
// blocks [p * NB, (p + 1) * NB). At one lookup instruction every lane is at the same j, and
// the lanes of one part read the same 8-entry subtable (b, j) (equal t: the same word, a
// broadcast). Subtable (b, j) sits at b * 64 + ((j ^ part(b)) * 8), so its 8 words fall in
// bank group (j ^ part) % 4: up to four parts read four disjoint groups of 8 banks and a
// lookup is conflict-free. (A 16-entry table with the sign in the index put every part at
// one j in the same 16 banks: 4-way conflicts with four parts, 61% excess shared
// wavefronts in ncu at 128K x 2.)
#pragma once

#include <cstdint>
#include <cuda_fp16.h>

namespace pariskv {

constexpr int kRerankTableFloats = 64;  // per block b: 8 dims j x 8 levels t

// Word offset of subtable (b, j) for records split in parts of NB blocks.
template <int NB>
__device__ __forceinline__ int rerank_subtable(int b, int j) {
  return b * 64 + ((j ^ ((b / NB) & 3)) << 3);
}

// A thread's share of the row's rerank table (B * 64 floats, laid out for records split in
// parts of NB blocks): NT threads fill it, K = B * 64 / NT entries each. Loaded into
// registers first (`load`) and stored later (`store`), so that the loads travel with the
// kernel's other independent loads instead of adding their own latency to its chain.
template <int B, int NB, int NT>
struct RerankTableShare {
  static_assert((B * 64) % NT == 0 && NT % 8 == 0, "NT threads must split the table evenly");
  static constexpr int K = B * 64 / NT;
  float q[K];
  float level;  // entry t = tid % 8 of every one of the thread's entries (NT % 8 == 0)

  __device__ __forceinline__ void load(const float* __restrict__ qrow,
                                       const float* __restrict__ levels, int tid) {
    level = levels[tid & 7];
#pragma unroll
    for (int k = 0; k < K; ++k) q[k] = qrow[(tid + k * NT) >> 3];
  }
  __device__ __forceinline__ void store(float* table, int tid) const {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int i = tid + k * NT, b = i >> 6, j = (i >> 3) & 7, t = i & 7;
      table[rerank_subtable<NB>(b, j) + t] = level * q[k];
    }
  }
};

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

// Blocks b0 .. b0 + NB - 1 of pool row `rec` (= slot * Hkv + head): NB sign bytes, 3 NB
// magnitude bytes and NB fp16 weights. NB divides B and b0 is a multiple of NB, so every
// load is aligned (at multiples of NB, 3 NB and 2 NB bytes). Splitting a record over
// threads shortens each thread's chain of dependent loads and adds; loading a part apart
// from evaluating it lets a thread have several records' loads in flight at once.
template <int B, int NB>
struct alignas(16) RecordPart {
  static_assert(B % NB == 0 && NB % 4 == 0, "NB must divide B and be a multiple of 4");
  uint8_t s[NB];
  uint8_t m[3 * NB];
  __half w[NB];

  __device__ __forceinline__ void load(const uint8_t* __restrict__ signs,
                                       const uint8_t* __restrict__ mags,
                                       const __half* __restrict__ weights, int64_t rec, int b0) {
    load_bytes<NB>(s, signs + rec * B + b0);
    load_bytes<3 * NB>(m, mags + rec * 3 * B + 3 * b0);
    load_bytes<2 * NB>(reinterpret_cast<uint8_t*>(w),
                       reinterpret_cast<const uint8_t*>(weights + rec * B + b0));
  }

  // sum over the part's blocks of w_b * <v_b, q_b>; the caller scales by ||q||. `table`
  // was built with the same NB.
  __device__ __forceinline__ float estimate(const float* table, int b0) const {
    const int swz = ((b0 / NB) & 3) << 3;  // this part's subtable swizzle (rerank_subtable)
    float acc = 0.f;
#pragma unroll
    for (int bb = 0; bb < NB; ++bb) {
      const float* tb = table + (b0 + bb) * 64;
      const uint32_t word = m[3 * bb] | (m[3 * bb + 1] << 8) | (m[3 * bb + 2] << 16);
      const uint32_t neg = ~static_cast<uint32_t>(s[bb]);  // bit j set: sign_bj is -1
      float dot0 = 0.f, dot1 = 0.f;  // two chains of adds, not one
#pragma unroll
      for (int j = 0; j < 8; j += 2) {
        const float v0 = tb[((j << 3) ^ swz) + ((word >> (3 * j)) & 7u)];
        const float v1 = tb[(((j + 1) << 3) ^ swz) + ((word >> (3 * j + 3)) & 7u)];
        dot0 += __uint_as_float(__float_as_uint(v0) ^ ((neg << (31 - j)) & 0x80000000u));
        dot1 += __uint_as_float(__float_as_uint(v1) ^ ((neg << (30 - j)) & 0x80000000u));
      }
      acc += __half2float(w[bb]) * (dot0 + dot1);
    }
    return acc;
  }
};

}  // namespace pariskv
