// CMA revocation: a table in shared memory (one memfd per engine) through which the owner of a
// registered segment stops same-host peers' process_vm_writev/readv into it.
//
// The owner gives each CPU segment a slot and a generation (both in the descriptor) and writes
// the generation into the slot's word; unregister() writes 0 there (close(): kGenClosed). A peer that reaches the
// segment over CMA maps the owner's table (/proc/<pid>/fd/<n>, name checked) and, per operation:
//   count[lane][slot] += 1; gen[slot] == descriptor's generation ? syscall : refuse; count -= 1
// The owner, after clearing the word, waits until every lane's count for the slot is 0. Both
// sides use sequentially consistent atomics (a Dekker handshake): either the peer sees the
// cleared word, or the owner sees its count and waits for the copy to end. So when unregister()
// returns, no CMA access by any peer touches the memory any more.
//
// A lane belongs to one peer process (several engines of one process share it), named by a token
// (pid and process start time). A peer killed while its count is raised leaves the count behind:
// the owner discounts a lane whose process is proven gone (pidfd readable: every thread of it
// has exited, so none of its copies is still running; or the pid now names another process) and
// frees the lane (token -> kLaneBusy, counts zeroed, token -> 0), so neither unregister nor the
// lane waits for a dead process.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "shm_channel.h"

namespace mooncake::transfer {

constexpr uint32_t kGuardMagic = 0x44524147U;  // "GARD"
constexpr uint32_t kGuardVersion = 1;
constexpr uint32_t kGuardSlots = 4096;  // CPU segments registered at once that CMA can reach
constexpr uint32_t kGuardLanes = 64;    // same-host peer processes using CMA on one engine at once
constexpr size_t kGuardGenOff = 4096;
constexpr size_t kGuardCountOff = kGuardGenOff + size_t(kGuardSlots) * 8;
constexpr size_t kGuardBytes = kGuardCountOff + size_t(kGuardLanes) * kGuardSlots * 4;  // ~1 MiB, sparse
constexpr uint64_t kLaneBusy = ~uint64_t(0);  // being freed (its process is gone)
constexpr uint64_t kGenClosed = ~uint64_t(0);  // a slot's word once its engine closed

struct GuardHeader {
  uint32_t magic;
  uint32_t version;
  uint32_t slots;
  uint32_t lanes;
  alignas(64) std::atomic<uint64_t> lane_owner[kGuardLanes];  // 0 free, kLaneBusy, else a token
};
static_assert(sizeof(GuardHeader) <= kGuardGenOff, "guard header fits its page");
static_assert(sizeof(std::atomic<uint64_t>) == 8 && sizeof(std::atomic<uint32_t>) == 4, "plain atomics");

// Accessors over a mapped table (ours or a peer's).
struct GuardView {
  uint8_t* base = nullptr;
  GuardHeader* hdr() const { return reinterpret_cast<GuardHeader*>(base); }
  std::atomic<uint64_t>& gen(uint32_t slot) const {
    return reinterpret_cast<std::atomic<uint64_t>*>(base + kGuardGenOff)[slot];
  }
  std::atomic<uint32_t>& count(uint32_t lane, uint32_t slot) const {
    return reinterpret_cast<std::atomic<uint32_t>*>(base + kGuardCountOff)[size_t(lane) * kGuardSlots + slot];
  }
  // Frees `lane` if it still belongs to `token` (whose process is gone): false if someone else did.
  bool reclaim(uint32_t lane, uint64_t token) const;
};

// This process's token: pid | (start time in clock ticks, low 32 bits) << 32; 0 if unknown.
uint64_t self_process_token();
// True only when the process named by `token` is proven gone with all its threads (see above).
bool process_token_gone(uint64_t token);

// Owner side.
class GuardTable {
 public:
  // Throws TransferErr on OS failure.
  explicit GuardTable(const std::string& name);
  int fd() const { return region_->fd(); }
  const std::string& name() const { return region_->name(); }
  // A slot with a fresh generation, live from now; false when every slot is taken.
  bool acquire(uint32_t& slot, uint64_t& gen);
  // Refuses new accesses to `slot` from now (accesses already past their check may still run);
  // `closed`: because the engine closes (peers then see it gone, not the segment).
  void revoke(uint32_t slot, bool closed = false) {
    view_.gen(slot).store(closed ? kGenClosed : 0, std::memory_order_seq_cst);
  }
  // Waits until no access to `slot` is in flight (discounting gone processes); false at the deadline.
  bool drain(uint32_t slot, int64_t deadline);
  // Back to the free list (after a drain that returned true).
  void release(uint32_t slot);
  // Keeps `slot` out of use until a later check finds it idle (a drain that timed out).
  void quarantine(uint32_t slot);
  // Lanes freed because their process was gone (tests, stats).
  uint64_t dead_lanes() const { return dead_lanes_.load(std::memory_order_relaxed); }

 private:
  // One pass: true when no live process has an access to `slot` in flight.
  bool idle(uint32_t slot, bool check_dead);

  std::shared_ptr<SharedRegion> region_;
  GuardView view_;
  std::mutex mu_;
  std::vector<uint32_t> free_;
  std::vector<uint32_t> quarantined_;
  uint64_t next_gen_ = 1;
  std::atomic<uint64_t> dead_lanes_{0};
};

// Peer side: an owner's table mapped here, with this process's lane in it.
struct GuardMap {
  std::shared_ptr<SharedRegion> region;
  GuardView view;
  uint32_t lane = 0;
};

// Maps the table of the same-host engine in process `pid` and takes (or finds) this process's
// lane in it; null and `why` when not possible.
std::shared_ptr<GuardMap> open_guard(uint32_t pid, int fd, const std::string& name, std::string& why);

}  // namespace mooncake::transfer
