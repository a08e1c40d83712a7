// ParisKV candidate write + rerank in one kernel (CUDA).
//
// The CUDA counterpart of the Triton `_write_kernel` of kernels/select.py followed by the
// Triton rerank (the fallback it matches): as two kernels, each is a separate
// latency-bound launch at decode batch sizes (22 and 41 us per layer at 128K x 2 in an
// SGLang profile, H100), and the rerank re-reads the candidate list the write just stored. Inputs are the count pass of kernels/select.py
// (`_count_kernel`: threshold score s*, how many keys at s* to take, how many score above
// it, and per chunk of positions the keys above / at s*).
//
// Block = one chunk of CH positions of one (request, KV head) row, CH / 4 threads, 4
// positions per thread. Same contract as the Triton write: keys above s* in position
// order first, then the first `take` keys at s* in position order, so the candidate array
// is identical to the Triton path's. Each kept position's destination is its rank: the
// chunk's base (the counts of the chunks before it, summed by the block) plus an
// exclusive block scan of the per-thread counts. The kept (KV slot, destination) pairs go
// to a shared list, and the block then reranks them, SPLIT adjacent lanes per candidate
// (rerank_record.cuh). It writes the candidate's KV slot and its estimate at the
// destination; estimates at and past the row's count C are -inf.
//
// With KEYS the estimate is exact instead: the inner product of the candidate's stored key
// (SGLang's K buffer, [slots, H, D] fp16 / bf16) with the group-mean query, which the block
// averages from the query rows ([R, H * G, D], contiguous). The code records are not read.

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "rerank_record.cuh"
#include "warp_scan.cuh"

