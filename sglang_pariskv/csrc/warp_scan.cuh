// Warp-wide prefix sums over the 32 lanes (shuffles, no shared memory), shared by
// csrc/select_rerank.cu and csrc/topk.cu (cuda_ops.py hashes
// included headers into the build cache key). The whole warp must call them.
#pragma once

// x summed over lanes 0 .. lane.
__device__ __forceinline__ int warp_inclusive_sum(int x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  return x;
}

// x summed over lanes lane .. 31.
__device__ __forceinline__ int warp_inclusive_suffix_sum(int x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_down_sync(0xffffffffu, x, off);
    if (lane + off < 32) x += y;
  }
  return x;
}
