// Completion of a group of transfer operations (one TransferHandle).
#pragma once

#include <sched.h>

#include <atomic>
#include <condition_variable>
#include <mutex>

#include "common.h"

namespace mooncake::transfer {

class Batch {
 public:
  explicit Batch(int ops) : remaining_(ops) {
    if (ops == 0) status_.store(static_cast<int>(Status::kDone));
  }

  void complete_ok() { finish_one(); }

  // The first error wins; the batch fails once every op has finished.
  void complete_err(const ErrorInfo& e) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (!failed_) {
        failed_ = true;
        err_ = e;
      }
    }
    finish_one();
  }

  Status poll() const { return static_cast<Status>(status_.load(std::memory_order_acquire)); }

  // Blocks until every op finished or the deadline passed (then kTimeout; the ops keep going).
  // Spins (yielding) at most ~10 us before sleeping on the condition variable.
  Status wait(int64_t deadline) {
    Status s = poll();
    if (s != Status::kPending) return s;
    const int64_t spin_end = now_ns() + 10000;
    while (now_ns() < spin_end) {
      s = poll();
      if (s != Status::kPending) return s;
      sched_yield();  // let a runnable thread of this CPU (maybe the one we wait for) go first
    }
    std::unique_lock<std::mutex> lk(mu_);
    ++waiters_;
    while ((s = poll()) == Status::kPending) {
      if (deadline == kForever) {
        cv_.wait(lk);
      } else {
        int64_t left = deadline - now_ns();
        if (left <= 0) break;
        cv_.wait_for(lk, std::chrono::nanoseconds(left));
      }
    }
    --waiters_;
    return s == Status::kPending ? Status::kTimeout : s;
  }

  ErrorInfo error() const {
    std::lock_guard<std::mutex> g(mu_);
    return err_;
  }
  bool failed() const {
    std::lock_guard<std::mutex> g(mu_);
    return failed_;
  }

  std::atomic<int64_t> value_ns{0};  // probe: measured round trip

 private:
  void finish_one() {
    if (remaining_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    std::lock_guard<std::mutex> g(mu_);
    status_.store(static_cast<int>(failed_ ? Status::kFailed : Status::kDone), std::memory_order_release);
    if (waiters_ > 0) cv_.notify_all();
  }

  std::atomic<int> remaining_;
  std::atomic<int> status_{static_cast<int>(Status::kPending)};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int waiters_ = 0;
  bool failed_ = false;
  ErrorInfo err_;
};

}  // namespace mooncake::transfer