namespace {

constexpr int CH = 1024;           // positions per block: the count pass's chunk
constexpr int THREADS = CH / 4;    // 4 positions per thread
constexpr int WARPS = THREADS / 32;
constexpr int KEY_PARTS = 4;  // lanes per candidate of the rerank by the keys

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Eight consecutive 16-bit values of a key row, widened.
template <typename T>
__device__ __forceinline__ void widen8(const uint4& v, float* out) {
  const T* x = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = to_float(x[j]);
}

// One part (D / KEY_PARTS dims) of a stored key: E / 8 16-byte loads, all in flight
// before any is used.
template <int B, typename KT>
struct KeyPart {
  static constexpr int E = 8 * B / KEY_PARTS;  // dims per part
  uint4 v[E / 8];
  __device__ __forceinline__ void load(const KT* __restrict__ keys, int64_t rec, int part) {
    const uint4* src = reinterpret_cast<const uint4*>(keys + rec * (8 * B) + part * E);
#pragma unroll
    for (int c = 0; c < E / 8; ++c) v[c] = src[c];
  }
  // The part's inner product with the mean query; `qk` holds part p's dims at
  // p * (E + 8): the padding puts the four parts of a lookup in different banks.
  __device__ __forceinline__ float dot(const float* qk, int part) const {
    const float* qp = qk + part * (E + 8);
    float acc0 = 0.f, acc1 = 0.f;
#pragma unroll
    for (int c = 0; c < E / 8; ++c) {
      float x[8];
      widen8<KT>(v[c], x);
#pragma unroll
      for (int j = 0; j < 8; j += 2) {
        acc0 = fmaf(x[j], qp[8 * c + j], acc0);
        acc1 = fmaf(x[j + 1], qp[8 * c + j + 1], acc1);
      }
    }
    return acc0 + acc1;
  }
};

// The rerank of a block's kept list: PARTS adjacent lanes per candidate, two candidates per
// lane at a time, both loaded before either is evaluated. A warp enters each round together
// (t0 is warp-uniform), so each shuffle mask is the ballot of the lanes holding that
// candidate: whole groups of PARTS lanes, as PARTS divides 32. `load(x, slot, part)` fills a
// lane's share `x` of the candidate at KV slot `slot`, `score(x, part)` is that share's
// part of its score; the shares are summed over the lanes and the candidate's first lane
// writes its slot, and its score times `scale`, at its destination.
template <int PARTS, typename Share, typename Load, typename Score>
__device__ __forceinline__ void rerank_list(const int* list_slot, const int* list_dest,
                                            int n_list, int tid, int lane, float scale,
                                            int32_t* out_cand, float* out_est, Load load,
                                            Score score) {
  auto finish = [&](float acc, int i, int part, unsigned mask, int32_t slot) {
#pragma unroll
    for (int off = 1; off < PARTS; off <<= 1) acc += __shfl_xor_sync(mask, acc, off);
    if (part == 0) {
      const int dest = list_dest[i];
      out_cand[dest] = slot;
      out_est[dest] = acc * scale;
    }
  };
  const int tasks = PARTS * n_list;
  for (int t0 = tid - lane; t0 < tasks; t0 += 2 * THREADS) {
    int ta = t0 + lane, tb = ta + THREADS;
    const bool la = ta < tasks, lb = tb < tasks;
    const unsigned ma = __ballot_sync(0xffffffffu, la);
    const unsigned mb = __ballot_sync(0xffffffffu, lb);
    ta = la ? ta : 0;
    tb = lb ? tb : 0;
    const int ia = ta / PARTS, ib = tb / PARTS;
    const int pa = ta % PARTS, pb = tb % PARTS;
    const int32_t sa = list_slot[ia], sb = list_slot[ib];
    Share xa, xb;
    if (la) load(xa, sa, pa);
    if (lb) load(xb, sb, pb);
    if (la) finish(score(xa, pa), ia, pa, ma, sa);
    if (lb) finish(score(xb, pb), ib, pb, mb, sb);
  }
}

// KEYS false: rerank by the 3-bit records (KT, QT unused). KEYS true: by the stored keys
// of type KT, the queries of type QT.
template <int B, bool KEYS, typename KT, typename QT>
__global__ void __launch_bounds__(THREADS)
    select_rerank_kernel(const uint8_t* __restrict__ scores, const int32_t* __restrict__ thr,
                         const int32_t* __restrict__ take, const int32_t* __restrict__ ngt,
                         const int32_t* __restrict__ gt_cnt, const int32_t* __restrict__ eq_cnt,
                         const int64_t* __restrict__ zend, const int64_t* __restrict__ counts,
                         const int32_t* __restrict__ rtt, int64_t stride_rtt,
                         const int32_t* __restrict__ req_idx, const uint8_t* __restrict__ signs,
                         const uint8_t* __restrict__ mags, const __half* __restrict__ weights,
                         const float* __restrict__ qb, const float* __restrict__ qn,
                         const float* __restrict__ levels, const KT* __restrict__ keys,
                         const QT* __restrict__ query, int G, int32_t* __restrict__ cand,
                         float* __restrict__ est, int64_t zone_start, int64_t nmax, int nch,
                         int64_t cmax, int H) {
  // SPLIT threads per candidate (adjacent lanes), NB = 4 of the record's blocks each: a
  // block keeps about 100 of its 1024 positions, so one thread each left most lanes idle
  // behind one long chain of loads and adds (36.3 us per layer at 128K x 2 in a 32-layer
  // graph; 2 threads: 34.2; 4 threads: 32.5, bench_retrieval_in_step.py).
  constexpr int NB = 4;
  constexpr int SPLIT = B / NB;
  using Part = pariskv::RecordPart<B, NB>;
  constexpr int E = KeyPart<B, KT>::E;
  // the code rerank's lookup table, or the mean query laid out for KeyPart::dot
  __shared__ float table[KEYS ? KEY_PARTS * (E + 8) : B * pariskv::kRerankTableFloats];
  __shared__ unsigned long long warp_sums[WARPS];
  __shared__ int warp_scan[WARPS];
  __shared__ int list_slot[CH];
  __shared__ int list_dest[CH];
  __shared__ int n_list;

  const int row = blockIdx.y;
  const int r = row / H, h = row % H;
  const int chunk = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t start = static_cast<int64_t>(chunk) * CH;
  const int64_t p0 = start + 4 * tid;

  // A block's time is a chain of memory latencies, not bytes (about 100 records per 1024
  // positions): every load that depends on nothing is issued here, together, so the chain
  // is three latencies long (these; the kept positions' KV slots; their records).
  const int64_t c = counts[r];
  const int64_t ze = zend[r];
  const int64_t req = req_idx[r];
  const int s_thr = thr[row], n_take = take[row], n_above = ngt[row];
  const float norm = qn[row];
  pariskv::RerankTableShare<B, NB, THREADS> tshare;
  float qsum = 0.f;  // KEYS: dim tid of the group's query sum
  if constexpr (KEYS) {
    if (tid < 8 * B) {
      const QT* qr = query + (static_cast<int64_t>(r) * H + h) * G * (8 * B) + tid;
      for (int g = 0; g < G; ++g) qsum += to_float(qr[g * (8 * B)]);
    }
  } else {
    tshare.load(qb + static_cast<int64_t>(row) * B * 8, levels, tid);
  }
  uint32_t packed = 0;  // this thread's 4 positions' scores
  if ((nmax & 3) == 0 && p0 + 3 < nmax) {  // aligned: one 4-byte load
    packed = *reinterpret_cast<const uint32_t*>(scores + static_cast<int64_t>(row) * nmax + p0);
  } else {
    for (int u = 0; u < 4; ++u)
      if (p0 + u < nmax)
        packed |= static_cast<uint32_t>(scores[static_cast<int64_t>(row) * nmax + p0 + u])
                  << (8 * u);
  }
  // This chunk's base: keys above / at s* in the chunks before it (packed: gt | eq << 32).
  unsigned long long before = 0;
  const int32_t* gtr = gt_cnt + static_cast<int64_t>(row) * nch;
  const int32_t* eqr = eq_cnt + static_cast<int64_t>(row) * nch;
  for (int i = tid; i < chunk; i += THREADS)
    before += static_cast<unsigned long long>(gtr[i]) |
              (static_cast<unsigned long long>(eqr[i]) << 32);

  float* out_est = est + static_cast<int64_t>(row) * cmax;
  int32_t* out_cand = cand + static_cast<int64_t>(row) * cmax;
  // -inf past the row's count, spread over the row's blocks (a top-k may read whole rows).
  for (int64_t i = c + static_cast<int64_t>(chunk) * THREADS + tid; i < cmax;
       i += static_cast<int64_t>(gridDim.x) * THREADS)
    out_est[i] = -INFINITY;
  if (c <= 0 || start >= ze || start + CH <= zone_start) return;

  // The KV slots of this thread's zone positions, kept or not (the request's row of
  // req_to_token is L2-resident: the scan just read it), loaded before the selection
  // decides which are kept so that their latency overlaps the block scan.
  int32_t slot4[4];
  const int32_t* rtt_row = rtt + req * stride_rtt;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t p = p0 + u;
    slot4[u] = p >= zone_start && p < ze ? rtt_row[p] : 0;
  }
  if constexpr (KEYS) {
    if (tid < 8 * B) table[(tid / E) * (E + 8) + tid % E] = qsum / G;
  } else {
    tshare.store(table, tid);
  }
  if (tid == 0) n_list = 0;

#pragma unroll
  for (int off = 16; off > 0; off >>= 1) before += __shfl_xor_sync(0xffffffffu, before, off);
  if (lane == 0) warp_sums[warp] = before;

