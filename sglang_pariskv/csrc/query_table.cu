// ParisKV query prep + centroid table (CUDA): the first kernel of every decode layer.
//
// Same contract as kernels/query_table.py (the Triton fallback); the table is exactly
// codec.collision.centroid_table of the blocks this kernel writes. Why CUDA: the Triton
// version recomputes the rotation for each of the two passes over the blocks, and cannot
// also hand the sparse attention call a contiguous copy of the query.
//
// Block = one (request, KV head), 256 threads (one per centroid c):
//   1. the group mean of the KV head's G query heads (fp32), times the head's calibration
//      channel scales when `scale` is given, its norm and the unit mean;
//   2. the D rotated coordinates qv_i = sum_d rot[i, d] * unit[d], written to the
//      prepared-query buffer the rerank reads. Every thread works on one row at once:
//      P = 256 / D consecutive threads share row i, each summing D / P products from
//      16-byte loads that are all independent, then a shuffle within the P lanes. (A warp
//      per row, rows in turn, waits on the rotation's L2 reads D / 8 times in a row:
//      19.8 us per layer at 128K x 1 on the H200, as long as the whole collision scan.)
//      Head dims without that layout, or a misaligned rotation, take a warp per row;
//   3. S = max over blocks b of sum_j |qv_8b+j| (float64, j = 0..7 in order);
//   4. for each block b: s_c = sum_j (+qv_j if bit j of c else -qv_j) in float64, summed
//      in the order j = 0..7 as the codec does (only additions: no contraction, so with
//      the same qv the entries are bit-identical to the codec's and the Triton path's),
//      and the entry floor(127 * s_c / S + 0.5) as int8 (0 for a zero query).
// It also writes the norm, zeroes the (request, head) score histogram that the collision
// scan accumulates into next, and (when `q_copy` is given) copies the KV head's G query
// heads into a contiguous [R, Hq, D] buffer: the sparse FlashInfer call needs its query
// rows as [R * Hkv, G, D], which a strided query (a view of the QKV projection) can only
// become through a copy, a separate kernel of about 2.8 us per layer in a graph.

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

constexpr int THREADS = 256;  // one per centroid
constexpr int WARPS = THREADS / 32;
constexpr int MAX_D = 256;

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
    query_table_kernel(const T* __restrict__ q, int64_t stride_qr, int64_t stride_qh,
                       const float* __restrict__ scale, const float* __restrict__ rot,
                       float* __restrict__ blocks, float* __restrict__ norm_out,
                       int8_t* __restrict__ table, int32_t* __restrict__ shist,
                       T* __restrict__ q_copy, int H, int B, int G, int D, int NBP,
                       int row_parts) {
  __shared__ float unit[MAX_D];
  __shared__ float qv[MAX_D];
  __shared__ float red[WARPS];
  __shared__ double l1[MAX_D / 8];

  const int rh = blockIdx.x;  // r * H + h
  const int r = rh / H, h = rh % H;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // 1. group mean and its norm (D <= 256: one coordinate per thread).
  float m = 0.f;
  if (tid < D) {
    const T* qh = q + r * stride_qr + static_cast<int64_t>(h) * G * stride_qh + tid;
    T* qc = q_copy != nullptr ? q_copy + static_cast<int64_t>(rh) * G * D + tid : nullptr;
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
  for (int i = tid; i < NBP; i += THREADS) shist[static_cast<int64_t>(rh) * NBP + i] = 0;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) total += red[w];
  const float norm = sqrtf(total);
  if (tid < D) unit[tid] = m / fmaxf(norm, 1.1754943508222875e-38f);
  if (tid == 0) norm_out[rh] = norm;
  __syncthreads();

  // 2. the rotated coordinates.
  if (row_parts > 0) {  // P = row_parts threads per row, all rows at once
    const int i = tid / row_parts, part = tid % row_parts;
    const int len = D / row_parts;  // a multiple of 4
    const float4* w =
        reinterpret_cast<const float4*>(rot + static_cast<int64_t>(i) * D + part * len);
    const float* u = unit + part * len;
    float acc = 0.f;
    // Eight 16-byte loads issued before any is used, so their L2 round trips overlap.
    constexpr int kLoads = 8;
    const int n4 = len / 4;
    for (int k0 = 0; k0 < n4; k0 += kLoads) {
      float4 x[kLoads];
#pragma unroll
      for (int j = 0; j < kLoads; ++j)
        x[j] = k0 + j < n4 ? w[k0 + j] : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int j = 0; j < kLoads; ++j) {
        if (k0 + j < n4) {
          const float* uu = u + 4 * (k0 + j);
          acc += x[j].x * uu[0] + x[j].y * uu[1] + x[j].z * uu[2] + x[j].w * uu[3];
        }
      }
    }
    for (int off = row_parts >> 1; off > 0; off >>= 1)
      acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (part == 0) {
      qv[i] = acc;
      blocks[static_cast<int64_t>(rh) * D + i] = acc;
    }
  } else {  // a warp per row, rows w, w + WARPS, ...
    for (int i = warp; i < D; i += WARPS) {
      float acc = 0.f;
      for (int d = lane; d < D; d += 32) acc += rot[static_cast<int64_t>(i) * D + d] * unit[d];
      acc = warp_sum(acc);
      if (lane == 0) {
        qv[i] = acc;
        blocks[static_cast<int64_t>(rh) * D + i] = acc;
      }
    }
  }
  __syncthreads();

  // 3. each block's L1 norm, then S = their maximum (B <= 32: one warp).
  if (tid < B) {
    double s = fabs(static_cast<double>(qv[tid * 8]));
#pragma unroll
    for (int j = 1; j < 8; ++j) s = __dadd_rn(s, fabs(static_cast<double>(qv[tid * 8 + j])));
    l1[tid] = s;
  }
  __syncthreads();
  double big = 0.0;
  for (int b = 0; b < B; ++b) big = fmax(big, l1[b]);
  const double safe = big > 0.0 ? big : 1.0;

  // 4. this centroid's entry in every block (coalesced: one 256-byte row per block).
  const int c = tid;
