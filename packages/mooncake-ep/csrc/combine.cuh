// Combine: send phase (each expert output row back to its token's rank, into that rank's
// combine_recv row (token n, slot k); one arrival per block and destination) and receive phase
// (wait for every live owner's arrivals with a deadline, mark failed owners, weighted fp32
// reduction in k order that skips them). Signalling as in dispatch.cuh (arrival counters).
#pragma once

#include "dispatch.cuh"

namespace mooncake {
namespace ep {

constexpr int kCombineKind = 1;
constexpr int kCombinePieceChunks = 8 * 32;  // 16-byte chunks a warp moves per work item

template <class Tp, int kH>
__global__ void __launch_bounds__(1024, 1) combine_kernel(const CombineParams p, const Tp tp) {
  extern __shared__ int smem[];
  const int H = kH > 0 ? kH : p.H;
  const int chunks = H / 8;  // 16-byte chunks of a bf16 row
  const int E = p.L * p.R;
  const int RT = p.R * p.T;
  const int tid = threadIdx.x, nthreads = blockDim.x, G = gridDim.x, b = blockIdx.x;
  const int lane = tid & 31, num_warps = G * (nthreads >> 5);
  const int half = p.half, slot_idx = kCombineKind * 2 + p.half;
  EpState* st = p.state;
  const bool do_send = (p.phases & kPhaseSend) != 0, do_recv = (p.phases & kPhaseRecv) != 0;

  const uint64_t start_ns = do_send ? globaltimer_ns() : st->start_ns[slot_idx];
  trace_point(p.trace, 0);
  uint64_t* s_peer = reinterpret_cast<uint64_t*>(smem);  // [R] peer base addresses
  int* s_misc = smem + 2 * p.R;    // [0]: this op's tag
  int* s_active = s_misc + 4;      // [R] active_ranks on entry
  int* s_alive = s_active + p.R;   // [R] live and arrived (receive phase)
  int* s_work = s_alive + p.R;
  if (do_send)
    for (int q = tid; q < E; q += nthreads) s_work[q] = min(p.T, static_cast<int>(p.layout_range[q] & 0xffffffff));
  if (tid == nthreads - 1) s_misc[0] = static_cast<int>(read_tag(st, slot_idx, do_send));
  load_peers(s_peer, tp, p.R);
  load_active(s_active, p.active_ranks, p.R);
  __syncthreads();
  const uint32_t tag = static_cast<uint32_t>(s_misc[0]);
  trace_point(p.trace, 1);
  // Fused launch: rows for this rank's own tokens are not copied; the reduction reads them from x
  // (self_rows, written by the dispatch). With a receive hook x may change before the hook, so
  // the send phase copies them like any other row.
  const bool local_direct = do_send && do_recv;
  const int* self_rows = p.src_info + 2ull * p.L * RT;  // [T][kMaxTopk] row of (n, k) in x
  // x is this half's combine_send region (get_next_combine_buffer): nothing to stage.
  [[maybe_unused]] const bool zero_copy = p.x == peer_addr(s_peer, p.rank, p.off.combine_send);
  if (do_send) {
    if (!do_recv && b == 0 && tid == 0) st->start_ns[slot_idx] = start_ns;
    // Rows per (local expert l, token rank r), pair q = l*R + r, straight from layout_range so
    // every block flattens the rows identically; rows for failed ranks are skipped.
    int* s_pref = s_work;         // [E + 1] (counts loaded above)
    int* s_tmp = s_pref + E + 1;  // [32]
    const int total = block_exclusive_scan(s_pref, E, s_tmp);
    if (tid == 0) s_pref[E] = total;
    __syncthreads();
    trace_point(p.trace, 2);
    // Work item = (row, piece of 256 chunks): one warp, eight 16-byte loads in flight per lane.
    const int pieces = (chunks + kCombinePieceChunks - 1) / kCombinePieceChunks;
    const int items = total * pieces;
    for (int it = (tid >> 5) * G + b; it < items; it += num_warps) {
      const int f = it / pieces, piece = it - f * pieces;
      const int q = upper_index(s_pref, E, f);
      const int l = q / p.R, r = q - l * p.R;
      if (s_active[r] == 0 || (local_direct && r == p.rank)) continue;
      const int j = static_cast<int>(p.layout_range[q] >> 32) + (f - s_pref[q]);
      if (j < 0 || j >= RT) continue;
      const int n = p.src_info[static_cast<uint64_t>(l) * RT + j];
      const int k = p.src_info[static_cast<uint64_t>(p.L) * RT + static_cast<uint64_t>(l) * RT + j];
      if (n < 0 || n >= p.T || k < 0 || k >= kMaxTopk) continue;
      const int4* src = reinterpret_cast<const int4*>(p.x) + (static_cast<uint64_t>(l) * RT + j) * chunks;
      const uint64_t dst_off = p.off.combine_recv + (static_cast<uint64_t>(n) * kMaxTopk + k) * chunks * 16;
      const int first = piece * kCombinePieceChunks;
      if constexpr (Tp::kDirectStore) {
        int4* dst = reinterpret_cast<int4*>(peer_addr(s_peer, r, dst_off));
        int4 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int c = first + u * 32 + lane;
          if (c < chunks) v[u] = ld_stream_int4(src + c);
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int c = first + u * 32 + lane;
          if (c < chunks) dst[c] = v[u];
        }
      } else {
        const int n_chunks = min(kCombinePieceChunks, chunks - first);
        const int4* from = src + first;
        if constexpr (LocalSourceOnly<Tp>::value) {
          // The transport copies from the local buffer only: stage the piece at the row's place in
          // this half's combine_send (where a zero-copy caller already wrote it).
          if (!zero_copy) {
            int4* stage = reinterpret_cast<int4*>(peer_addr(s_peer, p.rank, p.off.combine_send)) +
                          (static_cast<uint64_t>(l) * RT + j) * chunks + first;
            for (int c = lane; c < n_chunks; c += 32) stage[c] = ld_stream_int4(from + c);
            from = stage;
          }
          __syncwarp();
        }
        tp.put(r, dst_off + first * 16ull, from, n_chunks * 16ull, lane, 32);
      }
    }
    trace_point(p.trace, 3);
    announce_arrival(tp, s_peer, s_active, p.off, p.R, p.rank, kCombineKind, half);
    if (tid == 32) claim_tag(st, slot_idx, tag);  // after the barrier: the tag read is done
    trace_point(p.trace, 4);
  }