  // Four positions per thread: flags of "above s*" and "at s*" (zone positions only).
  int gt_bits = 0, eq_bits = 0;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t p = p0 + u;
    const int s = (packed >> (8 * u)) & 0xFF;
    const bool zone = p >= zone_start && p < ze;
    gt_bits |= (zone && s > s_thr) << u;
    eq_bits |= (zone && s == s_thr) << u;
  }
  // Exclusive block scan of the per-thread counts (packed: gt | eq << 16; <= CH each).
  const int mine = __popc(gt_bits) | (__popc(eq_bits) << 16);
  const int incl = warp_inclusive_sum(mine);
  if (lane == 31) warp_scan[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    unsigned long long b = lane < WARPS ? warp_sums[lane] : 0ull;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) b += __shfl_xor_sync(0xffffffffu, b, off);
    const int w = lane < WARPS ? warp_scan[lane] : 0;
    const int x = warp_inclusive_sum(w);
    __syncwarp();
    if (lane < WARPS) warp_scan[lane] = x - w;  // exclusive prefix of the warps
    if (lane == 0) warp_sums[0] = b;
  }
  __syncthreads();
  const unsigned long long base = warp_sums[0];
  const int excl = incl - mine + warp_scan[warp];
  int gt_rank = static_cast<int>(base & 0xFFFFFFFFull) + (excl & 0xFFFF);
  int eq_rank = static_cast<int>(base >> 32) + (excl >> 16);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    int dest = -1;
    if ((gt_bits >> u) & 1) {
      dest = gt_rank++;
    } else if ((eq_bits >> u) & 1) {
      if (eq_rank < n_take) dest = n_above + eq_rank;
      ++eq_rank;
    }
    if (dest >= 0) {
      const int k = atomicAdd(&n_list, 1);
      list_slot[k] = slot4[u];
      list_dest[k] = dest;
    }
  }
  __syncthreads();

  if constexpr (KEYS) {  // KEY_PARTS lanes per candidate, each a quarter of its key
    rerank_list<KEY_PARTS, KeyPart<B, KT>>(
        list_slot, list_dest, n_list, tid, lane, 1.f, out_cand, out_est,
        [&](KeyPart<B, KT>& x, int32_t slot, int p) {
          x.load(keys, static_cast<int64_t>(slot) * H + h, p);
        },
        [&](const KeyPart<B, KT>& x, int p) { return x.dot(table, p); });
  } else {  // SPLIT lanes per record, NB of its blocks each; the estimate is scaled by ||q||
    rerank_list<SPLIT, Part>(
        list_slot, list_dest, n_list, tid, lane, norm, out_cand, out_est,
        [&](Part& x, int32_t slot, int p) {
          x.load(signs, mags, weights, static_cast<int64_t>(slot) * H + h, p * NB);
        },
        [&](const Part& x, int p) { return x.estimate(table, p * NB); });
  }
}

}  // namespace

