// ParisKV collision scan (CUDA): uint8 key scores + zone score histogram.
//
// Same contract as sglang_pariskv/kernels/collision.py (the Triton fallback). Why CUDA:
// each (token, head, block) needs one lookup in a 256-entry tier table; Triton can only
// do that as a gathered global load (L1 wavefront bound, ~2 lookups/cycle/SM) or through
// tl.gather (slower still). Here the request's whole tier table ([Hkv, B, 256] bytes) sits
// in shared memory, one 256-byte column per (head, block).
//
// Block = one request, a contiguous run of `tpb` positions; the lanes take (token, head)
// pairs in one of two layouts (scan_kernel's PAIRS). The run's slots are staged in shared
// memory first (coalesced), then each lane loads its pair's B sign bytes (one 8/16-byte
// load) for UNROLL pairs at once.
// Built with plain nvcc into a shared library and called through ctypes (no torch
// headers: a few seconds to compile); the launch goes on the caller's stream, so it is
// CUDA-graph capturable.

#include <cstdint>
#include <cuda_runtime.h>

namespace {

template <int B>
struct SignRow;
template <>
struct SignRow<16> {
  using T = uint4;
  __device__ static inline uint32_t word(const T& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
  }
};
template <>
struct SignRow<8> {
  using T = uint2;
  __device__ static inline uint32_t word(const T& v, int i) { return i == 0 ? v.x : v.y; }
};

constexpr int UNROLL = 4;

// Shared memory of a scan block: the request's tier table [H, B, 256], a zeroed score
// histogram [H, nbp] and the run's KV slots [tpb]. Returns the run's length.
template <int B>
__device__ inline int stage_run(uint8_t* smem, const uint8_t* __restrict__ tiers,
                                const int32_t* __restrict__ rtt, int64_t stride_rtt, int64_t req,
                                int64_t len, int r, int64_t start, int H, int nbp, int tpb) {
  const int HB = H * B;
  int32_t* hist = reinterpret_cast<int32_t*>(smem + HB * 256);
  int32_t* slots = hist + H * nbp;
  const int n = static_cast<int>(min(start + tpb, len) - start);
  const uint4* src = reinterpret_cast<const uint4*>(tiers + static_cast<int64_t>(r) * HB * 256);
  for (int i = threadIdx.x; i < HB * 16; i += blockDim.x) reinterpret_cast<uint4*>(smem)[i] = src[i];
  for (int i = threadIdx.x; i < H * nbp; i += blockDim.x) hist[i] = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) slots[i] = rtt[req * stride_rtt + start + i];
  __syncthreads();
  return n;
}

// One key's score: the sum over its B blocks of the tier of its sign pattern, looked up in
// its head's tier column `col` ([B, 256] bytes of shared memory).
template <int B>
__device__ __forceinline__ int key_score(const typename SignRow<B>::T& v, const uint8_t* col) {
  int s = 0;
#pragma unroll
  for (int b = 0; b < B; ++b) {
    const uint32_t id = (SignRow<B>::word(v, b >> 2) >> ((b & 3) * 8)) & 0xFFu;
    s += col[b * 256 + id];
  }
  return s;
}

// Adds the block's score histogram into the request's global one.
__device__ inline void flush_hist(const int32_t* hist, int32_t* __restrict__ dst, int size) {
  __syncthreads();
  for (int i = threadIdx.x; i < size; i += blockDim.x) {
    const int c = hist[i];
    if (c) atomicAdd(&dst[i], c);
  }
}

