// Native fault points (see faults.h).
#include "faults.h"

#include <signal.h>
#include <unistd.h>

#include <cstdlib>

namespace mooncake::transfer {

namespace detail {
std::atomic<uint64_t> g_fault_nth[kFaultPoints] = {};
}  // namespace detail

namespace {
std::atomic<uint64_t> g_fault_hits[kFaultPoints] = {};
}  // namespace

void arm_fault(FaultPoint p, uint64_t nth) {
  const int i = static_cast<int>(p);
  detail::g_fault_nth[i].store(0, std::memory_order_relaxed);
  g_fault_hits[i].store(0, std::memory_order_relaxed);
  detail::g_fault_nth[i].store(nth, std::memory_order_release);
}

void disarm_faults() {
  for (int i = 0; i < kFaultPoints; ++i) arm_fault(static_cast<FaultPoint>(i), 0);
}

bool fault_point_of(const std::string& name, FaultPoint& out) {
  if (name == "send") out = FaultPoint::kSend;
  else if (name == "land") out = FaultPoint::kLand;
  else if (name == "then") out = FaultPoint::kThen;
  else if (name == "cma") out = FaultPoint::kCma;
  else return false;
  return true;
}

uint64_t fault_hits(FaultPoint p) { return g_fault_hits[static_cast<int>(p)].load(std::memory_order_relaxed); }

void detail::fault_count(FaultPoint p) {
  const int i = static_cast<int>(p);
  const uint64_t nth = g_fault_nth[i].load(std::memory_order_acquire);
  if (nth == 0) return;  // disarmed meanwhile
  if (g_fault_hits[i].fetch_add(1, std::memory_order_acq_rel) + 1 < nth) return;
  ::kill(::getpid(), SIGKILL);
  std::_Exit(128 + SIGKILL);  // not reached: SIGKILL to this process ends every thread
}

}  // namespace mooncake::transfer
