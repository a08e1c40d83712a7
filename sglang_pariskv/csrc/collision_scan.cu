// ParisKV collision scan (CUDA): uint8 key scores + zone score histogram.
//
// Same contract as sglang_pariskv/kernels/collision.py (the Triton fallback). Why CUDA:
// each (token, head, block) needs one lookup in a 256-entry tier table; Triton can only
// do that as a gathered global load (L1 wavefront bound, ~2 lookups/cycle/SM) or through
// tl.gather (slower still). Here the request's whole tier table ([Hkv, B, 256] bytes) sits
// in shared memory, one 256-byte column per (head, block).
//
// Block = one request, a contiguous run of `tpb` positions; the lanes take (token, head)
// pairs in one of two layouts (scan_kernel's PAIRS), UNROLL pairs per lane per round,
// each one 8/16-byte load of the pair's B sign bytes. The kernel issues few instructions
// per key, because it is issue- and latency-bound, not bandwidth-bound: ncu on session
// 9's kernel counted 230 instructions per key (an integer division by H three times per
// pair, the column address rebuilt for every lookup) at 37% of DRAM bandwidth. Here a
// lane's (token, head) advances by additions, a lookup is a byte permute, an add and a
// shared load, and the tier table is copied with cp.async while the first signs load.
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

// 16 bytes global -> shared without a register round trip (cp.async, sm_80+), so a
// thread's sign loads can issue while its share of the tier table is still in flight.
__device__ __forceinline__ void copy16_async(void* dst, const void* src) {
#if __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}
__device__ __forceinline__ void copy_async_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::);
#endif
}

