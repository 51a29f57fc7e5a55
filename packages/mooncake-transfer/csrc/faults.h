// Native fault points: a test hook that makes this process kill itself (SIGKILL, a real
// kill -9) the n-th time it passes a point inside the engine's message paths, so failure tests
// can stop a process between two peers' messages of one call. Process-wide (every engine of the
// process counts into the same counters).
//
//   kSend  after each notification this process sent (notify, notify_many, the messages of
//          exchange_round's rounds and its `then` message): the message was handed to the
//          same-host ring or the peer's socket before the kill.
//   kLand  after each message a round took: landed at its destination by exchange_round, or
//          returned by exchange_round / recv_round.
//   kThen  after each `then` message of exchange_round.
//   kCma   inside each CMA copy to a guarded segment, after its in-flight count was raised and
//          the segment found registered, before the copy (a peer dying in mid-copy).
//
// Disarmed, a hit costs one relaxed atomic load.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

namespace mooncake::transfer {

enum class FaultPoint : int { kSend = 0, kLand = 1, kThen = 2, kCma = 3 };
constexpr int kFaultPoints = 4;

// Arms `p` to kill the process at its `nth` hit from now (nth >= 1; 0 disarms it). Resets the
// point's hit count either way.
void arm_fault(FaultPoint p, uint64_t nth);
// Disarms every point.
void disarm_faults();
// FaultPoint of a name ("send", "land", "then", "cma"); false for any other name.
bool fault_point_of(const std::string& name, FaultPoint& out);
// Hits counted at `p` since it was last armed.
uint64_t fault_hits(FaultPoint p);

namespace detail {
extern std::atomic<uint64_t> g_fault_nth[kFaultPoints];  // 0: disarmed
void fault_count(FaultPoint p);
}  // namespace detail

inline void fault_hit(FaultPoint p) {
  if (detail::g_fault_nth[static_cast<int>(p)].load(std::memory_order_relaxed) == 0) return;
  detail::fault_count(p);
}

}  // namespace mooncake::transfer
