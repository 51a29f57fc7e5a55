// Engine data path: submit (per-transport dispatch), notify, receive, same-host copy worker.
#include <pthread.h>
#include <time.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <thread>

#include "engine.h"
#include "faults.h"

namespace mooncake::transfer {

namespace {
// Same-host batches up to this size are copied inline by the caller (lowest latency); larger
// ones go to the copy worker so submit() stays asynchronous.
constexpr uint64_t kInlineCopyBytes = 256 * 1024;
// notify() waits for earlier same-host copies to the peer; they are memcpys, so this is generous.
constexpr int64_t kNotifyOrderWaitNs = 60LL * 1000000000LL;
}  // namespace

const char* transport_name(TransportKind k) {
  switch (k) {
    case TransportKind::kTcp:
      return "tcp";
    case TransportKind::kShm:
      return "shm";
    case TransportKind::kCma:
      return "cma";
    case TransportKind::kRdma:
      return "rdma";
    case TransportKind::kUcx:
      return "ucx";
  }
  return "?";
}

void Engine::local_op_done(Peer& p) {
  if (p.local_inflight.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    std::lock_guard<std::mutex> g(p.mu);
    p.cv.notify_all();
  }
}

void Engine::run_local(const Op& op, const std::shared_ptr<Batch>& b) {
  op.seg->transport->post(op, b);
  local_op_done(*op.seg->peer);
}

std::shared_ptr<Batch> Engine::submit(std::vector<Op>& ops) {
  if (closing_.load()) throw TransferErr(ErrKind::kGeneric, "", "engine closed");
  auto b = std::make_shared<Batch>(static_cast<int>(ops.size()));
  uint64_t local_bytes = 0;
  size_t local_n = 0;
  for (auto& op : ops) {
    if (op.seg->kind == TransportKind::kShm || op.seg->kind == TransportKind::kCma) {
      local_bytes += op.len;
      ++local_n;
      op.seg->peer->local_inflight.fetch_add(1, std::memory_order_acq_rel);
    }
  }
  const bool inline_copy = local_bytes <= kInlineCopyBytes;
  std::vector<const Op*> deferred;
  for (auto& op : ops) {
    if (op.seg->kind == TransportKind::kShm || op.seg->kind == TransportKind::kCma) {
      if (inline_copy) run_local(op, b);
      else deferred.push_back(&op);
    } else if (op.len == 0) {
      b->complete_ok();
    } else if (op.seg->kind == TransportKind::kUcx) {
      // Counted like same-host copies: notify() waits for them (a UCX write is complete when its
      // data is in the owner's memory, so a later notify cannot overtake it).
      op.seg->peer->local_inflight.fetch_add(1, std::memory_order_acq_rel);
      op.seg->transport->post(op, b);
    } else {
      op.seg->transport->post(op, b);
    }
  }
  if (!deferred.empty()) {
    std::lock_guard<std::mutex> g(copier_mu_);
    if (copier_stop_) {
      for (auto* op : deferred) {
        b->complete_err(ErrorInfo{ErrKind::kGeneric, op->seg->peer->name, "engine closed"});
        local_op_done(*op->seg->peer);
      }
      return b;
    }
    for (auto* op : deferred) copier_q_.emplace_back(*op, b);
    if (!copier_.joinable()) copier_ = std::thread([this] { copier_loop(); });
  }
  if (!deferred.empty()) copier_cv_.notify_one();
  (void)local_n;
  return b;
}

void Engine::copier_loop() {
  std::unique_lock<std::mutex> lk(copier_mu_);
  for (;;) {
    while (copier_q_.empty() && !copier_stop_) copier_cv_.wait(lk);
    if (copier_q_.empty()) return;
    auto task = std::move(copier_q_.front());
    copier_q_.pop_front();
    if (copier_stop_) {
      lk.unlock();
      task.second->complete_err(ErrorInfo{ErrKind::kGeneric, task.first.seg->peer->name, "engine closed"});
      local_op_done(*task.first.seg->peer);
      lk.lock();
      continue;
    }
    lk.unlock();
    run_local(task.first, task.second);
    lk.lock();
  }
}

void Engine::notify(const std::string& peer_name, const void* data, size_t len, uint64_t tag) {
  if (closing_.load()) throw TransferErr(ErrKind::kGeneric, "", "engine closed");
  if (len > kMaxNotifyPayload)
    throw std::invalid_argument("data: notify payload of " + std::to_string(len) + " bytes exceeds the limit of " +
                                std::to_string(kMaxNotifyPayload) + " bytes");
  auto p = require_peer(peer_name);
  if (p->dead()) throw TransferErr(p->dead_error());
  if (p->local_inflight.load(std::memory_order_acquire) > 0) {
    // Ordering: same-host copies issued before this notify must have landed.
    std::unique_lock<std::mutex> lk(p->mu);
    const int64_t deadline = now_ns() + kNotifyOrderWaitNs;
    while (p->local_inflight.load(std::memory_order_acquire) > 0 && !p->dead()) {
      int64_t left = deadline - now_ns();
      if (left <= 0)
        throw TransferErr(ErrKind::kTimeout, peer_name, "notify: earlier same-host transfers did not finish");
      p->cv.wait_for(lk, std::chrono::nanoseconds(std::min<int64_t>(left, 100000000)));
    }
  }
  auto c = p->get_conn();
  if (!c || p->dead()) throw TransferErr(p->dead_error());
  std::lock_guard<std::mutex> g(p->notify_mu);
  const uint64_t seq = ++p->notify_seq;  // the receiver delivers in this order, whatever the channel
  // Same-host fast path: the shared ring, unless a TCP write to this peer is still unacknowledged
  // (an acknowledged write has landed; an unacknowledged one could be overtaken).
  if (p->ring_state.load(std::memory_order_acquire) == Peer::kRingReady && len <= kRingMaxPayload &&
      c->writes_inflight() == 0 && p->ring->push(seq, tag, data, len)) {
    ring_doorbell(reinterpret_cast<DoorbellWord*>(p->their_doorbell->base()));
    notify_ring_sent.fetch_add(1, std::memory_order_relaxed);
    fault_hit(FaultPoint::kSend);
    return;
  }
  if (p->ring_state.load(std::memory_order_acquire) == Peer::kRingNone) offer_ring(p, *c);
  SendItem it;
  it.hdr = make_header(kNotify, 0, static_cast<uint32_t>(len), 0, tag, seq);
  it.data = static_cast<const uint8_t*>(data);
  it.len = len;
  if (!c->send(&it, 1, /*copy_rest=*/true)) throw TransferErr(p->dead_error());
  notify_tcp_sent.fetch_add(1, std::memory_order_relaxed);
  fault_hit(FaultPoint::kSend);
}

bool liveness_lock_enabled();  // MOONCAKE_TRANSFER_LIVENESS_LOCK=0 turns the watchers off

void Engine::offer_ring(const std::shared_ptr<Peer>& sp, Connection& c) {
  Peer& p = *sp;
  p.ring_state.store(Peer::kRingOff);  // unless everything below works
  if (!cfg_.notify_ring || !p.same_host || p.doorbell_fd == UINT32_MAX) return;
  std::string why;
  auto bell = SharedRegion::open_peer(p.pid, static_cast<int>(p.doorbell_fd), p.doorbell_name, 4096, why);
  if (!bell) {
    log(kLogDebug, "no notify ring to '" + p.name + "': " + why);
    return;
  }
  if (liveness_lock_enabled()) watch_liveness(sp, bell);
  std::unique_ptr<RingWriter> ring;
  try {
    ring = std::make_unique<RingWriter>("mooncake-ring-" + token_ + "-" + std::to_string(++ring_counter_));
  } catch (const TransferErr& e) {
    log(kLogDebug, std::string("no notify ring to '") + p.name + "': " + e.what());
    return;
  }
  Writer w;
  w.u32(static_cast<uint32_t>(ring->region().fd()));
  w.str(ring->region().name());
  p.their_doorbell = std::move(bell);
  p.ring = std::move(ring);
  SendItem it;
  it.owned = std::move(w.data());
  it.len = it.owned.size();
  it.hdr = make_header(kRingOffer, 0, static_cast<uint32_t>(it.len), 0, kRingBytes);
  // Offered before sending: the answer (-> Ready) may come back before send() returns.
  p.ring_state.store(Peer::kRingOffered);
  if (!c.send(&it, 1, false)) p.ring_state.store(Peer::kRingOff);
}

bool liveness_lock_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("MOONCAKE_TRANSFER_LIVENESS_LOCK");
    return !(v && std::string(v) == "0");
  }();
  return on;
}