// One key's score: the sum over its B blocks of the tier of its sign pattern, looked up in
// its head's B columns starting at `col` (byte b of the sign row picks column b's entry).
template <int B>
__device__ __forceinline__ int key_score(const typename SignRow<B>::T& v, const uint8_t* col) {
  int s = 0;
#pragma unroll
  for (int b = 0; b < B; ++b) {
    const uint32_t id = __byte_perm(SignRow<B>::word(v, b >> 2), 0u, 0x4440u | (b & 3));
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

// A lane's current (token, head) pair, advanced by additions only. PAIRS = false: warp w
// scans head w % H for token group w / H; the 32 lanes of a lookup read one head's tier
// column (at most 2-way bank conflicts), but a lane's B-byte sign load is one piece of a
// 128-byte line. PAIRS = true: item p = t * H + h, lane l of a warp takes item base + l,
// so one warp load covers whole sign rows of consecutive tokens (all H heads, H * B
// contiguous bytes per slot), at the price of lanes hitting H different tier columns.
template <bool PAIRS>
struct Pair {
  int t, h;
  // Item p's pair (the one division, at the start).
  __device__ void set(int p, int H, int h_fixed) {
    t = PAIRS ? p / H : p;
    h = PAIRS ? p - t * H : h_fixed;
  }
  // The pair of item p + d, where d = dq * H + dr (0 <= dr < H) for PAIRS, d = dq if not.
  __device__ __forceinline__ Pair plus(int dq, int dr, int H) const {
    Pair o = *this;
    if (PAIRS) {
      o.t += dq;
      o.h += dr;
      if (o.h >= H) {
        o.h -= H;
        ++o.t;
      }
    } else {
      o.t += dq;
    }
    return o;
  }
};

template <int B, bool PAIRS, bool PREFETCH>
__global__ void __launch_bounds__(512, 2)
    scan_kernel(const uint8_t* __restrict__ signs, const int32_t* __restrict__ rtt,
                int64_t stride_rtt, const int32_t* __restrict__ req_idx,
                const int64_t* __restrict__ seq, const int64_t* __restrict__ zend,
                const uint8_t* __restrict__ tiers, uint8_t* __restrict__ scores,
                int32_t* __restrict__ shist, int64_t zone_start, int64_t nmax, int H, int nbp,
                int tpb) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int r = blockIdx.y;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * tpb;
  const int64_t len = seq[r];
  if (start >= len) return;
  const int HB = H * B;
  uint8_t* tbl = smem;
  int32_t* hist = reinterpret_cast<int32_t*>(smem + HB * 256);
  const int32_t* row = rtt + static_cast<int64_t>(req_idx[r]) * stride_rtt + start;  // slots
  {  // tier table (async) and a zeroed histogram
    const uint8_t* src = tiers + static_cast<int64_t>(r) * HB * 256;
    for (int i = threadIdx.x; i < HB * 16; i += blockDim.x) copy16_async(tbl + i * 16, src + i * 16);
    for (int i = threadIdx.x; i < H * nbp; i += blockDim.x) hist[i] = 0;
  }

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  // A warp takes 32 * UNROLL items per round; item = pair (PAIRS) or token (h fixed).
  const int n = static_cast<int>(min(start + tpb, len) - start);
  const int h_fixed = warp % H;
  const int total = PAIRS ? n * H : n;
  const int first = PAIRS ? warp * 32 * UNROLL : (warp / H) * 32 * UNROLL;
  const int step = PAIRS ? warps * 32 * UNROLL : (warps / H) * 32 * UNROLL;
  // Item increments as (quotient, remainder) by H: +32 between a round's items, +step
  // between rounds.
  const int q32 = PAIRS ? 32 / H : 32, r32 = PAIRS ? 32 % H : 0;
  const int qs = PAIRS ? step / H : step, rs = PAIRS ? step % H : 0;
  const int64_t ze = zend[r];
  uint8_t* out = scores + static_cast<int64_t>(r) * H * nmax + start;
  using Row = typename SignRow<B>::T;

  auto load_round = [&](Row(&v)[UNROLL], Pair<PAIRS> pr, int base) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (base + u * 32 + lane < total) {
        const int64_t slot = row[pr.t];
        v[u] = *reinterpret_cast<const Row*>(signs + (slot * H + pr.h) * B);
      }
      pr = pr.plus(q32, r32, H);
    }
  };

  Pair<PAIRS> pr;
  pr.set(first + lane, H, h_fixed);
  Row v[UNROLL];
  load_round(v, pr, first);
  copy_async_wait();
  __syncthreads();
  for (int base = first; base < total; base += step) {  // warp-uniform
    const Pair<PAIRS> next = pr.plus(qs, rs, H);
    Row vn[UNROLL];
    if constexpr (PREFETCH) load_round(vn, next, base + step);
    Pair<PAIRS> q = pr;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (base + u * 32 + lane < total) {
        const int s = key_score<B>(v[u], tbl + q.h * (B * 256));
        out[static_cast<int64_t>(q.h) * nmax + q.t] = static_cast<uint8_t>(s);
        const int64_t pos = start + q.t;
        if (pos >= zone_start && pos < ze) atomicAdd(&hist[q.h * nbp + s], 1);
      }
      q = q.plus(q32, r32, H);
    }
    pr = next;
    if constexpr (PREFETCH) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) v[u] = vn[u];
    } else {
      if (base + step < total) load_round(v, pr, base + step);
    }
  }
  flush_hist(hist, shist + static_cast<int64_t>(r) * H * nbp, H * nbp);
}

// ---- Staged kernel (layout bit 8): signs through shared memory, one head per warp ----
//
// ncu on the two direct layouts above: both are bound by the L1 data stage (78% busy,
// DRAM at 39%). With (token, head) pairs the sign loads coalesce but a lookup instruction
// touches H tier columns (3.9M shared wavefronts for 1.2M ideal at 128K x 2); with a head
// per warp the lookups are nearly conflict-free but every lane's 16-byte sign load is its
// own 128-byte line. Here a block copies each chunk of kChunk tokens' sign rows (all
// heads, coalesced, cp.async, double-buffered) into shared memory with a row stride that
// makes per-head reads conflict-free, and each warp then scores one head's 32 tokens at a
// time, so all its lookups hit one column: with NIB (4-bit tiers, 32 words per column)
// one wavefront per lookup.

// Bytes per staged token row (all H heads' B sign bytes): stride / B odd.
__host__ __device__ constexpr int staged_stride(int H, int B) { return H * B + ((H & 1) ? 0 : B); }

