// ParisKV query prep + tier table (CUDA): the first kernel of every decode layer.
//
// Same contract as kernels/query_tiers.py (the Triton fallback). Why CUDA: the tier rule
// ranks the 256 sign-pattern centroids of each (request, KV head, block) by their score
// against the query block, and Triton can only express that rank as a 256 x 256 masked
// reduction in registers (142 registers per thread, 12% occupancy, 18 us per layer at
// 128K x 2 on the H100 under ncu, 58 us at 128K x 8). Here the 256 centroids are sorted
// (bitonic, one per thread, mostly warp shuffles) and ranked by a scan: 256 x 36
// compare-exchanges instead of 256 x 256 comparisons. (A first version had each thread
// walk all 256 scores from shared memory: 31 us against Triton's 17 at 128K x 1.)
//
// Block = one (request, KV head, block b), 256 threads (one per centroid c):
//   1. the group mean of the KV head's G query heads (fp32), times the head's calibration
//      channel scales when `scale` is given, its norm and the unit mean;
//   2. the block's 8 rotated coordinates qv_j = sum_d rot[8b + j, d] * unit[d] (one warp
//      each), written to the prepared-query buffer the rerank reads;
//   3. s_c = sum_j (+qv_j if bit j of c else -qv_j) in float64, summed in the order
//      j = 0..7 as kernels/tiers.py does (only additions: no contraction, so the scores
//      and their ties are bit-identical to the Triton path's given the same qv);
//   4. pre_c = the keys of the centroids that beat c (higher score, or equal score and a
//      lower id), from the request's key histogram row of this (head, block): the
//      exclusive prefix of the counts in sorted order;
//   5. tier_c = how many tier thresholds exceed pre_c.
// Block b = 0 also writes the norm and zeroes the (request, head) score histogram that the
// collision scan accumulates into next, and (when `q_copy` is given) copies the KV head's
// G query heads into a contiguous [R, Hq, D] buffer: the sparse FlashInfer call needs its
// query rows as [R * Hkv, G, D], which a strided query (a view of the QKV projection) can
// only become through a copy, a separate kernel of about 2.8 us per layer in a graph.

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "warp_scan.cuh"
namespace {

constexpr int THREADS = 256;  // one per centroid
constexpr int WARPS = THREADS / 32;
constexpr int MAX_TIERS = 15;  // uint8 tiers; kernels/tiers.py has the same bound

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(THREADS)
    query_tiers_kernel(const T* __restrict__ q, int64_t stride_qr, int64_t stride_qh,
                       const float* __restrict__ scale, const float* __restrict__ rot,
                       const int32_t* __restrict__ hist,
                       const int32_t* __restrict__ req_idx, const int64_t* __restrict__ thr,
                       float* __restrict__ blocks, float* __restrict__ norm_out,
                       uint8_t* __restrict__ tiers, int32_t* __restrict__ shist,
                       T* __restrict__ q_copy, int H, int B, int G, int D, int NT, int NBP) {
  __shared__ float unit[256];
  __shared__ float red[WARPS];
  __shared__ float qv[8];
  __shared__ double score[256];
  __shared__ int ids[256];
  __shared__ int count[256];
  __shared__ int warp_total[WARPS];
  __shared__ int64_t thresholds[MAX_TIERS];

  const int pid = blockIdx.x;  // (r * H + h) * B + b
  const int b = pid % B, rh = pid / B;
  const int r = rh / H, h = rh % H;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // Independent loads first: the key-count row and the thresholds.
  const int64_t req = req_idx[r];
  count[tid] = hist[((req * H + h) * B + b) * 256 + tid];
  if (tid < NT) thresholds[tid] = thr[static_cast<int64_t>(r) * NT + tid];

  // 1. group mean and its norm (D <= 256: one coordinate per thread).
  float m = 0.f;
  if (tid < D) {
    const T* qh = q + r * stride_qr + static_cast<int64_t>(h) * G * stride_qh + tid;
    T* qc = (q_copy != nullptr && b == 0) ? q_copy + static_cast<int64_t>(rh) * G * D + tid
                                          : nullptr;
    for (int g = 0; g < G; ++g) {
      const T x = qh[g * stride_qh];
      m += to_f32(x);
      if (qc != nullptr) qc[g * D] = x;
    }
    m /= static_cast<float>(G);
    if (scale != nullptr) m *= scale[static_cast<int64_t>(h) * D + tid];
  }
  const float sq = warp_sum(m * m);
  if (lane == 0) red[warp] = sq;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) total += red[w];
  const float norm = sqrtf(total);
  if (tid < D) unit[tid] = m / fmaxf(norm, 1.1754943508222875e-38f);
  __syncthreads();

