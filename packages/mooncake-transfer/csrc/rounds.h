// Typed message rounds over an engine's notifications: the generic primitive small collectives
// are built on. A round sends one message to each of a set of peers and takes one message from
// each (stale messages dropped by a key); exchange_round can also *land* the messages that equal
// an expected header (copying their payload to per-peer addresses), run a second round, send a
// closing `then` message and fold the landed rows. No collective protocol lives here: callers
// choose what the messages mean.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "inbox.h"

namespace mooncake::transfer {

class Engine;

// Per-peer outcome of a round. The values are part of the Python API (mooncake.transfer.RoundStatus).
enum class RoundStatus : int {
  kMessage = 0,     // a message that did not land: returned as is
  kDead = 1,        // the peer is DEAD and nothing was queued from it
  kTimeout = 2,     // nothing from the peer before the deadline
  kLanded = 3,      // the message equalled the expectation; its payload was copied to the peer's dest
  kSendFailed = 4,  // this side's message could not be sent (dead, closed); nothing was read from it
};
constexpr int kRoundStatusCount = 5;

struct RoundResult {
  RoundStatus status = RoundStatus::kTimeout;
  MessagePtr msg;      // kMessage
  std::string reason;  // kDead, kSendFailed
};

// Optional fold of exchange_round: out = member rows folded left to right (reduce_rows), the
// member order being the peers in order with this rank's own row inserted before peers[self_pos].
struct RoundReduce {
  int dtype = 0;  // 0: no fold; else kRF32..kRI64 (reduce.h)
  int op = 0;
  size_t count = 0;  // elements; count * element size == RoundSpec::dest_len
  const void* self = nullptr;
  void* out = nullptr;  // may equal self
  size_t self_pos = 0;  // <= peers.size()
};

struct RoundSpec {
  std::vector<std::string> peers;
  uint64_t tag = 0;
  // Round 1's message: head_len bytes at head, then payload_len bytes at payload (joined once).
  const void* head = nullptr;
  size_t head_len = 0;
  const void* payload = nullptr;
  size_t payload_len = 0;
  double timeout_s = -1;  // < 0: no deadline; counted from the call
  // Stale-message key: a message whose bytes [key_offset, key_offset + key.size()) compare below
  // `key` (memcmp) is dropped (Inbox::recv_round).
  size_t key_offset = 0;
  std::string key;
  // A round-1 message lands when it is exactly `expect` followed by dest_len bytes; the bytes go
  // to dests[i] (raw addresses, one per peer; needed when dest_len > 0). dests[i] == 0: peer i's
  // message lands when it is exactly `expect` (a header without payload; not with a fold).
  std::string_view expect;
  std::vector<int64_t> dests;
  size_t dest_len = 0;
  // Round 2, run only when every round-1 message landed and `second` is not empty: `second` is
  // sent, and a message lands when it equals `second`. It waits until timeout_s (from the call)
  // or at least second_min_timeout_s.
  std::string_view second;
  double second_min_timeout_s = 0;
  // >= 0: round 2 (and the fold and `then` after it) runs only if it starts within this many
  // seconds after round 1's messages were sent; otherwise the call returns after round 1 (1 round,
  // every peer kLanded) and the caller goes on step by step. < 0: no limit.
  double second_max_delay_s = -1;
  // Sent to every peer when every message of the last round run landed (after the fold; send
  // failures ignored).
  std::string_view then;
  RoundReduce reduce;
};

// Throws std::invalid_argument naming the field (with the Python argument names) when `s` is not
// a valid spec: dests/dest_len, payload address, reduce fields, second_min_timeout.
void check_round_spec(const RoundSpec& s);

// One or two rounds as described on RoundSpec; `s` must have passed check_round_spec. Fills
// `out` with one result per peer of the last round run and returns the number of rounds run
// (1 or 2). Never throws for peer failures (they are results).
int exchange_round(Engine& e, const RoundSpec& s, std::vector<RoundResult>& out);

// Receive-only round: one message with `tag` from each peer (stale ones dropped by key), until
// every peer is resolved or the timeout (< 0: none) passes. Results: kMessage, kDead, kTimeout.
void recv_round(Engine& e, const std::vector<std::string>& peers, uint64_t tag, double timeout_s,
                size_t key_offset, const std::string& key, std::vector<RoundResult>& out);

// One outgoing message: `hlen` bytes at `head`, then `len` bytes at `payload`, joined into `buf`
// only when `len` > 0. Returns the message's address and size.
std::pair<const void*, size_t> join_message(const void* head, size_t hlen, const void* payload, size_t len,
                                            std::string& buf);

}  // namespace mooncake::transfer