template <int BYTES>
__device__ __forceinline__ void copy_async(void* dst, const void* src) {
#if __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(d), "l"(src), "n"(BYTES));
  }
#else
  if constexpr (BYTES == 16) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  } else {
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(src);
  }
#endif
}
__device__ __forceinline__ void copy_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void copy_async_wait_group() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

template <int B, int CHUNK, int STAGES>
__global__ void __launch_bounds__(512)
    scan_staged_kernel(const uint8_t* __restrict__ signs, const int32_t* __restrict__ rtt,
                       int64_t stride_rtt, const int32_t* __restrict__ req_idx,
                       const int64_t* __restrict__ seq, const int64_t* __restrict__ zend,
                       const uint8_t* __restrict__ tiers, uint8_t* __restrict__ scores,
                       int32_t* __restrict__ shist, int64_t zone_start, int64_t nmax, int H,
                       int nbp, int tpb) {
  extern __shared__ __align__(16) uint8_t smem[];
  using Row = typename SignRow<B>::T;
  const int r = blockIdx.y;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * tpb;
  const int64_t len = seq[r];
  if (start >= len) return;
  const int HB = H * B;
  // Staged row stride: stride / B odd, so the 8 (B = 16) or 16 (B = 8) lanes of one
  // shared-load phase, reading one head of consecutive tokens, hit distinct banks.
  const int stride = staged_stride(H, B);
  uint8_t* tbl = smem;
  int32_t* hist = reinterpret_cast<int32_t*>(smem + HB * 256);
  int32_t* slots = hist + H * nbp;
  uint8_t* stage = reinterpret_cast<uint8_t*>(slots + ((tpb + 3) & ~3));
  const int n = static_cast<int>(min(start + tpb, len) - start);
  const int32_t* row = rtt + static_cast<int64_t>(req_idx[r]) * stride_rtt + start;
  for (int i = threadIdx.x; i < n; i += blockDim.x) slots[i] = row[i];
  {
    const uint4* src = reinterpret_cast<const uint4*>(tiers + static_cast<int64_t>(r) * HB * 256);
#pragma unroll 4
    for (int i = threadIdx.x; i < HB * 16; i += blockDim.x) reinterpret_cast<uint4*>(tbl)[i] = src[i];
  }
  for (int i = threadIdx.x; i < H * nbp; i += blockDim.x) hist[i] = 0;
  __syncthreads();

  const int chunks = (n + CHUNK - 1) / CHUNK;
  // Chunk c's sign rows -> stage buffer c % STAGES. Every call commits a group (empty
  // past the last chunk), so "all but the newest STAGES - 1 groups" is always chunk c.
  // A thread's copies: items i = tid + j * blockDim = t * H + h of a chunk, (t, h)
  // advanced by additions (no division per copy).
  const int t_first = threadIdx.x / H, h_first = threadIdx.x - t_first * H;
  const int dt = blockDim.x / H, dh = blockDim.x - dt * H;
  auto issue = [&](int c) {
    if (c < chunks) {
      const int t0 = c * CHUNK, m = min(CHUNK, n - t0);
      uint8_t* dst = stage + (c % STAGES) * CHUNK * stride;
      for (int t = t_first, h = h_first; t < m;) {
        copy_async<B>(dst + t * stride + h * B,
                      signs + (static_cast<int64_t>(slots[t0 + t]) * H + h) * B);
        t += dt;
        h += dh;
        if (h >= H) {
          h -= H;
          ++t;
        }
      }
    }
    copy_async_commit();
  };

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  const int64_t ze = zend[r];
  uint8_t* out = scores + static_cast<int64_t>(r) * H * nmax + start;
#pragma unroll
  for (int c = 0; c < STAGES - 1; ++c) issue(c);
  for (int c = 0; c < chunks; ++c) {
    issue(c + STAGES - 1);
    copy_async_wait_group<STAGES - 1>();
    __syncthreads();
    const int t0 = c * CHUNK, m = min(CHUNK, n - t0);
    const uint8_t* src = stage + (c % STAGES) * CHUNK * stride;
    // Warp task: one head, 64 tokens, two per lane (their 32 lookups in flight at once).
    const int groups = (m + 63) >> 6;
    for (int k = warp; k < H * groups; k += warps) {  // warp-uniform
      const int g = k / H, h = k - g * H;
      const int ta = (g << 6) + lane, tb = ta + 32;
      const uint8_t* col = tbl + h * (B * 256);
      Row va = {}, vb = {};
      if (ta < m) va = *reinterpret_cast<const Row*>(src + ta * stride + h * B);
      if (tb < m) vb = *reinterpret_cast<const Row*>(src + tb * stride + h * B);
      const int sa = key_score<B>(va, col), sb = key_score<B>(vb, col);
      uint8_t* o = out + static_cast<int64_t>(h) * nmax + t0;
      const int64_t pos = start + t0 + ta;
      if (ta < m) {
        o[ta] = static_cast<uint8_t>(sa);
        if (pos >= zone_start && pos < ze) atomicAdd(&hist[h * nbp + sa], 1);
      }
      if (tb < m) {
        o[tb] = static_cast<uint8_t>(sb);
        if (pos + 32 >= zone_start && pos + 32 < ze) atomicAdd(&hist[h * nbp + sb], 1);
      }
    }
    __syncthreads();  // buffer c % STAGES is refilled by the next iteration's issue
  }
  flush_hist(hist, shist + static_cast<int64_t>(r) * H * nbp, H * nbp);
}

