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

#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "rerank_record.cuh"
#include "warp_scan.cuh"

namespace {

constexpr int CH = 1024;           // positions per block: the count pass's chunk
constexpr int THREADS = CH / 4;    // 4 positions per thread
constexpr int WARPS = THREADS / 32;

template <int B>
__global__ void __launch_bounds__(THREADS)
    select_rerank_kernel(const uint8_t* __restrict__ scores, const int32_t* __restrict__ thr,
                         const int32_t* __restrict__ take, const int32_t* __restrict__ ngt,
                         const int32_t* __restrict__ gt_cnt, const int32_t* __restrict__ eq_cnt,
                         const int64_t* __restrict__ zend, const int64_t* __restrict__ counts,
                         const int32_t* __restrict__ rtt, int64_t stride_rtt,
                         const int32_t* __restrict__ req_idx, const uint8_t* __restrict__ signs,
                         const uint8_t* __restrict__ mags, const __half* __restrict__ weights,
                         const float* __restrict__ qb, const float* __restrict__ qn,
                         const float* __restrict__ levels, int32_t* __restrict__ cand,
                         float* __restrict__ est, int64_t zone_start, int64_t nmax, int nch,
                         int64_t cmax, int H) {
  // SPLIT threads per candidate (adjacent lanes), NB = 4 of the record's blocks each: a
  // block keeps about 100 of its 1024 positions, so one thread each left most lanes idle
  // behind one long chain of loads and adds (36.3 us per layer at 128K x 2 in a 32-layer
  // graph; 2 threads: 34.2; 4 threads: 32.5, bench_retrieval_in_step.py).
  constexpr int NB = 4;
  constexpr int SPLIT = B / NB;
  using Part = pariskv::RecordPart<B, NB>;
  __shared__ float table[B * pariskv::kRerankTableFloats];
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
  tshare.load(qb + static_cast<int64_t>(row) * B * 8, levels, tid);
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
  tshare.store(table, tid);
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

  // The rerank: SPLIT lanes per kept record, two records per lane at a time, both loaded
  // before either is evaluated. A warp enters each round together (t0 is warp-uniform), so
  // each shuffle mask is the ballot of the lanes holding that record: whole groups of
  // SPLIT lanes, as SPLIT divides 32.
  // Sum a record's SPLIT parts over its lanes; its first lane writes the slot and estimate.
  auto finish = [&](const Part& part, int i, int b0, unsigned mask, int32_t slot) {
    float acc = part.estimate(table, b0);
#pragma unroll
    for (int off = 1; off < SPLIT; off <<= 1) acc += __shfl_xor_sync(mask, acc, off);
    if (b0 == 0) {
      const int dest = list_dest[i];
      out_cand[dest] = slot;
      out_est[dest] = acc * norm;
    }
  };
  const int tasks = SPLIT * n_list;
  for (int t0 = tid - lane; t0 < tasks; t0 += 2 * THREADS) {
    int ta = t0 + lane, tb = ta + THREADS;
    const bool la = ta < tasks, lb = tb < tasks;
    const unsigned ma = __ballot_sync(0xffffffffu, la);
    const unsigned mb = __ballot_sync(0xffffffffu, lb);
    ta = la ? ta : 0;
    tb = lb ? tb : 0;
    const int ia = ta / SPLIT, ib = tb / SPLIT;
    const int ba = (ta % SPLIT) * NB, bb = (tb % SPLIT) * NB;
    const int32_t sa = list_slot[ia], sb = list_slot[ib];
    Part pa, pb;
    if (la) pa.load(signs, mags, weights, static_cast<int64_t>(sa) * H + h, ba);
    if (lb) pb.load(signs, mags, weights, static_cast<int64_t>(sb) * H + h, bb);
    if (la) finish(pa, ia, ba, ma, sa);
    if (lb) finish(pb, ib, bb, mb, sb);
  }
}

}  // namespace

extern "C" int pariskv_select_rerank(const void* scores, const void* thr, const void* take,
                                     const void* ngt, const void* gt_cnt, const void* eq_cnt,
                                     const void* zend, const void* counts, const void* rtt,
                                     int64_t stride_rtt, const void* req_idx, const void* signs,
                                     const void* mags, const void* weights, const void* qb,
                                     const void* qn, const void* levels, void* cand, void* est,
                                     int64_t zone_start, int64_t nmax, int nch, int64_t cmax,
                                     int R, int H, int B, int chunk, void* stream) {
  if (R == 0) return 0;
  if (chunk != CH) return -3;  // the count pass must use the same chunk
  if (static_cast<int64_t>(nch) * CH < nmax) return -4;
  dim3 grid(static_cast<unsigned>(nch), static_cast<unsigned>(R * H));
  auto st = static_cast<cudaStream_t>(stream);
#define PARISKV_LAUNCH(BB)                                                                    \
  select_rerank_kernel<BB><<<grid, THREADS, 0, st>>>(                                         \
      static_cast<const uint8_t*>(scores), static_cast<const int32_t*>(thr),                  \
      static_cast<const int32_t*>(take), static_cast<const int32_t*>(ngt),                    \
      static_cast<const int32_t*>(gt_cnt), static_cast<const int32_t*>(eq_cnt),               \
      static_cast<const int64_t*>(zend), static_cast<const int64_t*>(counts),                 \
      static_cast<const int32_t*>(rtt), stride_rtt, static_cast<const int32_t*>(req_idx),     \
      static_cast<const uint8_t*>(signs), static_cast<const uint8_t*>(mags),                  \
      static_cast<const __half*>(weights), static_cast<const float*>(qb),                     \
      static_cast<const float*>(qn), static_cast<const float*>(levels),                       \
      static_cast<int32_t*>(cand), static_cast<float*>(est), zone_start, nmax, nch, cmax, H)
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
