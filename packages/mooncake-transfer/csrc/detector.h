// Failure detector timing: heartbeats every `interval`; a peer silent for `timeout` is DEAD, for
// half of it SUSPECT. Connection loss is handled by the engine directly (immediate DEAD).
// Pure logic (no I/O) so the rules are in one place.
#pragma once

#include <cstdint>

#include "common.h"

namespace mooncake::transfer {

class FailureDetector {
 public:
  enum class Verdict { kAlive, kSuspect, kDead };

  FailureDetector(int64_t interval_ns, int64_t timeout_ns);

  int64_t interval_ns() const { return interval_; }
  int64_t timeout_ns() const { return timeout_; }

  // Called at every I/O loop pass. Returns true when this process itself was stalled (SIGSTOP,
  // starved) for long enough that peers' silence says nothing: their clocks must restart.
  bool begin_tick(int64_t now);

  Verdict judge(int64_t now, int64_t last_rx) const;
  bool heartbeat_due(int64_t now, int64_t last_tx) const { return now - last_tx >= interval_; }

  // Earliest time at which judge() or heartbeat_due() can change for this peer.
  int64_t next_deadline(int64_t now, int64_t last_rx, int64_t last_tx) const;

 private:
  int64_t interval_;
  int64_t timeout_;
  int64_t stall_limit_;
  int64_t last_tick_ = 0;
};

}  // namespace mooncake::transfer
