#include "seg_guard.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>

#include "common.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

namespace mooncake::transfer {

namespace {

// Start time (field 22 of /proc/<pid>/stat, clock ticks since boot): 0 and `start` on success,
// ENOENT/ESRCH when there is no such process, another errno when it cannot be read.
int read_start_time(pid_t pid, uint64_t& start) {
  const std::string path = "/proc/" + std::to_string(pid) + "/stat";
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno == ENOENT ? ENOENT : errno;
  char buf[1024];
  ssize_t n = ::read(fd, buf, sizeof(buf) - 1);
  const int e = errno;
  ::close(fd);
  if (n < 0) return e == ESRCH ? ESRCH : e;
  buf[n] = 0;
  const char* p = std::strrchr(buf, ')');  // the command name may hold spaces and ')'
  if (!p) return EINVAL;
  ++p;
  for (int field = 3; field <= 22; ++field) {  // p points before field `field`
    while (*p == ' ') ++p;
    if (!*p) return EINVAL;
    if (field == 22) {
      start = std::strtoull(p, nullptr, 10);
      return 0;
    }
    while (*p && *p != ' ') ++p;
  }
  return EINVAL;
}

uint64_t make_token(pid_t pid, uint64_t start) {
  return static_cast<uint32_t>(pid) | ((start & 0xFFFFFFFFULL) << 32);
}

std::mutex g_claim_mu;  // one lane per process, also with several engines claiming at once

}  // namespace

uint64_t self_process_token() {
  static std::mutex mu;
  static pid_t cached_pid = 0;
  static uint64_t cached = 0;
  std::lock_guard<std::mutex> g(mu);
  const pid_t pid = getpid();
  if (pid != cached_pid) {  // first call, or after a fork
    uint64_t start = 0;
    cached = read_start_time(pid, start) == 0 ? make_token(pid, start) : 0;
    cached_pid = pid;
  }
  return cached;
}

bool process_token_gone(uint64_t token) {
  if (token == 0 || token == kLaneBusy) return false;
  const pid_t pid = static_cast<pid_t>(token & 0xFFFFFFFFULL);
  if (pid <= 0) return false;
  // Opened before the start time is read: if the start time then matches, the pidfd is that
  // process's (the pid cannot have named another process in between and then it again).
  const int pfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (pfd < 0 && errno == ESRCH) return true;  // reaped
  uint64_t start = 0;
  const int r = read_start_time(pid, start);
  bool gone = false;
  if (r == ENOENT || r == ESRCH) {
    gone = true;  // reaped meanwhile
  } else if (r == 0 && (start & 0xFFFFFFFFULL) != (token >> 32)) {
    gone = true;  // the pid names another process now: ours was reaped
  } else if (r == 0 && pfd >= 0) {
    // Readable once the process exited and every thread of it is gone (a zombie qualifies):
    // no syscall of it (a process_vm_writev included) is still running.
    pollfd p{pfd, POLLIN, 0};
    gone = ::poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP)) != 0;
  }
  // Without pidfds (Linux < 5.3) an unreaped process is never proven gone: the wait times out.
  if (pfd >= 0) ::close(pfd);
  return gone;
}

bool GuardView::reclaim(uint32_t lane, uint64_t token) const {
  auto& owner = hdr()->lane_owner[lane];
  uint64_t expect = token;
  if (!owner.compare_exchange_strong(expect, kLaneBusy, std::memory_order_seq_cst)) return false;
  for (uint32_t s = 0; s < kGuardSlots; ++s) {
    auto& c = count(lane, s);
    if (c.load(std::memory_order_relaxed) != 0) c.store(0, std::memory_order_relaxed);
  }
  owner.store(0, std::memory_order_seq_cst);
  return true;
}

GuardTable::GuardTable(const std::string& name) {
  region_ = SharedRegion::create(name, kGuardBytes);  // zero filled
  view_.base = region_->base();
  auto* h = new (region_->base()) GuardHeader;
  for (auto& o : h->lane_owner) o.store(0, std::memory_order_relaxed);
  h->slots = kGuardSlots;
  h->lanes = kGuardLanes;
  h->version = kGuardVersion;
  h->magic = kGuardMagic;
  free_.reserve(kGuardSlots);
  for (uint32_t s = kGuardSlots; s-- > 0;) free_.push_back(s);  // slot 0 is taken first
}