#pragma unroll 4
  for (int b = 0; b < B; ++b) {  // independent entries: unrolled, their chains overlap
    const float* v = qv + b * 8;
    double s = (c & 1) ? static_cast<double>(v[0]) : -static_cast<double>(v[0]);
#pragma unroll
    for (int j = 1; j < 8; ++j) {
      const double x = static_cast<double>(v[j]);
      s = __dadd_rn(s, ((c >> j) & 1) ? x : -x);
    }
    const double e = big > 0.0 ? floor(__dadd_rn(__ddiv_rn(__dmul_rn(127.0, s), safe), 0.5)) : 0.0;
    table[(static_cast<int64_t>(rh) * B + b) * 256 + c] = static_cast<int8_t>(e);
  }
}

}  // namespace

// dtype: 0 = float32, 1 = float16, 2 = bfloat16 (the query's); scale: fp32 [H, D] or null.
extern "C" int pariskv_query_table(const void* q, int64_t stride_qr, int64_t stride_qh,
                                   int dtype, const void* scale, const void* rot, void* blocks,
                                   void* norm, void* table, void* shist, void* q_copy, int R,
                                   int H, int B, int G, int NBP, void* stream) {
  if (R == 0) return 0;
  const int D = B * 8;
  if (D > MAX_D || G <= 0) return -2;
  // Threads per row of the rotation: 256 / D when that splits each row into whole 16-byte
  // loads within a warp (D = 32, 64, 128, 256) and the rotation is 16-byte aligned; else 0.
  int row_parts = 0;
  if (THREADS % D == 0 && THREADS / D <= 32 && D / (THREADS / D) >= 4 &&
      (D / (THREADS / D)) % 4 == 0 &&
      (reinterpret_cast<uintptr_t>(rot) & 15u) == 0)
    row_parts = THREADS / D;
  dim3 grid(static_cast<unsigned>(R * H));
  auto st = static_cast<cudaStream_t>(stream);
#define PARISKV_LAUNCH(TT)                                                                 \
  query_table_kernel<TT><<<grid, THREADS, 0, st>>>(                                        \
      static_cast<const TT*>(q), stride_qr, stride_qh, static_cast<const float*>(scale),   \
      static_cast<const float*>(rot), static_cast<float*>(blocks),                         \
      static_cast<float*>(norm), static_cast<int8_t*>(table), static_cast<int32_t*>(shist), \
      static_cast<TT*>(q_copy), H, B, G, D, NBP, row_parts)
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
