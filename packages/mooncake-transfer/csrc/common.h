// Shared small types of the mooncake transfer core: time, errors, peer states, events.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <string>

namespace mooncake::transfer {

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

constexpr int64_t kForever = INT64_MAX;

// Deadline in steady-clock ns from a timeout in seconds (< 0 means forever).
inline int64_t deadline_after(double timeout_s) {
  if (timeout_s < 0) return kForever;
  double ns = timeout_s * 1e9;
  if (ns > 9.0e18) return kForever;
  return now_ns() + static_cast<int64_t>(ns);
}

enum class PeerState : int { kUnknown = 0, kAlive = 1, kSuspect = 2, kDead = 3 };
enum class Status : int { kPending = 0, kDone = 1, kFailed = 2, kTimeout = 3 };
enum class ErrKind : int { kGeneric = 0, kPeerDead = 1, kTimeout = 2 };

struct ErrorInfo {
  ErrKind kind = ErrKind::kGeneric;
  std::string peer;    // empty = not about one peer
  std::string reason;  // short human readable cause
};

std::string format_error(const ErrorInfo& e);

// Thrown by the core; bindings translate it to TransferError / PeerDeadError / TransferTimeout.
class TransferErr : public std::runtime_error {
 public:
  explicit TransferErr(ErrorInfo e) : std::runtime_error(format_error(e)), info(std::move(e)) {}
  TransferErr(ErrKind k, std::string peer, std::string reason)
      : TransferErr(ErrorInfo{k, std::move(peer), std::move(reason)}) {}
  ErrorInfo info;
};

std::string errno_str(int err);

// Log levels use Python's logging numbers so the Python side can forward them unchanged.
enum LogLevel : int { kLogDebug = 10, kLogInfo = 20, kLogWarning = 30, kLogError = 40 };

// A peer state change or a log record, handed to Python by polling.
struct Event {
  bool is_log = false;
  std::string text;  // peer name, or the log message
  int value = 0;     // PeerState, or the log level
};

// Bounded FIFO with a blocking pop (deadline). Drops the oldest entry when full.
class EventQueue {
 public:
  explicit EventQueue(size_t cap = 8192) : cap_(cap) {}
  void push(Event e) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (closed_) return;
      if (q_.size() >= cap_) q_.pop_front();
      q_.push_back(std::move(e));
    }
    cv_.notify_one();
  }
  // Returns false on timeout or when closed and empty.
  bool pop(Event& out, int64_t deadline) {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      if (!q_.empty()) {
        out = std::move(q_.front());
        q_.pop_front();
        return true;
      }
      if (closed_) return false;
      if (deadline == kForever) {
        cv_.wait(lk);
      } else {
        int64_t left = deadline - now_ns();
        if (left <= 0) return false;
        cv_.wait_for(lk, std::chrono::nanoseconds(left));
      }
    }
  }
  void close() {
    {
      std::lock_guard<std::mutex> g(mu_);
      closed_ = true;
    }
    cv_.notify_all();
  }
  bool closed() {
    std::lock_guard<std::mutex> g(mu_);
    return closed_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> q_;
  size_t cap_;
  bool closed_ = false;
};

}  // namespace mooncake::transfer
