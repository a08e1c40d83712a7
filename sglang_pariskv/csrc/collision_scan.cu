// ParisKV collision scan (CUDA): uint8 key scores + zone score histogram.
//
// Same contract as sglang_pariskv/kernels/collision.py (the Triton fallback): a key's
// score is 128 + floor(sum over its blocks of the centroid table entry / B). Why CUDA:
// each (token, head, block) needs one lookup in a 256-entry table; Triton can only do
// that as a gathered global load (L1 wavefront bound, ~2 lookups/cycle/SM) or through
// tl.gather (slower still). Here the request's whole centroid table ([Hkv, B, 256] int8)
// sits in shared memory, one 256-byte column per (head, block).
//
// Block = one request, a contiguous run of `tpb` positions, scanned in chunks of 128
// tokens. Each chunk's sign rows (all H heads of a token: H * B contiguous bytes per
// slot) are copied into shared memory with cp.async, coalesced and double-buffered; then
// each warp scores one head for 64 tokens (two per lane), so all 32 lanes of a lookup
// read the same table column (at most 2-way bank conflicts). Why staged: a scan that loads
// signs straight into registers is bound by the L1 data stage (78% busy, DRAM at 39% in
// ncu) either way: with lanes on (token, head) pairs the loads coalesce but one lookup
// instruction touches H columns (3.9M shared wavefronts where 1.2M would do at 128K x 2),
// with a head per warp the lookups are clean but every lane's 16-byte load is its own
// 128-byte line. Staged: 21.0 us per layer at 128K x 2 on an H100, against 26.2 us.
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

// Tokens per staged chunk, and chunks in flight: 64-token chunks, 256-token chunks and
// three stages each timed slower at 128K x 2 (22.6, 27.6 and 21.5 us vs 21.0). Shorter
// chunks only where the shared memory needs it (many KV heads: 32 x 128 at TP 1).
constexpr int kChunks[] = {128, 64, 32};
constexpr int kStages = 2;
// Warps per block, each scoring one head at a time (the run lengths of
// kernels/launch_geometry.py are the fastest ones with 16).
constexpr int kWarps = 16;

// Bytes per staged token row (all H heads' B sign bytes), padded so that stride / B is
// odd: the 8 (B = 16) or 16 (B = 8) lanes of one shared-load phase, reading one head of
// consecutive tokens, then hit distinct banks.
__host__ __device__ constexpr int staged_stride(int H, int B) { return H * B + ((H & 1) ? 0 : B); }

// B bytes global -> shared without a register round trip (cp.async, sm_80+).
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
  using T = typename SignRow<BYTES>::T;
  *reinterpret_cast<T*>(dst) = *reinterpret_cast<const T*>(src);
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

// One key's score: 128 + floor(the sum over its B blocks of its sign pattern's entry / B),
// the entries looked up in its head's B columns starting at `col` (byte b of the sign row
// picks column b's entry). The sum is >= -127 B, so the shifted numerator is >= 0 and
// the division is a floor.
template <int B>
__device__ __forceinline__ int key_score(const typename SignRow<B>::T& v, const int8_t* col) {
  int s = 0;
#pragma unroll
  for (int b = 0; b < B; ++b) {
    const uint32_t id = __byte_perm(SignRow<B>::word(v, b >> 2), 0u, 0x4440u | (b & 3));
    s += col[b * 256 + id];
  }
  return (s + 128 * B) / B;
}

// Shared memory of a scan block: centroid table [H * B, 256] bytes, score histogram [H, nbp],
// the run's KV slots [tpb] and kStages chunk buffers [chunk, staged_stride]. Mirrored by
// kernels/workspace.py's cuda_scan_shared_bytes (the startup check).
inline size_t scan_smem_bytes(int H, int B, int nbp, int tpb, int chunk) {
  return static_cast<size_t>(H) * B * 256 + static_cast<size_t>(H) * nbp * 4 +
         static_cast<size_t>((tpb + 3) & ~3) * 4 +
         static_cast<size_t>(kStages) * chunk * staged_stride(H, B);
}

