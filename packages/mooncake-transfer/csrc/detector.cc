#include "detector.h"

#include <algorithm>

namespace mooncake::transfer {

FailureDetector::FailureDetector(int64_t interval_ns, int64_t timeout_ns)
    : interval_(interval_ns), timeout_(timeout_ns) {
  // The loop wakes at least every interval; a gap well beyond that means we were not running.
  stall_limit_ = std::max<int64_t>(timeout_ / 2, 3 * interval_);
}

bool FailureDetector::begin_tick(int64_t now) {
  bool stalled = last_tick_ != 0 && now - last_tick_ > stall_limit_;
  last_tick_ = now;
  return stalled;
}

FailureDetector::Verdict FailureDetector::judge(int64_t now, int64_t last_rx) const {
  int64_t silent = now - last_rx;
  if (silent >= timeout_) return Verdict::kDead;
  if (silent >= timeout_ / 2) return Verdict::kSuspect;
  return Verdict::kAlive;
}

int64_t FailureDetector::next_deadline(int64_t now, int64_t last_rx, int64_t last_tx) const {
  int64_t t = last_tx + interval_;
  int64_t suspect_at = last_rx + timeout_ / 2;
  int64_t dead_at = last_rx + timeout_;
  if (suspect_at > now) t = std::min(t, suspect_at);
  t = std::min(t, dead_at);
  return t;
}

}  // namespace mooncake::transfer
