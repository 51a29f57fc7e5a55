// Dispatch: send phase (cast + per-expert slots + puts + count words + one arrival per block) and
// receive phase (wait for every live source's arrivals with a deadline, mark failed sources, pack
// rows per expert).
//
// A token goes once to each destination rank that owns any of its selected experts (message
// [src][token] of the destination's dispatch_recv), with one 8-byte index word per selection
// (token | k << 32 at row (l, src, slot) of the index table after the messages); the receive phase
// expands messages into expert rows through the index table (layout.py).
//
// Signals (see ep_params.h):
//   - dispatch_signals[l][src] at the receiver = (tag << 32) | count: src's rows for local expert
//     l, written for every (l, receiver) pair, zero counts included;
//   - arrival counter (src, dispatch, half) in the receiver's control region: every block of src's
//     grid adds 1 with release semantics after all its stores (rows and counts). The receiver
//     waits for tag * grid, then reads counts and rows. `tag` is the per-(kind, half) op number
//     kept on the device (EpState::seq), so nothing is cleaned between ops, a value left by an
//     earlier op never satisfies a later wait, and a count word whose tag differs is never used.
#pragma once

#include "ep_device.cuh"

namespace mooncake {
namespace ep {

constexpr int kDispatchKind = 0;

// Writes this thread's 16-byte chunk `c` of token `n`'s message: payload (BF16 chunk, or FP8
// chunk + the group's scale from the group's first thread) and, from chunk 0, the header.
__device__ __forceinline__ void write_dispatch_chunk(char* msg, int c, int H, bool fp8, const int4& v, const uint2& q,
                                                     float scale_inv, int n, int k) {
  if (fp8) {
    *reinterpret_cast<uint2*>(msg + kDispatchHeaderBytes + 8ull * c) = q;
    if ((c & 15) == 0) *reinterpret_cast<float*>(msg + kDispatchHeaderBytes + H + 4ull * (c >> 4)) = scale_inv;
  } else {
    *reinterpret_cast<int4*>(msg + kDispatchHeaderBytes + 16ull * c) = v;
  }
  if (c == 0) *reinterpret_cast<int4*>(msg) = make_int4(n, k, 0, 0);
}

// Every block announces its completion to every live rank: one release-add per destination, after
// a barrier, so the block's stores (and puts) are visible before the count moves.
template <class Tp>
__device__ __forceinline__ void announce_arrival(const Tp& tp, const uint64_t* s_peer, const int* s_active,
                                                 const HalfOffsets& off, int num_ranks, int rank, int kind, int half) {
  __syncthreads();
  if constexpr (FenceBeforeSignals<Tp>::value) {
    if (threadIdx.x == 0) tp.fence();  // every put of the block before every signal below
    __syncthreads();
  }
  if (threadIdx.x < 32)
    for (int r = threadIdx.x; r < num_ranks; r += 32)
      if (s_active[r] != 0) add_signal(tp, s_peer, r, arrival_offset(off, rank, kind, half), 1);  // release
}

// Shared-memory copy of active_ranks as the op found it (every thread of the block calls it).
__device__ __forceinline__ void load_active(int* s_active, const int* active_ranks, int num_ranks) {
  for (int r = threadIdx.x; r < num_ranks; r += blockDim.x) s_active[r] = ld_relaxed_sys(active_ranks + r);
}

// Each block decides, for every live source, whether all of the source's blocks arrived before
// the deadline (arrival counter >= tag * grid). The first decision for (op, source) wins: the
// verdict word becomes (tag << 1) | arrived by compare-and-swap, so every block of the grid uses
// the same answer without a grid barrier (a source arriving just at the deadline is either taken
// by all blocks or dropped by all). A source found failed is set to 0 in active_ranks.
// s_alive[src] (shared memory) = 1 when src is live and arrived, for the rest of the block.
__device__ __forceinline__ void decide_sources(const char* local_base, int* active_ranks, const int* s_active, int* s_alive,
                                               uint64_t* verdicts, const HalfOffsets& off, int num_ranks, int kind,
                                               int half, uint32_t tag, int grid, uint64_t deadline) {
  const uint64_t target = static_cast<uint64_t>(tag) * static_cast<uint64_t>(grid);
  uint64_t* mine = verdicts + static_cast<uint64_t>(kind * 2 + half) * num_ranks;
  for (int src = threadIdx.x; src < num_ranks; src += blockDim.x) {
    s_alive[src] = 0;
    if (s_active[src] == 0 || ld_relaxed_sys(active_ranks + src) == 0) continue;
    uint64_t v = atomicAdd(reinterpret_cast<unsigned long long*>(mine + src), 0ull);
    if ((v >> 1) < tag) {
      const uint64_t* word = reinterpret_cast<const uint64_t*>(local_base + arrival_offset(off, src, kind, half));
      const bool arrived = wait_until(word, [target](uint64_t a) { return a >= target; }, deadline);
      const uint64_t desired = (static_cast<uint64_t>(tag) << 1) | (arrived ? 1u : 0u);
      while ((v >> 1) < tag) {
        const uint64_t old = atomicCAS(reinterpret_cast<unsigned long long*>(mine + src), v, desired);
        v = old == v ? desired : old;
      }
    }
    if ((v & 1u) == 0) st_relaxed_sys(active_ranks + src, 0);
    else s_alive[src] = 1;
  }
  __syncthreads();
}

// kH > 0: compiled for that hidden size (one 16-byte chunk per thread when H <= 8192);
// kH == 0: any H % 128 == 0 (threads loop over chunks).
template <class Tp, int kH>
__global__ void __launch_bounds__(1024, 1) dispatch_kernel(const DispatchParams p, const Tp tp) {
  extern __shared__ int smem[];
  const int H = kH > 0 ? kH : p.H;
  const int tpt = kH > 0 ? (kH / 8 <= 1024 ? kH / 8 : 1024) : p.tpt;
  const int chunks = H / 8;
  const int E = p.L * p.R;
  const int tid = threadIdx.x, nthreads = blockDim.x, G = gridDim.x, b = blockIdx.x;
  const int half = p.half, slot_idx = kDispatchKind * 2 + p.half;
  const bool fp8 = p.use_fp8 != 0;
  EpState* st = p.state;
  const bool do_send = (p.phases & kPhaseSend) != 0, do_recv = (p.phases & kPhaseRecv) != 0;

  const uint64_t start_ns = do_send ? globaltimer_ns() : st->start_ns[slot_idx];
  trace_point(p.trace, 0);
  uint64_t* s_peer = reinterpret_cast<uint64_t*>(smem);  // [R] peer base addresses
  int* s_misc = smem + 2 * p.R;    // [0]: this op's tag
  int* s_active = s_misc + 4;      // [R] active_ranks on entry
  int* s_alive = s_active + p.R;   // [R] live and arrived (receive phase)
  int* s_work = s_alive + p.R;     // the phases' own arrays (int offset 4R + 4: 8-byte aligned)
  const int tpp = nthreads / tpt;  // token rows per pass
  const int row = tid / tpt, c0 = tid - row * tpt;
  const int per_block = (p.N + G - 1) / G;
  const int n0 = min(p.N, b * per_block), n1 = min(p.N, n0 + per_block);
  const int nk = p.N * p.K, before_end = n0 * p.K;
  // Independent loads first, so their latencies overlap: this thread's first x chunk and its
  // first routing entries.
  const bool prefetched = do_send && row < tpp && n0 + row < n1 && c0 < chunks;
  int4 first_chunk = make_int4(0, 0, 0, 0);
  if (prefetched)
    first_chunk = ld_stream_int4(reinterpret_cast<const int4*>(p.x) + static_cast<uint64_t>(n0 + row) * chunks + c0);
  constexpr int kRoutingPrefetch = 4;
  int64_t routing[kRoutingPrefetch];
#pragma unroll
  for (int u = 0; u < kRoutingPrefetch; ++u) {
    const int i = tid + u * nthreads;
    routing[u] = (do_send && i < nk) ? p.topk_idx[i] : -1;
  }
  // Values this block needs as a whole go through shared memory; the op number is read by the
  // last thread and active_ranks by the first ones, so no thread waits for two loads in a row.
  if (tid == nthreads - 1) s_misc[0] = static_cast<int>(read_tag(st, slot_idx, do_send));
  load_peers(s_peer, tp, p.R);
  load_active(s_active, p.active_ranks, p.R);
  // Send-phase arrays: [m] message addresses (8-byte words first), then the histograms.
  const int m = do_send ? (n1 - n0) * p.K : 0;
  if (do_send)
    for (int i = tid; i < 2 * E; i += nthreads) s_work[2 * m + i] = 0;  // histograms below
  __syncthreads();
  const uint32_t tag = static_cast<uint32_t>(s_misc[0]);
  trace_point(p.trace, 1);
  if (do_send) {
    if (!do_recv && b == 0 && tid == 0) st->start_ns[slot_idx] = start_ns;
    // Tokens [n0, n1) are this block's. Slot of selection (n, k) for expert e = number of
    // selections of e before it in (token, k) order: deterministic, rows arrive in token order.
    // [m] destination address of each selection's message (direct stores), 8-byte aligned.
    char** s_msg = reinterpret_cast<char**>(s_work);
    int* s_total = s_work + 2 * m;   // [E] selections per expert (all tokens)
    int* s_before = s_total + E;     // [E] selections per expert in tokens < n0
    int* s_e = s_before + E;         // [m] expert of each selection here, -1: none / destination failed
    int* s_dest = s_e + m;           // [m] its destination rank (-1 with s_e)
#pragma unroll
    for (int u = 0; u < kRoutingPrefetch; ++u) {
      const int i = tid + u * nthreads;
      const int64_t e = routing[u];
      if (i < nk && e >= 0 && e < E) {
        atomicAdd(&s_total[e], 1);
        if (i < before_end) atomicAdd(&s_before[e], 1);
      }
    }
    for (int i = tid + kRoutingPrefetch * nthreads; i < nk; i += nthreads) {
      const int64_t e = p.topk_idx[i];
      if (e >= 0 && e < E) {
        atomicAdd(&s_total[e], 1);
        if (i < before_end) atomicAdd(&s_before[e], 1);
      }
    }
    for (int i = tid; i < m; i += nthreads) {
      const int64_t e = p.topk_idx[before_end + i];
      int v = -1, d = -1;
      if (e >= 0 && e < E) {
        d = static_cast<int>(e) / p.L;
        if (s_active[d] != 0) v = static_cast<int>(e);
        else d = -1;
      }
      s_e[i] = v;
      s_dest[i] = d;
    }
    __syncthreads();
    trace_point(p.trace, 2);
    // One message per (token, destination rank), at the destination's dispatch_recv slot
    // [this rank][token]; each selection writes one index word (token | k << 32) at its row
    // (l, this rank, c) of the destination's index table instead of a message of its own.
    // s_msg[i] = the message's address for the token's first selection of that destination (the
    // one that writes the message), null for the others and for no selection.
    const uint64_t index_base = p.off.dispatch_recv + static_cast<uint64_t>(p.R) * p.T * p.msg_bytes;
    for (int i = tid; i < m; i += nthreads) {
      const int e = s_e[i];
      char* msg = nullptr;
      if (e >= 0) {
        const int dest = s_dest[i], l = e - dest * p.L;
        const int tok = i / p.K, k = i - tok * p.K, n = n0 + tok;
        int c = s_before[e];
        bool first = true;
        for (int j = 0; j < i; ++j) {
          c += (s_e[j] == e);
          if (j >= i - k) first = first && s_dest[j] != dest;
        }
        put_word(tp, s_peer, dest, index_base + ((static_cast<uint64_t>(l) * p.R + p.rank) * p.T + c) * 8ull,
                 static_cast<uint64_t>(static_cast<uint32_t>(n)) | (static_cast<uint64_t>(k) << 32));
        if (first)
          msg = peer_addr(s_peer, dest, p.off.dispatch_recv + (static_cast<uint64_t>(p.rank) * p.T + n) * p.msg_bytes);
      }
      s_msg[i] = msg;
    }
    trace_point(p.trace, 3);
    // Count words of every (expert, destination) pair, spread over the grid; each block's
    // arrival below releases the words it wrote.
    for (int e = b * nthreads + tid; e < E; e += G * nthreads) {
      const int dest = e / p.L;
      if (s_active[dest] != 0)
        put_word(tp, s_peer, dest, p.off.dispatch_signals + (static_cast<uint64_t>(e - dest * p.L) * p.R + p.rank) * 8,
                 pack_count_signal(tag, static_cast<uint32_t>(s_total[e])));
    }
    __syncthreads();
    trace_point(p.trace, 4);

    const uint64_t payload_bytes = fp8 ? ((static_cast<uint64_t>(H) + H / 32 + 15) / 16 * 16) : 2ull * H;
    for (int base = n0; base < n1; base += tpp) {
      const int n = base + row;
      const bool has = row < tpp && n < n1;
      const int sel0 = (n - n0) * p.K;
      if (has) {
        const int4* xrow = reinterpret_cast<const int4*>(p.x) + static_cast<uint64_t>(n) * chunks;
        for (int c = c0; c < chunks; c += tpt) {
          const int4 v = (prefetched && base == n0 && c == c0) ? first_chunk : ld_stream_int4(xrow + c);
          uint2 q = make_uint2(0, 0);
          float scale_inv = 0.f;
          if (fp8) {
            float f[8];
            unpack_bf16x8(v, f);
            float amax = 0.f;
#pragma unroll
            for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(f[i]));
            // 16 threads (aligned) hold one 128-channel group.
            const unsigned mask = 0xffffu << (threadIdx.x & 16u);
#pragma unroll
            for (int o = 8; o >= 1; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(mask, amax, o));
            scale_inv = fp8_scale_inv(amax, p.round_scale != 0);
            q = cast_fp8x8(f, scale_inv);
          }
          if constexpr (Tp::kDirectStore) {
            // Cast once, store straight into every destination's slot.
            for (int k = 0; k < p.K; ++k)
              if (s_msg[sel0 + k] != nullptr) write_dispatch_chunk(s_msg[sel0 + k], c, H, fp8, v, q, scale_inv, n, k);
          } else {
            char* msg = peer_addr(s_peer, p.rank, p.off.dispatch_send + static_cast<uint64_t>(n) * p.msg_bytes);
            write_dispatch_chunk(msg, c, H, fp8, v, q, scale_inv, n, 0);
          }
        }
      }
      if constexpr (!Tp::kDirectStore) {
        // Staged: the token's message is in dispatch_send; put it to each destination.
        __syncthreads();
        if (has) {
          const char* src = peer_addr(s_peer, p.rank, p.off.dispatch_send + static_cast<uint64_t>(n) * p.msg_bytes);
          for (int k = 0; k < p.K; ++k) {
            if (s_msg[sel0 + k] == nullptr) continue;  // no selection, or not the destination's first
            const int dest = s_dest[sel0 + k];
            const uint64_t off = p.off.dispatch_recv + (static_cast<uint64_t>(p.rank) * p.T + n) * p.msg_bytes;
            tp.put(dest, off + kDispatchHeaderBytes, src + kDispatchHeaderBytes, payload_bytes, c0, tpt);
            if (c0 == 0)
              tp.put_value(dest, off, static_cast<uint64_t>(static_cast<uint32_t>(n)) | (static_cast<uint64_t>(k) << 32));
          }
        }
        __syncthreads();
      }
    }
    trace_point(p.trace, 5);
    announce_arrival(tp, s_peer, s_active, p.off, p.R, p.rank, kDispatchKind, half);
    if (tid == 32) claim_tag(st, slot_idx, tag);  // after the barrier: the tag read is done
    trace_point(p.trace, 6);
  }

