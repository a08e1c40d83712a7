// ParisKV final top-k (CUDA): the k best rerank estimates of each (request, head) row.
//
// Replaces torch.topk (several launches, ~40 us of fixed cost) with one block per row:
// a 3-pass radix select on order-preserving uint32 keys of the float estimates (11, 11
// and 10 bits; shared-memory histograms, the target bin found by a block-wide suffix
// scan), then one compaction pass that writes the winners' KV slots. Each thread keeps up
// to 16 keys in registers (rows up to 16K candidates are read once); longer rows re-read
// the rest from L2, where the rerank just wrote them. Among keys equal to
// the threshold, which ones are taken is arbitrary (set semantics; ties between float32
// estimates are measure-zero events). Tried and dropped: warp-aggregated histogram atomics
// (__match_any_sync), slower on the H100 (43 vs 30 us per layer at 128K x 1, 222 vs 146 us
// at 1M x 1, bench_kernels.py, session 6): shared-atomic contention is not what costs here.

#include <cstdint>
#include <cuda_runtime.h>

namespace {

__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int THREADS = 1024;
constexpr int WARPS = THREADS / 32;
constexpr int CACHED = 16;  // keys per thread kept in registers: rows of up to 16K read once

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
  int suf = s;  // keys in this thread's bins and those of the higher lanes of its warp
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int v = __shfl_down_sync(0xffffffffu, suf, off);
    if (lane + off < 32) suf += v;
  }
  if (lane == 0) warp_suf[warp] = suf;
  __syncthreads();
  if (warp == 0) {
    const int w = warp_suf[lane];
    int x = w;  // suffix over the warps from `lane` up
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int v = __shfl_down_sync(0xffffffffu, x, off);
      if (lane + off < 32) x += v;
    }
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

__global__ void __launch_bounds__(THREADS)
    topk_kernel(const float* __restrict__ est, const int32_t* __restrict__ cand,
                const int64_t* __restrict__ counts, int32_t* __restrict__ out, int64_t cmax,
                int k, int H) {
  __shared__ int hist[2048];
  __shared__ int warp_suf[WARPS];
  __shared__ int sel_bin, sel_above, cnt_gt, cnt_eq;
  const int row = blockIdx.x;
  const int64_t c = counts[row / H];
  const int kk = static_cast<int>(min(static_cast<int64_t>(k), c));
  if (kk <= 0) return;
  const float* e = est + static_cast<int64_t>(row) * cmax;
  const int32_t* cd = cand + static_cast<int64_t>(row) * cmax;
  int32_t* o = out + static_cast<int64_t>(row) * k;
  const int tid = threadIdx.x;
  // Keys i = tid + j * THREADS (j < CACHED) live in registers; the rest are re-read.
  uint32_t kc[CACHED];
#pragma unroll
  for (int j = 0; j < CACHED; ++j) {
    const int64_t i = tid + static_cast<int64_t>(j) * THREADS;
    kc[j] = i < c ? order_key(e[i]) : 0u;
  }
  // Visits this thread's keys (key, index in the row): the cached ones, then the rest.
  const auto for_each_key = [&](auto&& visit) {
#pragma unroll
    for (int j = 0; j < CACHED; ++j) {
      const int64_t i = tid + static_cast<int64_t>(j) * THREADS;
      if (i < c) visit(kc[j], i);
    }
    for (int64_t i = static_cast<int64_t>(CACHED) * THREADS + tid; i < c; i += THREADS)
      visit(order_key(e[i]), i);
  };
  uint32_t prefix = 0, mask = 0;
  int need = kk;
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
    const int nb = pass == 2 ? 1024 : 2048;
    for (int i = tid; i < nb; i += THREADS) hist[i] = 0;
    __syncthreads();
    for_each_key([&](uint32_t key, int64_t) {
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & (nb - 1)], 1);
    });
    __syncthreads();
    find_bin(hist, nb, need, warp_suf, &sel_bin, &sel_above);
    prefix |= static_cast<uint32_t>(sel_bin) << shift;
    mask |= static_cast<uint32_t>(nb - 1) << shift;
    need -= sel_above;
    __syncthreads();
  }
  if (tid == 0) {
    cnt_gt = 0;
    cnt_eq = 0;
  }
  __syncthreads();
  const int n_gt = kk - need;  // keys strictly above the threshold key `prefix`
  for_each_key([&](uint32_t key, int64_t i) {
    if (key > prefix) {
      o[atomicAdd(&cnt_gt, 1)] = cd[i];
    } else if (key == prefix) {
      const int t = atomicAdd(&cnt_eq, 1);
      if (t < need) o[n_gt + t] = cd[i];
    }
  });
}

}  // namespace

extern "C" int pariskv_topk(const void* est, const void* cand, const void* counts, void* out,
                            int64_t cmax, int k, int R, int H, void* stream) {
  if (R == 0 || k == 0) return 0;
  topk_kernel<<<R * H, THREADS, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const float*>(est), static_cast<const int32_t*>(cand),
      static_cast<const int64_t*>(counts), static_cast<int32_t*>(out), cmax, k, H);
  return static_cast<int>(cudaGetLastError());
}
