// Parameters of the EP kernels (plain data, shared by host launchers and kernels; no torch).
#pragma once

#include <cstdint>

namespace mooncake {
namespace ep {

constexpr int kPhaseSend = 1;
constexpr int kPhaseRecv = 2;
constexpr int kMaxTopk = 16;              // combine_recv rows per token (layout.py MAX_TOPK)
constexpr int kMaxExperts = 32768;        // shared-memory prefix sums over (expert, rank) pairs
constexpr int kDispatchHeaderBytes = 16;
constexpr int kTracePoints = 16;  // int32 (src_token_index, topk_slot_k, 0, 0)

// Per-rank local state (device memory, not symmetric). Zeroed at setup and by update_ep_member.
// Slots indexed by `kind * 2 + half` (kind 0 dispatch, 1 combine) belong to one op at a time, so
// kernels of different ops (e.g. an async op on the comm stream next to a hook) never share them.
struct EpState {
  uint32_t seq[4];          // tag (count) of the last op of each kind *sent* on each half (0: none)
  uint32_t blocks_done[4];  // blocks of the sending kernel finished (the last one publishes seq)
  uint32_t error;           // sticky diagnostics: bit 1 = an arrival came without its count word,
                            // bit 2 = a dispatched row's index word named no token of the source
  uint32_t reserved;
  uint64_t start_ns[4];     // %globaltimer at the start of the op last sent on each kind/half
};
static_assert(sizeof(EpState) <= 256, "EpState must fit its 256-byte slot");
constexpr uint64_t kStateBytes = 256;

// Offsets (bytes from the start of the symmetric buffer) of one half's regions (layout.py).
struct HalfOffsets {
  uint64_t dispatch_send, dispatch_recv, dispatch_signals;
  uint64_t combine_send, combine_recv, combine_signals;
  uint64_t control;  // arrival counters: int64 [R][4], word src*4 + kind*2 + half
};

// Arrival counter of `src` for (kind, half) in a rank's control region. Every block of a sender's
// grid adds 1 (release) after its stores of the op, so after the op with tag t (the t-th op of
// that kind on that half) the counter is t * grid: monotonic, never cleaned, never stale.
__host__ __device__ inline uint64_t arrival_offset(const HalfOffsets& o, int src, int kind, int half) {
  return o.control + (static_cast<uint64_t>(src) * 4 + kind * 2 + half) * 8;
}

struct DispatchParams {
  const void* x;             // bf16 [N, H]
  const int64_t* topk_idx;   // [N, K]
  int* active_ranks;         // [R], read and written (0 = failed)
  void* recv_x;              // bf16 or e4m3 [L, R*T, H]
  void* recv_scales;         // fp32 [L, H/128, R*T] or int32 [L, ceil(H/512), R*T]; null for bf16
  int* recv_count;           // [L]
  int* src_info;             // [L, R*T] token index, followed by [L, R*T] topk slot k
  int64_t* layout_range;     // [L, R]
  int* cum_stats;            // [L] or null
  EpState* state;
  uint64_t* verdicts;        // [4][R] (kind*2 + half)*R + src: (tag << 1) | arrived, see decide_sources
  uint64_t* trace;           // optional [grid][kTracePoints] %globaltimer per phase (benchmarks)
  HalfOffsets off;
  uint64_t msg_bytes;
  int64_t timeout_us;        // -1: forever
  int N, T, H, K, R, L, rank, half;
  int use_fp8, round_scale, use_ue8m0;
  int phases;                // kPhaseSend | kPhaseRecv
  int tpt;                   // threads per token row
  int grid;                  // blocks of every rank's launch (the same on all ranks)
};

struct CombineParams {
  const void* x;             // bf16 [L, R*T, H] expert outputs
  const int* src_info;       // [L, R*T] token index, followed by [L, R*T] topk slot k
  const int64_t* layout_range;  // [L, R]
  const int64_t* topk_idx;   // [N, K] this rank's routing
  const float* topk_weights; // [N, K]
  int* active_ranks;         // [R]
  void* out;                 // bf16 [N, H]
  EpState* state;
  uint64_t* verdicts;
  uint64_t* trace;
  HalfOffsets off;
  int64_t timeout_us;
  int N, T, H, K, R, L, rank, half;
  int phases;
  int tpt;
  int grid;
};

}  // namespace ep
}  // namespace mooncake