  if (do_recv) {
    // 1. Arrivals of every live source (deadline: the op's start + timeout); one verdict per
    //    source for the whole grid.
    const char* local_base = peer_addr(s_peer, p.rank, 0);
    decide_sources(local_base, p.active_ranks, s_active, s_alive, p.verdicts, p.off, p.R, kDispatchKind, half, tag,
                   p.grid, deadline_after(start_ns, p.timeout_us));
    trace_point(p.trace, 7);

    // 2. Rows per (local expert l, source r), pair q = l*R + r, prefix-summed in every block:
    //    row f of the flattened [L][R][count] order is row j = f - s_pref[l*R] of expert l.
    const uint64_t* sig = reinterpret_cast<const uint64_t*>(local_base + p.off.dispatch_signals);
    int* s_pref = s_work;          // [E + 1]
    int* s_tmp = s_work + E + 1;   // [32]
    for (int q = tid; q < E; q += nthreads) {
      const int r = q % p.R;
      int cnt = 0;
      if (s_alive[r] != 0) {
        const uint64_t v = __ldcg(reinterpret_cast<const unsigned long long*>(sig + q));  // after the verdicts' acquire
        if (static_cast<uint32_t>(v >> 32) == tag) cnt = min(p.T, static_cast<int>(v & 0xffffffffu));
        else atomicOr(&st->error, 2u);  // arrived without its count word: cannot happen
      }
      s_pref[q] = cnt;
    }
    __syncthreads();
    const int total = block_exclusive_scan(s_pref, E, s_tmp);
    if (tid == 0) s_pref[E] = total;
    __syncthreads();
    trace_point(p.trace, 8);
    const int RT = p.R * p.T;
    for (int q = b * nthreads + tid; q < E; q += G * nthreads) {
      const int l = q / p.R, r = q - l * p.R;
      const int base = s_pref[l * p.R];
      p.layout_range[q] = (static_cast<int64_t>(s_pref[q] - base) << 32) | static_cast<int64_t>(s_pref[q + 1] - s_pref[q]);
      if (r == 0) {
        const int count = s_pref[(l + 1) * p.R] - base;
        p.recv_count[l] = count;
        if (p.cum_stats != nullptr) p.cum_stats[l] += count;
      }
    }

    trace_point(p.trace, 9);
    // 3. One warp per (row, piece of 256 chunks): payload; piece 0 also header and scales.
    const int lane = tid & 31;
    const int warps = nthreads >> 5;
    const int groups = H / 128;
    const int words = (groups + 3) / 4;
    const int row_chunks = fp8 ? H / 16 : H / 8;
    const uint64_t row_bytes = fp8 ? static_cast<uint64_t>(H) : 2ull * H;
    const char* recv_base = local_base + p.off.dispatch_recv;
    const unsigned long long* index_table =
        reinterpret_cast<const unsigned long long*>(recv_base + static_cast<uint64_t>(p.R) * p.T * p.msg_bytes);
    // Consecutive items go to different blocks (SMs): the work spreads over the whole GPU. Items
    // are piece-major (all rows' piece 0, then piece 1, ...), so every block gets a mix of the
    // longer piece-0 items (header, scales) and plain payload pieces.
    const int pieces = (row_chunks + 255) / 256;
    const bool ue8m0 = p.use_ue8m0 != 0;
    for (int it = (tid >> 5) * G + b; it < total * pieces; it += G * warps) {
      const int piece = it / total;
      const int f = it - piece * total, first = piece * 256;
      const int q = upper_index(s_pref, E, f);
      const int l = q / p.R;
      const int j = f - s_pref[l * p.R];
      // Row (l, from, f - s_pref[q]) -> (token, k) -> the token's message from that source.
      const uint64_t word = __ldcg(index_table + static_cast<uint64_t>(q) * p.T + (f - s_pref[q]));
      int token = static_cast<int>(static_cast<uint32_t>(word));
      const int k = static_cast<int>(word >> 32);
      if (token < 0 || token >= p.T) {  // cannot happen: the row's index word is this op's
        if (lane == 0 && first == 0) atomicOr(&st->error, 4u);
        token = 0;
      }
      const int from = q - l * p.R;
      const char* msg = recv_base + (static_cast<uint64_t>(from) * p.T + token) * p.msg_bytes;
      const int4* src = reinterpret_cast<const int4*>(msg + kDispatchHeaderBytes);
      int4* dst = reinterpret_cast<int4*>(static_cast<char*>(p.recv_x) + (static_cast<uint64_t>(l) * RT + j) * row_bytes);
      // Piece 0 also moves the row's scales: their loads go out with the payload's (one round
      // trip for both); groups past the first 128 (H > 16384) take the loop after the stores.
      const bool scales_here = fp8 && first == 0;
      const uint32_t* sc = reinterpret_cast<const uint32_t*>(msg + kDispatchHeaderBytes + H);
      int4 v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u)
        if (first + u * 32 + lane < row_chunks) v[u] = ld_cg_int4(src + first + u * 32 + lane);
      uint32_t sv[4] = {0u, 0u, 0u, 0u};
      if (scales_here) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int g = ue8m0 ? 4 * lane + u : lane + 32 * u;
          if (g < groups) sv[u] = __ldcg(sc + g);
        }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u)
        if (first + u * 32 + lane < row_chunks) dst[first + u * 32 + lane] = v[u];
      if (first != 0) continue;
      if (lane == 0) {
        p.src_info[static_cast<uint64_t>(l) * RT + j] = token;
        p.src_info[static_cast<uint64_t>(p.L) * RT + static_cast<uint64_t>(l) * RT + j] = k;
        // This rank's own tokens: where combine finds their expert outputs without a copy.
        if (from == p.rank && k >= 0 && k < kMaxTopk)
          p.src_info[2ull * p.L * RT + static_cast<uint64_t>(token) * kMaxTopk + k] = j;
      }
      if (fp8) {
        // Column-major per expert ([groups, R*T]): a row's scales are R*T apart.
        if (!ue8m0) {
          float* scales = static_cast<float*>(p.recv_scales) + static_cast<uint64_t>(l) * groups * RT + j;
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int g = lane + 32 * u;
            if (g < groups) scales[static_cast<uint64_t>(g) * RT] = __uint_as_float(sv[u]);
          }
          for (int g = lane + 128; g < groups; g += 32) scales[static_cast<uint64_t>(g) * RT] = __uint_as_float(__ldcg(sc + g));
        } else {
          int* scales = static_cast<int*>(p.recv_scales) + static_cast<uint64_t>(l) * words * RT + j;
          if (lane < words) {
            uint32_t packed = 0;
#pragma unroll
            for (int u = 0; u < 4; ++u)
              if (4 * lane + u < groups) packed |= ((sv[u] >> 23) & 0xffu) << (8 * u);
            scales[static_cast<uint64_t>(lane) * RT] = static_cast<int>(packed);
          }
          for (int w = lane + 32; w < words; w += 32) {
            uint32_t packed = 0;
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              const int g = 4 * w + u;
              if (g < groups) packed |= ((__ldcg(sc + g) >> 23) & 0xffu) << (8 * u);
            }
            scales[static_cast<uint64_t>(w) * RT] = static_cast<int>(packed);
          }
        }
      }
    }
  }
  trace_point(p.trace, 10);
}

}  // namespace ep
}  // namespace mooncake
