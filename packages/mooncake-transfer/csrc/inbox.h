// Received notifications, FIFO per (peer, tag), with blocking matched receive.
//
// Notifications from one peer carry a sequence number and may come over two channels (TCP, and
// a same-host shared-memory ring); delivery follows the sequence, so order is kept across them.
// Waiters sleep on this engine's doorbell futex (shared memory), which same-host senders ring
// directly. A waiter for a specific peer wakes with PeerDead the moment that peer is marked dead.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "common.h"
#include "shm_channel.h"

namespace mooncake::transfer {

struct Message {
  int64_t order = 0;  // when it arrived (ring: when it was sent); orders queues of different peers
  std::shared_ptr<const std::string> peer;
  uint64_t tag = 0;
  std::string data;
};
using MessagePtr = std::shared_ptr<Message>;

class Inbox {
 public:
  Inbox();

  // Delivers one notification with the sender's sequence number (0 = unordered).
  void push(const std::shared_ptr<const std::string>& peer, uint64_t seq, uint64_t tag, std::string data);
  // Starts reading a same-host sender's ring.
  void add_ring(const std::shared_ptr<const std::string>& peer, std::unique_ptr<RingReader> ring);
  // Moves ring records into the queues (the I/O thread calls it on every tick).
  void drain();

  // peer == nullptr / tag == nullptr: any. Returns null on timeout. Throws TransferErr(kPeerDead) when
  // `peer` is dead and nothing matching is queued, TransferErr(kGeneric) when the engine closed.
  MessagePtr recv(const std::string* peer, const uint64_t* tag, int64_t deadline);
  // First queued message (lowest arrival order) with `tag` from any of `peers`.
  MessagePtr recv_any(const std::vector<std::string>& peers, uint64_t tag, int64_t deadline);
  // One message with `tag` from each of `peers` (a message round). Messages whose bytes
  // [key_off, key_off + key.size()) compare below `key` (byte-wise) are stale and dropped; the first
  // other one is the peer's result (a shorter message counts as not stale). out[i] = the message, or
  // null with dead[i] = the reason when peers[i] is dead with nothing queued, or null with dead[i]
  // empty when the deadline passed first. Returns when every peer is resolved or at the deadline.
  void recv_round(const std::vector<std::string>& peers, uint64_t tag, int64_t deadline, size_t key_off,
                  const std::string& key, std::vector<MessagePtr>& out, std::vector<std::string>& dead);

  // How long a waiting receiver polls before it sleeps (see inbox.cc).
  void set_spin_ns(int64_t ns) { spin_ns_.store(ns < 0 ? 0 : ns, std::memory_order_relaxed); }
  int64_t spin_ns() const { return spin_ns_.load(std::memory_order_relaxed); }

  void mark_dead(const std::string& peer, const std::string& reason);
  void forget(const std::string& peer);  // drops its queued messages, rings and dead mark
  void close();
  size_t queued();

  const SharedRegion& doorbell_region() const { return *doorbell_region_; }
  // Takes this engine's liveness lock (see DoorbellWord::alive); called once by the I/O thread,
  // which then holds it until it ends.
  void hold_liveness();
  // Tells peers watching the liveness lock that its release will be a clean close (Engine::close).
  void mark_closing() { bell_->closing.store(1, std::memory_order_release); }

 private:
  struct Ring {
    std::shared_ptr<const std::string> peer;
    std::unique_ptr<RingReader> reader;
  };
  struct PeerOrder {
    uint64_t expected = 1;
    std::map<uint64_t, MessagePtr> held;  // arrived ahead of a gap
  };

  template <class TryTake>
  MessagePtr wait_loop(TryTake try_take, int64_t deadline);
  MessagePtr take_min_locked(std::vector<std::deque<MessagePtr>*>& cands);
  void deliver_locked(const std::shared_ptr<const std::string>& peer, uint64_t seq, uint64_t tag, int64_t stamp,
                      std::string data);
  void enqueue_locked(MessagePtr m);
  bool drain_locked();

  std::mutex mu_;
  std::atomic<int64_t> spin_ns_;
  std::shared_ptr<SharedRegion> doorbell_region_;
  DoorbellWord* bell_;
  // tag -> peer -> FIFO
  std::unordered_map<uint64_t, std::unordered_map<std::string, std::deque<MessagePtr>>> q_;
  std::unordered_map<std::string, PeerOrder> order_;
  std::vector<Ring> rings_;
  std::unordered_map<std::string, std::string> dead_;  // peer -> reason
  bool closed_ = false;
};

}  // namespace mooncake::transfer
