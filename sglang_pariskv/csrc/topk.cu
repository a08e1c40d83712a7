// ParisKV final top-k (CUDA): the k best rerank estimates of each (request, head) row.
//
// Replaces torch.topk (several launches, ~40 us of fixed cost) with one thread-block
// cluster per row: a 3-pass radix select on order-preserving uint32 keys of the float
// estimates (11, 11 and 10 bits; shared-memory histograms, the target bin found by a
// block-wide suffix scan), then one compaction pass that writes the winners' KV slots.
//
// Why clusters: with one block per row, a decode batch has only R x Hkv blocks (16 at
// 128K x 2), so the select ran on 16 of 132 SMs, issue-latency bound (ncu: 18.7 us,
// 0.4 instructions per scheduler per cycle). A cluster of `ncl` blocks (Hopper thread
// block clusters) splits the row's keys; each block histograms its share into its own
// shared memory and, after a cluster barrier, sums the ncl histograms through
// distributed shared memory, so every block finds the same target bin. The compaction
// takes output positions from the leader block's counters (one atomic per warp). ncl = 1
// is the single-block kernel (no cluster barriers).
//
// Each thread keeps up to 16 keys in registers (rows up to 16K x ncl candidates are read
// once); longer rows re-read the rest from L2, where the rerank just wrote them. Among
// keys equal to the threshold, which ones are taken is arbitrary (set semantics; ties
// between float32 estimates are measure-zero events). Slower on an H100, so not used:
// warp-aggregated histogram atomics (__match_any_sync: 43 vs 30 us per layer at 128K x 1,
// 222 vs 146 us at 1M x 1); a value-binned one-pass select; clusters for 13K-key rows
// (2 blocks 17.8, 4 blocks 16.5 vs 16.3 us on one, in a 32-layer graph at 128K x 2).

#include <cooperative_groups.h>
#include <cstdint>
#include <cuda_runtime.h>

#include "warp_scan.cuh"
namespace cg = cooperative_groups;

namespace {

__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int THREADS = 1024;
constexpr int WARPS = THREADS / 32;

// Finds the bin holding the `need`-th largest key: every thread owns nb / THREADS adjacent
// bins, a block-wide suffix scan of their sums (warp shuffles, then the warp totals)
// tells each thread how many keys lie above its bins, and the one thread whose bins
// contain the target writes it. (A single warp walking 64 bins per lane serially was the
// slowest part of each pass.)
__device__ __forceinline__ void find_bin(const int* hist, int nb, int need, int* warp_suf,
                                         int* sel_bin, int* sel_above) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int per = nb / THREADS, base = tid * per;
  int s = 0;
  for (int j = 0; j < per; ++j) s += hist[base + j];
  // keys in this thread's bins and those of the higher lanes of its warp
  const int suf = warp_inclusive_suffix_sum(s);
  if (lane == 0) warp_suf[warp] = suf;
  __syncthreads();
  if (warp == 0) {
    const int w = warp_suf[lane];
    const int x = warp_inclusive_suffix_sum(w);  // over the warps from `lane` up
    __syncwarp();
    warp_suf[lane] = x - w;  // keys in the warps above
  }
  __syncthreads();
  const int above = warp_suf[warp] + suf - s;
  if (above < need && need <= above + s) {
    int acc = above;
    for (int j = per - 1; j >= 0; --j) {
      const int hj = hist[base + j];
      if (acc + hj >= need) {
        *sel_bin = base + j;
        *sel_above = acc;
        break;
      }
      acc += hj;
    }
  }
  __syncthreads();
}