// Session 9's kernel (layout bit 4), kept only to time against in one run.
// Shared memory of a scan block: the request's tier table [H, B, 256], a zeroed score
// histogram [H, nbp] and the run's KV slots [tpb]. Returns the run's length.
template <int B>
__device__ inline int stage_run_s9(uint8_t* smem, const uint8_t* __restrict__ tiers,
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
__device__ __forceinline__ int key_score_s9(const typename SignRow<B>::T& v, const uint8_t* col) {
  int s = 0;
#pragma unroll
  for (int b = 0; b < B; ++b) {
    const uint32_t id = (SignRow<B>::word(v, b >> 2) >> ((b & 3) * 8)) & 0xFFu;
    s += col[b * 256 + id];
  }
  return s;
}

// Adds the block's score histogram into the request's global one.
__device__ inline void flush_hist_s9(const int32_t* hist, int32_t* __restrict__ dst, int size) {
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
__global__ void scan_kernel_s9(const uint8_t* __restrict__ signs, const int32_t* __restrict__ rtt,
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
  const int n = stage_run_s9<B>(smem, tiers, rtt, stride_rtt, req_idx[r], seq[r], r, start, H, nbp, tpb);

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
        const int s = key_score_s9<B>(v[u], tbl + h * B * 256);
        out[static_cast<int64_t>(h) * nmax + t] = static_cast<uint8_t>(s);
        const int64_t pos = start + t;
        if (pos >= zone_start && pos < ze) atomicAdd(&hist[h * nbp + s], 1);
      }
    }
  }
  flush_hist_s9(hist, shist + static_cast<int64_t>(r) * H * nbp, H * nbp);
}



using ScanKernel = void (*)(const uint8_t*, const int32_t*, int64_t, const int32_t*,
                           const int64_t*, const int64_t*, const uint8_t*, uint8_t*, int32_t*,
                           int64_t, int64_t, int, int, int);

template <int B>
ScanKernel staged_kernel(int chunk_log, int stages) {
  static constexpr ScanKernel k2[3] = {scan_staged_kernel<B, 64, 2>, scan_staged_kernel<B, 128, 2>,
                                       scan_staged_kernel<B, 256, 2>};
  static constexpr ScanKernel k3[3] = {scan_staged_kernel<B, 64, 3>, scan_staged_kernel<B, 128, 3>,
                                       scan_staged_kernel<B, 256, 3>};
  return stages == 3 ? k3[chunk_log] : k2[chunk_log];
}