template <int B>
__global__ void __launch_bounds__(512)
    scan_kernel(const uint8_t* __restrict__ signs, const int32_t* __restrict__ rtt,
                int64_t stride_rtt, const int32_t* __restrict__ req_idx,
                const int64_t* __restrict__ seq, const int64_t* __restrict__ zend,
                const int8_t* __restrict__ table, uint8_t* __restrict__ scores,
                int32_t* __restrict__ shist, int64_t zone_start, int64_t nmax, int H, int nbp,
                int tpb, int chunk) {
  extern __shared__ __align__(16) uint8_t smem[];
  using Row = typename SignRow<B>::T;
  const int r = blockIdx.y;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * tpb;
  const int64_t len = seq[r];
  if (start >= len) return;
  const int HB = H * B;
  const int stride = staged_stride(H, B);
  int8_t* tbl = reinterpret_cast<int8_t*>(smem);
  int32_t* hist = reinterpret_cast<int32_t*>(smem + HB * 256);
  int32_t* slots = hist + H * nbp;
  uint8_t* stage = reinterpret_cast<uint8_t*>(slots + ((tpb + 3) & ~3));
  const int n = static_cast<int>(min(start + tpb, len) - start);
  const int32_t* row = rtt + static_cast<int64_t>(req_idx[r]) * stride_rtt + start;
  for (int i = threadIdx.x; i < n; i += blockDim.x) slots[i] = row[i];
  {
    const uint4* src = reinterpret_cast<const uint4*>(table + static_cast<int64_t>(r) * HB * 256);
#pragma unroll 4
    for (int i = threadIdx.x; i < HB * 16; i += blockDim.x) reinterpret_cast<uint4*>(tbl)[i] = src[i];
  }
  for (int i = threadIdx.x; i < H * nbp; i += blockDim.x) hist[i] = 0;
  __syncthreads();

  const int chunks = (n + chunk - 1) / chunk;
  // A thread's copies are items tid + j * blockDim = t * H + h of a chunk, (t, h)
  // advanced by additions (a division per copy cost ~25 instructions per key).
  const int t_first = threadIdx.x / H, h_first = threadIdx.x - t_first * H;
  const int dt = blockDim.x / H, dh = blockDim.x - dt * H;
  // Chunk c's sign rows -> buffer c % kStages. Every call commits a group (empty past
  // the last chunk), so "all but the newest kStages - 1 groups done" is always chunk c.
  auto issue = [&](int c) {
    if (c < chunks) {
      const int t0 = c * chunk, m = min(chunk, n - t0);
      uint8_t* dst = stage + (c % kStages) * chunk * stride;
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
  for (int c = 0; c < kStages - 1; ++c) issue(c);
  for (int c = 0; c < chunks; ++c) {
    issue(c + kStages - 1);
    copy_async_wait_group<kStages - 1>();
    __syncthreads();
    const int t0 = c * chunk, m = min(chunk, n - t0);
    const uint8_t* src = stage + (c % kStages) * chunk * stride;
    // Warp task: one head, 64 tokens, two per lane (their 2B lookups in flight at once).
    const int groups = (m + 63) >> 6;
    for (int k = warp; k < H * groups; k += warps) {  // warp-uniform
      const int g = k / H, h = k - g * H;
      const int ta = (g << 6) + lane, tb = ta + 32;
      const int8_t* col = tbl + h * (B * 256);
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
    __syncthreads();  // buffer c % kStages is refilled by the next iteration's issue
  }
  __syncthreads();
  // The block's histogram into the request's global one.
  int32_t* dst = shist + static_cast<int64_t>(r) * H * nbp;
  for (int i = threadIdx.x; i < H * nbp; i += blockDim.x) {
    const int cnt = hist[i];
    if (cnt) atomicAdd(&dst[i], cnt);
  }
}

}  // namespace

extern "C" int pariskv_collision_scan(const void* signs, const void* rtt, int64_t stride_rtt,
                                      const void* req_idx, const void* seq, const void* zend,
                                      const void* table, void* scores, void* shist,
                                      int64_t zone_start, int64_t nmax, int R, int H, int B,
                                      int nbp, int tpb, void* stream) {
  if (R == 0) return 0;
  if (tpb <= 0) return -1;
  if (B != 16 && B != 8) return -2;
  // The device's opt-in shared memory per block (227 KB on the H100, 163 KB on the A100):
  // the longest chunk that fits. DecodeWorkspace checks the shortest fits at startup.
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  int chunk = 0;
  size_t smem = 0;
  for (int c : kChunks) {
    chunk = c;
    smem = scan_smem_bytes(H, B, nbp, tpb, c);
    if (smem <= static_cast<size_t>(optin)) break;
  }
  if (smem > static_cast<size_t>(optin)) return -3;
  dim3 grid(static_cast<unsigned>((nmax + tpb - 1) / tpb), static_cast<unsigned>(R));
  dim3 block(kWarps * 32);
  auto kernel = B == 16 ? scan_kernel<16> : scan_kernel<8>;
  // Opt in to large shared memory once per instantiation (outside any graph capture in
  // practice: the first call is the eager warm-up).
  static bool opted[2] = {false, false};
  if (smem > 48 * 1024 && !opted[B == 16]) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
    opted[B == 16] = true;
  }
  kernel<<<grid, block, smem, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint8_t*>(signs), static_cast<const int32_t*>(rtt), stride_rtt,
      static_cast<const int32_t*>(req_idx), static_cast<const int64_t*>(seq),
      static_cast<const int64_t*>(zend), static_cast<const int8_t*>(table),
      static_cast<uint8_t*>(scores), static_cast<int32_t*>(shist), zone_start, nmax, H, nbp,
      tpb, chunk);
  return static_cast<int>(cudaGetLastError());
}