// CACHED: keys per thread kept in registers (rows of up to CACHED x 1024 x ncl keys are
// read once). CLUSTER: launched as clusters of ncl > 1 blocks.
template <int CACHED, bool CLUSTER>
__global__ void __launch_bounds__(THREADS)
    topk_kernel(const float* __restrict__ est, const int32_t* __restrict__ cand,
                const int64_t* __restrict__ counts, int32_t* __restrict__ out, int64_t cmax,
                int k, int H) {
  __shared__ int hist[2048];    // this block's share
  __shared__ int merged[2048];  // the cluster's sum
  __shared__ int warp_suf[WARPS];
  __shared__ int sel_bin, sel_above;
  __shared__ int row_gt, row_eq;  // the leader's: output positions taken so far
  cg::cluster_group cluster = cg::this_cluster();
  const int ncl = CLUSTER ? static_cast<int>(cluster.num_blocks()) : 1;
  const int rank = CLUSTER ? static_cast<int>(cluster.block_rank()) : 0;
  const int row = blockIdx.x / ncl;
  const int c = static_cast<int>(min(counts[row / H], cmax));  // cmax < 2^31 (launcher)
  const int kk = min(k, c);
  if (kk <= 0) return;  // the whole cluster returns: the row is the cluster's
  const float* e = est + static_cast<int64_t>(row) * cmax;
  const int32_t* cd = cand + static_cast<int64_t>(row) * cmax;
  int32_t* o = out + static_cast<int64_t>(row) * k;
  const int tid = threadIdx.x;
  const int first = rank * THREADS + tid;
  const int stride = ncl * THREADS;
  // Keys i = first + j * stride (j < CACHED) live in registers; the rest are re-read.
  uint32_t kc[CACHED];
#pragma unroll
  for (int j = 0; j < CACHED; ++j) {
    const int i = first + j * stride;
    kc[j] = i < c ? order_key(e[i]) : 0u;
  }
  // Visits this thread's keys (key, index in the row): the cached ones, then the rest.
  const auto for_each_key = [&](auto&& visit) {
#pragma unroll
    for (int j = 0; j < CACHED; ++j) {
      const int i = first + j * stride;
      if (i < c) visit(kc[j], i);
    }
    for (int i = first + CACHED * stride; i < c; i += stride) visit(order_key(e[i]), i);
  };
  if (tid == 0) {
    row_gt = 0;
    row_eq = 0;
  }
  uint32_t prefix = 0, mask = 0;
  int need = kk;
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
    const int nb = pass == 2 ? 1024 : 2048;
    for (int i = tid; i < nb; i += THREADS) hist[i] = 0;
    __syncthreads();
    for_each_key([&](uint32_t key, int) {
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & (nb - 1)], 1);
    });
    const int* total = hist;
    if (CLUSTER) {
      cluster.sync();  // every block's share is complete
      for (int i = tid; i < nb; i += THREADS) {
        int s = 0;
        for (int q = 0; q < ncl; ++q) s += cluster.map_shared_rank(hist, q)[i];
        merged[i] = s;
      }
      cluster.sync();  // no block reads a share any more: the next pass may reset it
      total = merged;
    } else {
      __syncthreads();
    }
    find_bin(total, nb, need, warp_suf, &sel_bin, &sel_above);
    prefix |= static_cast<uint32_t>(sel_bin) << shift;
    mask |= static_cast<uint32_t>(nb - 1) << shift;
    need -= sel_above;
    __syncthreads();
  }
  // Compaction: keys above the threshold key `prefix` (all kk - need of them are taken),
  // then keys equal to it while the row's count of them stays below `need`. Output
  // positions come from the row's counters (the leader block's in a cluster: distributed
  // shared memory), one atomic per warp and kind (ballots), not one per key: 2048 keys
  // bumping one shared counter serialise.
  const int n_gt = kk - need;
  int* cnt_gt = CLUSTER ? cluster.map_shared_rank(&row_gt, 0) : &row_gt;
  int* cnt_eq = CLUSTER ? cluster.map_shared_rank(&row_eq, 0) : &row_eq;
  const int lane = tid & 31;
  const unsigned below = (1u << lane) - 1u;
  // Called by all 32 lanes together (`valid` false for lanes past the row's end).
  const auto emit = [&](uint32_t key, int i, bool valid) {
    const unsigned gt = __ballot_sync(0xffffffffu, valid && key > prefix);
    const unsigned eq = __ballot_sync(0xffffffffu, valid && key == prefix);
    int base_gt = 0, base_eq = 0;
    if (lane == 0) {
      if (gt) base_gt = atomicAdd(cnt_gt, __popc(gt));
      if (eq) base_eq = atomicAdd(cnt_eq, __popc(eq));
    }
    base_gt = __shfl_sync(0xffffffffu, base_gt, 0);
    base_eq = __shfl_sync(0xffffffffu, base_eq, 0);
    if ((gt >> lane) & 1) {
      o[base_gt + __popc(gt & below)] = cd[i];
    } else if ((eq >> lane) & 1) {
      const int t = base_eq + __popc(eq & below);
      if (t < need) o[n_gt + t] = cd[i];
    }
  };
#pragma unroll
  for (int j = 0; j < CACHED; ++j) {
    const int i = first + j * stride;
    emit(kc[j], i, i < c);
  }
  // The tail past the registers, in warp-uniform rounds (first - lane is the warp's base).
#pragma unroll 1  // (unrolled, ptxas spilled the cached keys: 32 registers + stack)
  for (int i0 = first - lane + CACHED * stride; i0 < c; i0 += stride) {
    const int i = i0 + lane;
    emit(i < c ? order_key(e[i]) : 0u, i, i < c);
  }
  if (CLUSTER) cluster.sync();  // the leader outlives every remote atomic
}

}  // namespace

// cluster: blocks per row (1, 2, 4 or 8: the portable cluster sizes).
extern "C" int pariskv_topk(const void* est, const void* cand, const void* counts, void* out,
                            int64_t cmax, int k, int R, int H, int cluster, void* stream) {
  if (R == 0 || k == 0) return 0;
  if (cmax >= (int64_t{1} << 31) - static_cast<int64_t>(8) * THREADS) return -3;
  if (cluster != 1 && cluster != 2 && cluster != 4 && cluster != 8) return -2;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(R * H * cluster));
  cfg.blockDim = dim3(THREADS);
  cfg.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  // Single blocks cache 16 keys per thread (64 registers, a little spill); cluster blocks
  // hold a share of the row and cache 8 (no spill).
  const cudaError_t err = cudaLaunchKernelEx(
      &cfg, cluster == 1 ? topk_kernel<16, false> : topk_kernel<8, true>, static_cast<const float*>(est), static_cast<const int32_t*>(cand),
      static_cast<const int64_t*>(counts), static_cast<int32_t*>(out), cmax, k, H);
  return static_cast<int>(err != cudaSuccess ? err : cudaGetLastError());
}