// PAIRS = false: warp w scans head w % H for token group w / H; the 32 lanes of a lookup
// read one head's tier column (at most 2-way bank conflicts), but a lane's B-byte sign
// load is one piece of a 128-byte line. PAIRS = true: lane l of a warp takes the pair p =
// t * H + h, so one warp load covers whole sign rows of consecutive tokens (all H heads,
// H * B contiguous bytes per slot), at the price of lanes hitting H different tier
// columns. The two time the same on the H100 (32.6 vs 32.6 us per layer at 128K x 2).
template <int B, bool PAIRS>
__global__ void scan_kernel(const uint8_t* __restrict__ signs, const int32_t* __restrict__ rtt,
                            int64_t stride_rtt, const int32_t* __restrict__ req_idx,
                            const int64_t* __restrict__ seq, const int64_t* __restrict__ zend,
                            const uint8_t* __restrict__ tiers, uint8_t* __restrict__ scores,
                            int32_t* __restrict__ shist, int64_t zone_start, int64_t nmax, int H,
                            int nbp, int tpb) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int r = blockIdx.y;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * tpb;
  if (start >= seq[r]) return;
  const uint8_t* tbl = smem;
  int32_t* hist = reinterpret_cast<int32_t*>(smem + H * B * 256);
  const int32_t* slots = hist + H * nbp;
  const int n = stage_run<B>(smem, tiers, rtt, stride_rtt, req_idx[r], seq[r], r, start, H, nbp, tpb);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  const int64_t ze = zend[r];
  uint8_t* out = scores + static_cast<int64_t>(r) * H * nmax + start;
  using Row = typename SignRow<B>::T;
  // Work items: (token, head) pairs. Item p of this warp's stream is pair (t, h) with
  // PAIRS: t = p / H, h = p % H over all n * H pairs; else h fixed, t = p over n tokens.
  const int h_fixed = warp % H;
  const int total = PAIRS ? n * H : n;
  const int first = PAIRS ? warp * 32 * UNROLL : (warp / H) * 32 * UNROLL;
  const int step = PAIRS ? warps * 32 * UNROLL : (warps / H) * 32 * UNROLL;

  for (int base = first; base < total; base += step) {
    Row v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int p = base + u * 32 + lane;
      if (p < total) {
        const int t = PAIRS ? p / H : p, h = PAIRS ? p - t * H : h_fixed;
        v[u] = *reinterpret_cast<const Row*>(signs + (static_cast<int64_t>(slots[t]) * H + h) * B);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int p = base + u * 32 + lane;
      if (p < total) {
        const int t = PAIRS ? p / H : p, h = PAIRS ? p - t * H : h_fixed;
        const int s = key_score<B>(v[u], tbl + h * B * 256);
        out[static_cast<int64_t>(h) * nmax + t] = static_cast<uint8_t>(s);
        const int64_t pos = start + t;
        if (pos >= zone_start && pos < ze) atomicAdd(&hist[h * nbp + s], 1);
      }
    }
  }
  flush_hist(hist, shist + static_cast<int64_t>(r) * H * nbp, H * nbp);
}

}  // namespace

extern "C" int pariskv_collision_scan(const void* signs, const void* rtt, int64_t stride_rtt,
                                      const void* req_idx, const void* seq, const void* zend,
                                      const void* tiers, void* scores, void* shist,
                                      int64_t zone_start, int64_t nmax, int R, int H, int B,
                                      int nbp, int tpb, int warps, int pairs, void* stream) {
  if (R == 0) return 0;
  // warps: a multiple of H unless pairs (a warp then scans one head); 0 picks 8 (or H
  // when H > 8).
  if (warps <= 0) warps = (H <= 8 && 8 % H == 0) ? 8 : H;
  if ((!pairs && warps % H != 0) || warps * 32 > 1024) return -1;
  const size_t smem = static_cast<size_t>(H) * B * 256 + static_cast<size_t>(H) * nbp * 4 +
                      static_cast<size_t>(tpb) * 4;
  dim3 grid(static_cast<unsigned>((nmax + tpb - 1) / tpb), static_cast<unsigned>(R));
  dim3 block(warps * 32);
  auto st = static_cast<cudaStream_t>(stream);
  // Opt in to large shared memory once per instantiation (outside any graph capture in
  // practice: the first call is the eager warm-up).
  static bool opted[2][2] = {{false, false}, {false, false}};
#define PARISKV_LAUNCH(BB)                                                                   \
  do {                                                                                       \
    auto kernel = pairs ? scan_kernel<BB, true> : scan_kernel<BB, false>;                    \
    if (smem > 48 * 1024 && !opted[pairs != 0][BB == 16]) {                                  \
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024); \
      opted[pairs != 0][BB == 16] = true;                                                    \
    }                                                                                        \
    kernel<<<grid, block, smem, st>>>(                                                       \
        static_cast<const uint8_t*>(signs), static_cast<const int32_t*>(rtt), stride_rtt,    \
        static_cast<const int32_t*>(req_idx), static_cast<const int64_t*>(seq),              \
        static_cast<const int64_t*>(zend), static_cast<const uint8_t*>(tiers),               \
        static_cast<uint8_t*>(scores), static_cast<int32_t*>(shist), zone_start, nmax, H,    \
        nbp, tpb);                                                                           \
  } while (0)
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