// Launches a kernel with `smem` dynamic shared memory, opting in to more than 48 KB once
// per kernel (outside any graph capture in practice: the first call is the eager warm-up).
template <typename Kernel>
void launch(Kernel kernel, bool& opted, dim3 grid, dim3 block, size_t smem, cudaStream_t st,
            const void* signs, const void* rtt, int64_t stride_rtt, const void* req_idx,
            const void* seq, const void* zend, const void* tiers, void* scores, void* shist,
            int64_t zone_start, int64_t nmax, int H, int nbp, int tpb) {
  if (smem > 48 * 1024 && !opted) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024);
    opted = true;
  }
  kernel<<<grid, block, smem, st>>>(
      static_cast<const uint8_t*>(signs), static_cast<const int32_t*>(rtt), stride_rtt,
      static_cast<const int32_t*>(req_idx), static_cast<const int64_t*>(seq),
      static_cast<const int64_t*>(zend), static_cast<const uint8_t*>(tiers),
      static_cast<uint8_t*>(scores), static_cast<int32_t*>(shist), zone_start, nmax, H, nbp,
      tpb);
}

}  // namespace

extern "C" int pariskv_collision_scan(const void* signs, const void* rtt, int64_t stride_rtt,
                                      const void* req_idx, const void* seq, const void* zend,
                                      const void* tiers, void* scores, void* shist,
                                      int64_t zone_start, int64_t nmax, int R, int H, int B,
                                      int nbp, int tpb, int warps, int layout, void* stream) {
  if (R == 0) return 0;
  // layout bits: 1 (token, head) pairs, 2 prefetch, 4 session 9's kernel, 8 staged;
  // staged: bits 16-17 chunk 64 << k tokens, bit 64 three stages (else two).
  const bool pairs = layout & 1, prefetch = layout & 2, s9 = layout & 4;
  const bool staged = layout & 8;
  const int chunk_log = (layout >> 4) & 3, stages = (layout & 64) ? 3 : 2;
  // warps: a multiple of H unless pairs or staged (a warp then scans one head); 0 picks 8
  // (or H when H > 8).
  if (warps <= 0) warps = (H <= 8 && 8 % H == 0) ? 8 : H;
  if ((!pairs && !staged && warps % H != 0) || warps > 16) return -1;
  if (B != 16 && B != 8) return -2;
  size_t smem = static_cast<size_t>(H) * B * 256 + static_cast<size_t>(H) * nbp * 4 +
                (s9 ? static_cast<size_t>(tpb) * 4 : 0);
  if (staged) {
    if (chunk_log > 2) return -1;
    smem += static_cast<size_t>((tpb + 3) & ~3) * 4 +
            static_cast<size_t>(stages) * (64 << chunk_log) * staged_stride(H, B);
  }
  dim3 grid(static_cast<unsigned>((nmax + tpb - 1) / tpb), static_cast<unsigned>(R));
  dim3 block(warps * 32);
  auto st = static_cast<cudaStream_t>(stream);
  static bool opted[128][2] = {};
  bool& done = opted[layout & 127][B == 16];
#define PARISKV_ARGS                                                                  \
  done, grid, block, smem, st, signs, rtt, stride_rtt, req_idx, seq, zend, tiers, scores, \
      shist, zone_start, nmax, H, nbp, tpb
#define PARISKV_LAUNCH(BB)                                                            \
  do {                                                                                \
    if (staged) {                                                                     \
      launch(staged_kernel<BB>(chunk_log, stages), PARISKV_ARGS);                     \
    } else if (s9) {                                                                  \
      launch(pairs ? scan_kernel_s9<BB, true> : scan_kernel_s9<BB, false>, PARISKV_ARGS); \
    } else if (pairs) {                                                               \
      launch(prefetch ? scan_kernel<BB, true, true> : scan_kernel<BB, true, false>,    \
             PARISKV_ARGS);                                                           \
    } else {                                                                          \
      launch(prefetch ? scan_kernel<BB, false, true> : scan_kernel<BB, false, false>,  \
             PARISKV_ARGS);                                                           \
    }                                                                                 \
  } while (0)
  if (B == 16) {
    PARISKV_LAUNCH(16);
  } else {
    PARISKV_LAUNCH(8);
  }
#undef PARISKV_LAUNCH
#undef PARISKV_ARGS
  return static_cast<int>(cudaGetLastError());
}