bool GuardTable::acquire(uint32_t& slot, uint64_t& gen) {
  std::lock_guard<std::mutex> g(mu_);
  if (free_.empty()) {
    for (size_t i = 0; i < quarantined_.size();) {
      if (idle(quarantined_[i], true)) {
        free_.push_back(quarantined_[i]);
        quarantined_[i] = quarantined_.back();
        quarantined_.pop_back();
      } else {
        ++i;
      }
    }
  }
  if (free_.empty()) return false;
  slot = free_.back();
  free_.pop_back();
  gen = next_gen_++;
  view_.gen(slot).store(gen, std::memory_order_seq_cst);
  return true;
}

void GuardTable::release(uint32_t slot) {
  std::lock_guard<std::mutex> g(mu_);
  free_.push_back(slot);
}

void GuardTable::quarantine(uint32_t slot) {
  std::lock_guard<std::mutex> g(mu_);
  quarantined_.push_back(slot);
}

bool GuardTable::idle(uint32_t slot, bool check_dead) {
  bool busy = false;
  for (uint32_t lane = 0; lane < kGuardLanes; ++lane) {
    if (view_.count(lane, slot).load(std::memory_order_seq_cst) == 0) continue;
    const uint64_t tok = view_.hdr()->lane_owner[lane].load(std::memory_order_seq_cst);
    if (tok == kLaneBusy) continue;  // being freed: its process is gone
    if (check_dead && tok != 0 && process_token_gone(tok)) {
      if (view_.reclaim(lane, tok)) dead_lanes_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    busy = true;
  }
  return !busy;
}

bool GuardTable::drain(uint32_t slot, int64_t deadline) {
  // Accesses past their check are single syscalls: spin briefly, then poll every millisecond
  // and look for processes that died with their count raised.
  for (int round = 0;; ++round) {
    if (idle(slot, round >= 64)) return true;
    const int64_t now = now_ns();
    if (now >= deadline) return false;
    if (round < 64) {
      sched_yield();
    } else {
      const int64_t nap = std::min<int64_t>(deadline - now, 1000000);
      std::this_thread::sleep_for(std::chrono::nanoseconds(nap));
    }
  }
}

std::shared_ptr<GuardMap> open_guard(uint32_t pid, int fd, const std::string& name, std::string& why) {
  auto region = SharedRegion::open_peer(pid, fd, name, kGuardBytes, why);
  if (!region) return nullptr;
  GuardView v;
  v.base = region->base();
  GuardHeader* h = v.hdr();
  if (h->magic != kGuardMagic || h->version != kGuardVersion || h->slots != kGuardSlots ||
      h->lanes != kGuardLanes) {
    why = "the owner's CMA guard table has another layout (version " + std::to_string(h->version) + ")";
    return nullptr;
  }
  const uint64_t token = self_process_token();
  if (token == 0) {
    why = "cannot read this process's start time (/proc/self/stat)";
    return nullptr;
  }
  std::lock_guard<std::mutex> g(g_claim_mu);
  int lane = -1;
  for (uint32_t l = 0; l < kGuardLanes && lane < 0; ++l)
    if (h->lane_owner[l].load(std::memory_order_acquire) == token) lane = static_cast<int>(l);
  for (int pass = 0; pass < 2 && lane < 0; ++pass) {
    for (uint32_t l = 0; l < kGuardLanes && lane < 0; ++l) {
      uint64_t cur = h->lane_owner[l].load(std::memory_order_acquire);
      if (pass == 1 && cur != 0 && cur != kLaneBusy && process_token_gone(cur) && v.reclaim(l, cur)) cur = 0;
      if (cur != 0) continue;
      uint64_t expect = 0;
      if (h->lane_owner[l].compare_exchange_strong(expect, token, std::memory_order_seq_cst))
        lane = static_cast<int>(l);
    }
  }
  if (lane < 0) {
    why = "all " + std::to_string(kGuardLanes) + " CMA lanes of the owner are held by live processes";
    return nullptr;
  }
  auto m = std::make_shared<GuardMap>();
  m->region = std::move(region);
  m->view = v;
  m->lane = static_cast<uint32_t>(lane);
  return m;
}

}  // namespace mooncake::transfer