void Engine::watch_liveness(const std::shared_ptr<Peer>& p, std::shared_ptr<SharedRegion> bell) {
  std::weak_ptr<Peer> weak = p;
  std::shared_ptr<WatchLink> link = watch_link_;
  std::thread([weak, link, bell = std::move(bell)] {
    auto* d = reinterpret_cast<DoorbellWord*>(bell->base());
    // Ends when the engine closes, the peer record goes away, or the lock is released.
    auto gone = [&] {
      std::lock_guard<std::mutex> g(link->mu);
      auto sp = weak.lock();
      return link->engine == nullptr || !sp || sp->dead();
    };
    while (d->alive_armed.load(std::memory_order_acquire) == 0) {  // the owner takes it at start
      if (gone()) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    for (;;) {
      timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      ts.tv_nsec += 100 * 1000 * 1000;  // re-check `gone` every 100 ms
      if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec += 1;
        ts.tv_nsec -= 1000000000;
      }
      const int rc = pthread_mutex_timedlock(&d->alive, &ts);
      if (rc == ETIMEDOUT) {
        if (gone()) return;
        continue;
      }
      if (rc == EOWNERDEAD) pthread_mutex_consistent(&d->alive);
      if (rc == EOWNERDEAD || rc == 0) pthread_mutex_unlock(&d->alive);  // the next watcher's turn
      if (rc != EOWNERDEAD && rc != 0) return;  // unusable lock: leave it to the other signals
      // The owner flags a clean close before it sends BYE and before its lock is released: the
      // lock can still win the race against reading that BYE from the socket, so the verdict is
      // the BYE's (info level). Without the flag the process died or exited without closing.
      const bool clean = d->closing.load(std::memory_order_acquire) != 0;
      const char* reason = clean ? Engine::kReasonBye : "process exited (its liveness lock was released)";
      std::lock_guard<std::mutex> g(link->mu);
      auto sp = weak.lock();
      if (link->engine && sp) link->engine->mark_dead(sp, reason, true);
      return;
    }
  }).detach();
}

MessagePtr Engine::recv_notify(const std::string* peer, const uint64_t* tag, double timeout_s) {
  return inbox_.recv(peer, tag, deadline_after(timeout_s));
}

MessagePtr Engine::recv_notify_any(const std::vector<std::string>& peers, uint64_t tag, double timeout_s) {
  return inbox_.recv_any(peers, tag, deadline_after(timeout_s));
}

}  // namespace mooncake::transfer
