// A remote engine as this engine knows it: identity, liveness and its one connection.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>

#include "common.h"
#include "connection.h"
#include "seg_guard.h"
#include "shm_channel.h"

namespace mooncake::transfer {

struct Peer {
  std::string name;
  std::shared_ptr<const std::string> name_ptr;  // shared with queued notifications
  std::string host_id;
  uint32_t pid = 0;
  std::string endpoint;
  bool same_host = false;

  std::atomic<int> state{static_cast<int>(PeerState::kUnknown)};
  std::atomic<bool> forgotten{false};  // disconnect() was called

  // Same-host copies in flight (shm/cma); notify() waits for them so it stays ordered after writes.
  std::atomic<int> local_inflight{0};

  bool dead() const { return state.load(std::memory_order_acquire) == static_cast<int>(PeerState::kDead); }

  std::shared_ptr<Connection> get_conn() {
    std::lock_guard<std::mutex> g(mu);
    return conn;
  }
  ErrorInfo dead_error() {
    std::lock_guard<std::mutex> g(mu);
    return ErrorInfo{ErrKind::kPeerDead, name, reason.empty() ? "peer is dead" : reason};
  }

  // Notifications to this peer: sequence numbers and the same-host ring (guarded by notify_mu).
  enum RingState : int { kRingNone = 0, kRingOffered = 1, kRingReady = 2, kRingOff = 3 };
  std::mutex notify_mu;
  uint64_t notify_seq = 0;
  std::atomic<int> ring_state{kRingNone};
  std::unique_ptr<RingWriter> ring;
  std::shared_ptr<SharedRegion> their_doorbell;
  uint32_t doorbell_fd = UINT32_MAX;  // from the handshake
  std::string doorbell_name;

  // This peer's CMA guard table mapped here, with our lane in it (seg_guard.h; under guard_mu).
  std::mutex guard_mu;
  std::shared_ptr<GuardMap> guard;

  std::mutex mu;
  std::condition_variable cv;  // local_inflight reached 0, or death
  std::shared_ptr<Connection> conn;
  std::string reason;  // why it died
  bool exited = false;  // it died because its process exited (seen on this host): a proof of death
};

}  // namespace mooncake::transfer
