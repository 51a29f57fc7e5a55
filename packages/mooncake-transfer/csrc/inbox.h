// Received notifications, FIFO per (peer, tag), with blocking matched receive.
// A waiter for a specific peer wakes with PeerDead the moment that peer is marked dead.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "common.h"

namespace mooncake::transfer {

struct Message {
  uint64_t seq = 0;
  std::shared_ptr<const std::string> peer;
  uint64_t tag = 0;
  std::string data;
};
using MessagePtr = std::shared_ptr<Message>;

class Inbox {
 public:
  void push(std::shared_ptr<const std::string> peer, uint64_t tag, std::string data);

  // peer == nullptr / tag == nullptr: any. Returns null on timeout. Throws TransferErr(kPeerDead) when
  // `peer` is dead and nothing matching is queued, TransferErr(kGeneric) when the engine closed.
  MessagePtr recv(const std::string* peer, const uint64_t* tag, int64_t deadline);
  // First queued message (lowest arrival order) with `tag` from any of `peers`.
  MessagePtr recv_any(const std::vector<std::string>& peers, uint64_t tag, int64_t deadline);

  void mark_dead(const std::string& peer, const std::string& reason);
  void forget(const std::string& peer);  // drops its queued messages and its dead mark
  void close();
  size_t queued();

 private:
  template <class TryTake>
  MessagePtr wait_loop(TryTake try_take, int64_t deadline);
  MessagePtr take_min_locked(std::vector<std::deque<MessagePtr>*>& cands);

  std::mutex mu_;
  std::condition_variable cv_;
  // tag -> peer -> FIFO
  std::unordered_map<uint64_t, std::unordered_map<std::string, std::deque<MessagePtr>>> q_;
  std::unordered_map<std::string, std::string> dead_;  // peer -> reason
  uint64_t seq_ = 0;
  std::atomic<uint64_t> version_{0};
  int waiters_ = 0;
  bool closed_ = false;
};

}  // namespace mooncake::transfer