  if (do_recv) {
    // 1. Arrivals of every live owner; one verdict per owner for the whole grid, so every token
    //    sees the same failed owners (they contribute nothing, even rows that had arrived).
    const char* local_base = peer_addr(s_peer, p.rank, 0);
    decide_sources(local_base, p.active_ranks, s_active, s_alive, p.verdicts, p.off, p.R, kCombineKind, half, tag,
                   p.grid, deadline_after(start_ns, p.timeout_us));
    trace_point(p.trace, 5);

    // 2. Work item = (token, 32 chunks): lane c of the warp owns 8 channels of the token.
    const int4* recv = reinterpret_cast<const int4*>(local_base + p.off.combine_recv);
    const int per_token = (chunks + 31) / 32;
    const int items = p.N * per_token;
    for (int it = (tid >> 5) * G + b; it < items; it += num_warps) {
      const int n = it / per_token;
      const int c = (it - n * per_token) * 32 + lane;
      int ok = 0;
      float w = 0.f;
      // Lane k < K: where row (n, k) is: this rank's combine_recv, or x itself (own expert).
      const int4* row_k = recv + (static_cast<uint64_t>(n) * kMaxTopk + lane) * chunks;
      if (lane < p.K) {
        const int64_t e = p.topk_idx[static_cast<uint64_t>(n) * p.K + lane];
        if (e >= 0 && e < E && s_alive[e / p.L] != 0) {
          ok = 1;
          w = p.topk_weights[static_cast<uint64_t>(n) * p.K + lane];
          const int owner = static_cast<int>(e / p.L);
          if (local_direct && owner == p.rank) {
            const int j = self_rows[static_cast<uint64_t>(n) * kMaxTopk + lane];
            const int l = static_cast<int>(e) - owner * p.L;
            if (j >= 0 && j < RT) row_k = reinterpret_cast<const int4*>(p.x) + (static_cast<uint64_t>(l) * RT + j) * chunks;
            else ok = 0;
          }
        }
      }
      const unsigned ok_mask = __ballot_sync(0xffffffffu, ok);
      // sum_k w_k * x_k in k order, product and sum rounded separately (no FMA): the order and
      // rounding of the portable path and the reference, so BF16 results match bit for bit.
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int k0 = 0; k0 < p.K; k0 += 8) {
        int4 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int k = k0 + u;
          v[u] = make_int4(0, 0, 0, 0);
          const int4* rk = reinterpret_cast<const int4*>(__shfl_sync(0xffffffffu, reinterpret_cast<uintptr_t>(row_k), k & 31));
          if (k < p.K && ((ok_mask >> k) & 1u) && c < chunks) v[u] = ld_cg_int4(rk + c);
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int k = k0 + u;
          const float wk = __shfl_sync(0xffffffffu, w, k & 31);
          if (k < p.K && ((ok_mask >> k) & 1u)) {
            float fv[8];
            unpack_bf16x8(v[u], fv);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(wk, fv[i]));
          }
        }
      }
      if (c < chunks) reinterpret_cast<int4*>(p.out)[static_cast<uint64_t>(n) * chunks + c] = pack_bf16x8(acc);
    }
  }
  trace_point(p.trace, 6);
}

}  // namespace ep
}  // namespace mooncake
