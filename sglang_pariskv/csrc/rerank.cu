// ParisKV rerank (CUDA): 3-bit estimate of <k, q> for every candidate.
//
// Same contract as sglang_pariskv/kernels/rerank.py (the Triton fallback). One thread per
// (candidate, head): it loads the record's signs, packed magnitudes and fp16 weights with
// vector loads (all independent, so many are in flight), and evaluates
//   est = ||q|| * sum_b w_b * sum_j sign_bj * a[t_bj] * q_bj
// with one shared-memory lookup per term in a per-(request, head) table (rerank_record.cuh).
// Entries at or past a row's count C get -inf, so a top-k over the whole row is valid.

#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "rerank_record.cuh"

namespace {

template <int B>
__global__ void rerank_kernel(const int32_t* __restrict__ cand, const int64_t* __restrict__ counts,
                              const uint8_t* __restrict__ signs, const uint8_t* __restrict__ mags,
                              const __half* __restrict__ weights, const float* __restrict__ qb,
                              const float* __restrict__ qn, const float* __restrict__ levels,
                              float* __restrict__ est, int64_t cmax, int H) {
  __shared__ float table[B * pariskv::kRerankTableFloats];
  const int row = blockIdx.y;
  const int r = row / H, h = row % H;
  const int64_t c = counts[r];
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float* out = est + static_cast<int64_t>(row) * cmax;
  if (static_cast<int64_t>(blockIdx.x) * blockDim.x >= c) {
    if (idx < cmax) out[idx] = -INFINITY;
    return;
  }
  pariskv::build_rerank_table<B, B>(table, qb + static_cast<int64_t>(row) * B * 8, levels,
                                  threadIdx.x, blockDim.x);
  __syncthreads();
  if (idx >= cmax) return;
  if (idx >= c) {
    out[idx] = -INFINITY;
    return;
  }
  const int64_t rec = static_cast<int64_t>(cand[static_cast<int64_t>(row) * cmax + idx]) * H + h;
  const float acc = pariskv::rerank_estimate<B>(signs, mags, weights, rec, table);
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