extern "C" int pariskv_select_rerank(const void* scores, const void* thr, const void* take,
                                     const void* ngt, const void* gt_cnt, const void* eq_cnt,
                                     const void* zend, const void* counts, const void* rtt,
                                     int64_t stride_rtt, const void* req_idx, const void* signs,
                                     const void* mags, const void* weights, const void* qb,
                                     const void* qn, const void* levels, const void* keys,
                                     const void* query, int G, int key_dtype, void* cand,
                                     void* est, int64_t zone_start, int64_t nmax, int nch,
                                     int64_t cmax, int R, int H, int B, int chunk, void* stream) {
  if (R == 0) return 0;
  if (chunk != CH) return -3;  // the count pass must use the same chunk
  if (static_cast<int64_t>(nch) * CH < nmax) return -4;
  dim3 grid(static_cast<unsigned>(nch), static_cast<unsigned>(R * H));
  auto st = static_cast<cudaStream_t>(stream);
#define PARISKV_LAUNCH(BB, K, KT, QT)                                                         \
  select_rerank_kernel<BB, K, KT, QT><<<grid, THREADS, 0, st>>>(                              \
      static_cast<const uint8_t*>(scores), static_cast<const int32_t*>(thr),                  \
      static_cast<const int32_t*>(take), static_cast<const int32_t*>(ngt),                    \
      static_cast<const int32_t*>(gt_cnt), static_cast<const int32_t*>(eq_cnt),               \
      static_cast<const int64_t*>(zend), static_cast<const int64_t*>(counts),                 \
      static_cast<const int32_t*>(rtt), stride_rtt, static_cast<const int32_t*>(req_idx),     \
      static_cast<const uint8_t*>(signs), static_cast<const uint8_t*>(mags),                  \
      static_cast<const __half*>(weights), static_cast<const float*>(qb),                     \
      static_cast<const float*>(qn), static_cast<const float*>(levels),                       \
      static_cast<const KT*>(keys), static_cast<const QT*>(query), G,                         \
      static_cast<int32_t*>(cand), static_cast<float*>(est), zone_start, nmax, nch, cmax, H)
  // key_dtype: 0 the code rerank; else the keys' and the queries' dtypes, 1 fp16, 2 bf16,
  // as 1 + key + 2 * query (1: fp16 / fp16, 2: bf16 / fp16, 3: fp16 / bf16, 4: bf16 / bf16).
#define PARISKV_DISPATCH(BB)                                   \
  switch (key_dtype) {                                         \
    case 0: PARISKV_LAUNCH(BB, false, __half, __half); break;  \
    case 1: PARISKV_LAUNCH(BB, true, __half, __half); break;   \
    case 2: PARISKV_LAUNCH(BB, true, __nv_bfloat16, __half); break; \
    case 3: PARISKV_LAUNCH(BB, true, __half, __nv_bfloat16); break; \
    case 4: PARISKV_LAUNCH(BB, true, __nv_bfloat16, __nv_bfloat16); break; \
    default: return -5;                                        \
  }
  if (B == 16) {
    PARISKV_DISPATCH(16);
  } else if (B == 8) {
    PARISKV_DISPATCH(8);
  } else {
    return -2;
  }
#undef PARISKV_DISPATCH
#undef PARISKV_LAUNCH
  return static_cast<int>(cudaGetLastError());
}