  // 2. the block's rotated coordinates: warp j computes qv_j.
  {
    const int i = b * 8 + warp;
    float acc = 0.f;
    for (int d = lane; d < D; d += 32) acc += rot[static_cast<int64_t>(i) * D + d] * unit[d];
    acc = warp_sum(acc);
    if (lane == 0) {
      qv[warp] = acc;
      blocks[static_cast<int64_t>(rh) * D + i] = acc;
    }
  }
  if (b == 0) {
    if (tid == 0) norm_out[rh] = norm;
    for (int i = tid; i < NBP; i += THREADS) shist[static_cast<int64_t>(rh) * NBP + i] = 0;
  }
  __syncthreads();

  // 3. this centroid's score, float64, j = 0..7 in order.
  double s;
  {
    const int c = tid;
    s = (c & 1) ? static_cast<double>(qv[0]) : -static_cast<double>(qv[0]);
#pragma unroll
    for (int j = 1; j < 8; ++j) {
      const double x = static_cast<double>(qv[j]);
      s = __dadd_rn(s, ((c >> j) & 1) ? x : -x);
    }
  }

  // 4. rank: a bitonic sort of the 256 (score, id, count) triples, best first (higher
  // score, then lower id: a total order), then an exclusive scan of the counts in that
  // order gives each centroid the keys of the centroids that beat it.
  int id = tid, n = count[tid];
  for (int k = 2; k <= THREADS; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      double s2;
      int id2, n2;
      if (j >= 32) {  // partner in another warp: through shared memory
        __syncthreads();
        score[tid] = s;
        ids[tid] = id;
        count[tid] = n;
        __syncthreads();
        s2 = score[tid ^ j];
        id2 = ids[tid ^ j];
        n2 = count[tid ^ j];
      } else {
        s2 = __shfl_xor_sync(0xffffffffu, s, j);
        id2 = __shfl_xor_sync(0xffffffffu, id, j);
        n2 = __shfl_xor_sync(0xffffffffu, n, j);
      }
      const bool mine_better = s > s2 || (s == s2 && id < id2);
      const bool lower = (tid & j) == 0;       // this thread holds the pair's lower slot
      const bool best_first = (tid & k) == 0;  // this run is sorted best first
      // The lower slot keeps the better of the two in a best-first run, the worse otherwise.
      if (mine_better != (lower == best_first)) {
        s = s2;
        id = id2;
        n = n2;
      }
    }
  }
  const int incl = warp_inclusive_sum(n);
  if (lane == 31) warp_total[warp] = incl;
  __syncthreads();
  int pre = incl - n;
  for (int w = 0; w < warp; ++w) pre += warp_total[w];

  // 5. the tier: thresholds above pre.
  int tier = 0;
  for (int t = 0; t < NT; ++t) tier += static_cast<int64_t>(pre) < thresholds[t];
  tiers[static_cast<int64_t>(pid) * 256 + id] = static_cast<uint8_t>(tier);
}

}  // namespace

// dtype: 0 = float32, 1 = float16, 2 = bfloat16 (the query's); scale: fp32 [H, D] or null.
extern "C" int pariskv_query_tiers(const void* q, int64_t stride_qr, int64_t stride_qh,
                                   int dtype, const void* scale, const void* rot,
                                   const void* hist,
                                   const void* req_idx, const void* thr, void* blocks,
                                   void* norm, void* tiers, void* shist, void* q_copy, int R,
                                   int H, int B, int G, int NT, int NBP, void* stream) {
  if (R == 0) return 0;
  const int D = B * 8;
  if (D > 256 || G <= 0) return -2;
  if (NT <= 0 || NT > MAX_TIERS) return -3;
  dim3 grid(static_cast<unsigned>(R * H * B));
  auto st = static_cast<cudaStream_t>(stream);
#define PARISKV_LAUNCH(TT)                                                                   \
  query_tiers_kernel<TT><<<grid, THREADS, 0, st>>>(                                          \
      static_cast<const TT*>(q), stride_qr, stride_qh, static_cast<const float*>(scale),     \
      static_cast<const float*>(rot),                                                        \
      static_cast<const int32_t*>(hist), static_cast<const int32_t*>(req_idx),               \
      static_cast<const int64_t*>(thr), static_cast<float*>(blocks),                         \
      static_cast<float*>(norm), static_cast<uint8_t*>(tiers), static_cast<int32_t*>(shist), \
      static_cast<TT*>(q_copy), H, B, G, D, NT, NBP)
  if (dtype == 0) {
    PARISKV_LAUNCH(float);
  } else if (dtype == 1) {
    PARISKV_LAUNCH(__half);
  } else if (dtype == 2) {
    PARISKV_LAUNCH(__nv_bfloat16);
  } else {
    return -4;
  }
#undef PARISKV_LAUNCH
  return static_cast<int>(cudaGetLastError());
}
