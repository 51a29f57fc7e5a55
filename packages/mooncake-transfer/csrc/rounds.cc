// Typed message rounds (see rounds.h): the hot path of every small collective. Per call it
// allocates the result vector and the receive vectors (reused across the two rounds); the
// payload is joined once and landed payloads are copied once, straight to their destination.
#include "rounds.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>

#include "engine.h"
#include "faults.h"
#include "reduce.h"

namespace mooncake::transfer {

std::pair<const void*, size_t> join_message(const void* head, size_t hlen, const void* payload, size_t len,
                                            std::string& buf) {
  if (!len) return {head, hlen};
  buf.resize(hlen + len);
  if (hlen) std::memcpy(&buf[0], head, hlen);
  std::memcpy(&buf[hlen], payload, len);
  return {buf.data(), buf.size()};
}

void check_round_spec(const RoundSpec& s) {
  const size_t n = s.peers.size();
  if (s.payload_len > 0 && !s.payload) throw std::invalid_argument("addr is a null address");
  if (s.dest_len > 0 && s.dests.size() != n)
    throw std::invalid_argument("dests must have one address per peer (got " + std::to_string(s.dests.size()) +
                                " for " + std::to_string(n) + " peers)");
  if (s.dest_len > 0)
    for (int64_t d : s.dests) {
      if (d < 0) throw std::invalid_argument("dests holds a negative address");
      if (d == 0 && s.reduce.dtype != 0)
        throw std::invalid_argument("dests holds 0 (a header-only peer), which the reduce fold cannot take");
    }
  if (!(s.second_min_timeout_s >= 0))
    throw std::invalid_argument("second_min_timeout must be >= 0, got " + std::to_string(s.second_min_timeout_s));
  const RoundReduce& r = s.reduce;
  if (r.dtype == 0) return;
  // The fold in the round takes the 32/64-bit types (module-level reduce() takes all).
  if (r.dtype < kRF32 || r.dtype > kRI64)
    throw std::invalid_argument("reduce dtype " + std::to_string(r.dtype) + " is not 1-4");
  const std::string why = reduce_unsupported(r.dtype, r.op);
  if (!why.empty())
    throw std::invalid_argument("reduce dtype " + std::to_string(r.dtype) + " / op " + std::to_string(r.op) + " " +
                                why);
  const size_t es = reduce_elem_size(r.dtype);
  if (r.count * es != s.dest_len)
    throw std::invalid_argument("reduce count * element size (" + std::to_string(r.count * es) +
                                ") must equal dest_len (" + std::to_string(s.dest_len) + ")");
  if (r.self_pos > n) throw std::invalid_argument("reduce self_pos is past the member list");
  if (r.count > 0 && (!r.self || !r.out)) throw std::invalid_argument("reduce needs non-null self and out addresses");
}

namespace {

// A message that did not land (kMessage), or why there is none (kDead / kTimeout).
inline void take_unlanded(RoundResult& r, MessagePtr& m, std::string& dead) {
  if (m) {
    r.status = RoundStatus::kMessage;
    r.msg = std::move(m);
    fault_hit(FaultPoint::kLand);
  } else if (!dead.empty()) {
    r.status = RoundStatus::kDead;
    r.reason = std::move(dead);
  } else {
    r.status = RoundStatus::kTimeout;
  }
}

}  // namespace

void recv_round(Engine& e, const std::vector<std::string>& peers, uint64_t tag, double timeout_s,
                size_t key_offset, const std::string& key, std::vector<RoundResult>& out) {
  std::vector<MessagePtr> got;
  std::vector<std::string> gone;
  e.recv_round(peers, tag, timeout_s, key_offset, key, got, gone);
  out.clear();
  out.resize(peers.size());
  for (size_t i = 0; i < peers.size(); ++i) take_unlanded(out[i], got[i], gone[i]);
}

int exchange_round(Engine& e, const RoundSpec& s, std::vector<RoundResult>& out) {
  const size_t n = s.peers.size();
  const auto t0 = std::chrono::steady_clock::now();
  out.clear();
  out.resize(n);
  std::vector<MessagePtr> got;
  std::vector<std::string> gone;
  std::vector<std::string> live;  // only when a send failed: the peers that were reached
  std::vector<size_t> live_idx;
  auto sent_at = t0;  // when the last round's messages had all been sent

  // One round: send msg to every peer, read one message each, land the ones equal to
  // want + plen bytes. Returns how many landed.
  auto run = [&](const void* msg, size_t mlen, double wait_s, std::string_view want, size_t plen) {
    live.clear();
    live_idx.clear();
    bool all_sent = true;
    for (size_t i = 0; i < n; ++i) {
      RoundResult& r = out[i];
      r.msg.reset();
      r.reason.clear();
      try {
        e.notify(s.peers[i], msg, mlen, s.tag);
        r.status = RoundStatus::kTimeout;  // until something is read
      } catch (const TransferErr& err) {
        r.status = RoundStatus::kSendFailed;
        r.reason = err.what();
        if (all_sent) {  // from now on, list the peers reached
          all_sent = false;
          for (size_t j = 0; j < i; ++j) {
            live.push_back(s.peers[j]);
            live_idx.push_back(j);
          }
        }
        continue;
      }
      if (!all_sent) {
        live.push_back(s.peers[i]);
        live_idx.push_back(i);
      }
    }
    sent_at = std::chrono::steady_clock::now();
    const std::vector<std::string>& readers = all_sent ? s.peers : live;
    const size_t m = readers.size();
    if (m == 0) return size_t{0};
    e.recv_round(readers, s.tag, wait_s, s.key_offset, s.key, got, gone);
    size_t matched = 0;
    for (size_t j = 0; j < m; ++j) {
      const size_t i = all_sent ? j : live_idx[j];
      RoundResult& r = out[i];
      MessagePtr& msg_j = got[j];
      // dests[i] == 0: peer i sends the header alone (a broadcast's non-root).
      const size_t pl = plen && s.dests[i] == 0 ? 0 : plen;
      if (msg_j && msg_j->data.size() == want.size() + pl &&
          std::memcmp(msg_j->data.data(), want.data(), want.size()) == 0) {
        if (pl) std::memcpy(reinterpret_cast<void*>(s.dests[i]), msg_j->data.data() + want.size(), pl);
        msg_j.reset();
        r.status = RoundStatus::kLanded;
        ++matched;
        fault_hit(FaultPoint::kLand);
      } else {
        take_unlanded(r, msg_j, gone[j]);
      }
    }
    return matched;
  };

  std::string joined;
  const auto [msg, mlen] = join_message(s.head, s.head_len, s.payload, s.payload_len, joined);
  size_t matched = run(msg, mlen, s.timeout_s, s.expect, s.dest_len);
  int rounds = 1;
  if (n > 0 && matched == n && !s.second.empty() && s.second_max_delay_s >= 0 &&
      std::chrono::duration<double>(std::chrono::steady_clock::now() - sent_at).count() > s.second_max_delay_s)
    return 1;  // round 1 landed, but too late to run round 2 here: the caller continues
  if (n > 0 && matched == n && !s.second.empty()) {
    const double spent = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double wait2 = s.timeout_s < 0 ? s.timeout_s : std::max(s.timeout_s - spent, s.second_min_timeout_s);
    matched = run(s.second.data(), s.second.size(), wait2, s.second, 0);
    rounds = 2;
  }
  if (n > 0 && matched == n && s.reduce.dtype != 0 && s.reduce.count > 0) {
    const RoundReduce& rd = s.reduce;
    std::vector<const void*> parts;
    parts.reserve(n + 1);
    for (size_t i = 0; i <= n; ++i) {
      if (i == rd.self_pos) parts.push_back(rd.self);
      if (i < n) parts.push_back(reinterpret_cast<const void*>(s.dests[i]));
    }
    reduce_rows(rd.dtype, rd.op, rd.count, parts, rd.out, 1);
  }
  if (n > 0 && matched == n && !s.then.empty()) {
    for (const auto& p : s.peers) {
      try {
        e.notify(p, s.then.data(), s.then.size(), s.tag);
      } catch (const TransferErr&) {
        continue;  // a peer that died after its message: the next op finds it dead
      }
      fault_hit(FaultPoint::kThen);
    }
  }
  return rounds;
}

}  // namespace mooncake::transfer
