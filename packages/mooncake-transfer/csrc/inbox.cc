#include "inbox.h"

#include <sched.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace mooncake::transfer {

namespace {
// How long a receiver polls before it sleeps on the doorbell futex, per wait call (across
// doorbell bumps for other messages), unless Inbox::set_spin_ns says otherwise. Waking a sleeper
// costs tens of microseconds on the virtualised 2-core machines, longer than the Python work
// between the messages of one op, so the default covers that gap; with more busy processes than
// cores, spinning takes CPU from the process being waited for (set_spin_ns(0) there).
// MOONCAKE_TRANSFER_SPIN_US sets the default (0 = sleep at once).
int64_t default_spin_ns() {
  static const int64_t ns = [] {
    const char* v = std::getenv("MOONCAKE_TRANSFER_SPIN_US");
    const long us = v && *v ? std::strtol(v, nullptr, 10) : 200;
    return static_cast<int64_t>(us < 0 ? 0 : us) * 1000;
  }();
  return ns;
}

// Spinning must not keep the peer we wait for off the CPU (2-core machines run several ranks):
// yield so a runnable thread of this CPU goes first; with nothing else runnable it returns at once.
// Measured on the 2-core machines: notify ping-pong median 25 us with yield, 73 us with a pure
// pause loop (the spinner kept the answering process waiting for the CPU).
inline void spin_pause() { sched_yield(); }

// Keeps the doorbell's sleeper count right on every exit path (including exceptions).
struct Sleeper {
  DoorbellWord* d;
  explicit Sleeper(DoorbellWord* b) : d(b) { d->sleepers.fetch_add(1, std::memory_order_seq_cst); }
  ~Sleeper() { d->sleepers.fetch_sub(1, std::memory_order_seq_cst); }
};
}  // namespace

Inbox::Inbox() : spin_ns_(default_spin_ns()) {
  doorbell_region_ = SharedRegion::create("mooncake-doorbell-" + std::to_string(getpid()), 4096);
  bell_ = new (doorbell_region_->base()) DoorbellWord;
  bell_->seq.store(0);
  bell_->sleepers.store(0);
  bell_->alive_armed.store(0);
  bell_->closing.store(0);
  pthread_mutexattr_t a;
  pthread_mutexattr_init(&a);
  pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(&bell_->alive, &a);
  pthread_mutexattr_destroy(&a);
}

void Inbox::hold_liveness() {
  if (pthread_mutex_lock(&bell_->alive) == 0) bell_->alive_armed.store(1, std::memory_order_release);
}

void Inbox::enqueue_locked(MessagePtr m) {
  const std::string& name = *m->peer;
  q_[m->tag][name].push_back(std::move(m));
}

void Inbox::deliver_locked(const std::shared_ptr<const std::string>& peer, uint64_t seq, uint64_t tag,
                           int64_t stamp, std::string data) {
  auto m = std::make_shared<Message>();
  m->order = stamp;
  m->peer = peer;
  m->tag = tag;
  m->data = std::move(data);
  if (seq == 0) {
    enqueue_locked(std::move(m));
    return;
  }
  PeerOrder& o = order_[*peer];
  if (seq < o.expected) return;  // duplicate
  if (seq > o.expected && !dead_.count(*peer)) {
    o.held.emplace(seq, std::move(m));
    return;
  }
  enqueue_locked(std::move(m));
  o.expected = seq + 1;
  while (!o.held.empty() && (o.held.begin()->first == o.expected || dead_.count(*peer))) {
    o.expected = o.held.begin()->first + 1;
    enqueue_locked(std::move(o.held.begin()->second));
    o.held.erase(o.held.begin());
  }
}

bool Inbox::drain_locked() {
  bool any = false;
  for (size_t i = 0; i < rings_.size();) {
    Ring& r = rings_[i];
    bool ok = r.reader->drain([&](uint64_t seq, uint64_t tag, int64_t stamp, const uint8_t* p, size_t n) {
      deliver_locked(r.peer, seq, tag, stamp, std::string(reinterpret_cast<const char*>(p), n));
      any = true;
    });
    if (!ok) {
      rings_.erase(rings_.begin() + static_cast<long>(i));  // corrupt: the peer falls back to nothing
      continue;
    }
    ++i;
  }
  return any;
}

void Inbox::push(const std::shared_ptr<const std::string>& peer, uint64_t seq, uint64_t tag, std::string data) {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (closed_) return;
    const bool gap = seq != 0 && seq > order_[*peer].expected;
    deliver_locked(peer, seq, tag, now_ns(), std::move(data));
    if (gap) drain_locked();  // the missing ones may be waiting in the ring
  }
  ring_doorbell(bell_);
}

void Inbox::add_ring(const std::shared_ptr<const std::string>& peer, std::unique_ptr<RingReader> ring) {
  std::lock_guard<std::mutex> g(mu_);
  rings_.push_back(Ring{peer, std::move(ring)});
}

void Inbox::drain() {
  bool any;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (rings_.empty()) return;
    any = drain_locked();
  }
  if (any) ring_doorbell(bell_);
}

void Inbox::mark_dead(const std::string& peer, const std::string& reason) {
  {
    std::lock_guard<std::mutex> g(mu_);
    dead_[peer] = reason;
    drain_locked();
    // Nothing more can fill a gap now: release what was held, in order.
    auto o = order_.find(peer);
    if (o != order_.end()) {
      for (auto& kv : o->second.held) enqueue_locked(std::move(kv.second));
      o->second.held.clear();
    }
  }
  ring_doorbell(bell_);
}

void Inbox::forget(const std::string& peer) {
  std::lock_guard<std::mutex> g(mu_);
  dead_.erase(peer);
  order_.erase(peer);
  for (size_t i = 0; i < rings_.size();) {
    if (*rings_[i].peer == peer) rings_.erase(rings_.begin() + static_cast<long>(i));
    else ++i;
  }
  for (auto it = q_.begin(); it != q_.end();) {
    it->second.erase(peer);
    it = it->second.empty() ? q_.erase(it) : std::next(it);
  }
}

void Inbox::close() {
  {
    std::lock_guard<std::mutex> g(mu_);
    closed_ = true;
  }
  ring_doorbell(bell_);
}

size_t Inbox::queued() {
  std::lock_guard<std::mutex> g(mu_);
  size_t n = 0;
  for (auto& t : q_)
    for (auto& p : t.second) n += p.second.size();
  return n;
}

MessagePtr Inbox::take_min_locked(std::vector<std::deque<MessagePtr>*>& cands) {
  std::deque<MessagePtr>* best = nullptr;
  for (auto* d : cands)
    if (!d->empty() && (!best || d->front()->order < best->front()->order)) best = d;
  if (!best) return nullptr;
  MessagePtr m = std::move(best->front());
  best->pop_front();
  if (best->empty()) {
    // Drop empty queues so many distinct tags do not accumulate.
    auto t = q_.find(m->tag);
    if (t != q_.end()) {
      t->second.erase(*m->peer);
      if (t->second.empty()) q_.erase(t);
    }
  }
  return m;
}

template <class TryTake>
MessagePtr Inbox::wait_loop(TryTake try_take, int64_t deadline) {
  std::unique_lock<std::mutex> lk(mu_);
  int64_t spin_end = -1;
  for (;;) {
    if (closed_) throw TransferErr(ErrKind::kGeneric, "", "engine closed");
    if (!rings_.empty()) drain_locked();
    if (MessagePtr m = try_take()) return m;  // may throw PeerDead
    const int64_t now = now_ns();
    if (now >= deadline) return nullptr;
    if (spin_end < 0) spin_end = std::min(deadline, now + spin_ns_.load(std::memory_order_relaxed));
    if (now < spin_end) {
      const uint32_t v = bell_->seq.load(std::memory_order_acquire);
      lk.unlock();
      // Same-host senders bump the doorbell after publishing; TCP deliveries do too.
      while (bell_->seq.load(std::memory_order_acquire) == v && now_ns() < spin_end) spin_pause();
      lk.lock();
      continue;
    }
    Sleeper s(bell_);
    const uint32_t v = bell_->seq.load(std::memory_order_seq_cst);
    if (!rings_.empty()) drain_locked();
    if (MessagePtr m = try_take()) return m;
    if (closed_) throw TransferErr(ErrKind::kGeneric, "", "engine closed");
    lk.unlock();
    wait_doorbell(bell_, v, deadline);
    lk.lock();
  }
}

MessagePtr Inbox::recv(const std::string* peer, const uint64_t* tag, int64_t deadline) {
  std::vector<std::deque<MessagePtr>*> cands;
  auto try_take = [&]() -> MessagePtr {
    cands.clear();
    if (tag) {
      auto t = q_.find(*tag);
      if (t != q_.end()) {
        if (peer) {
          auto p = t->second.find(*peer);
          if (p != t->second.end()) cands.push_back(&p->second);
        } else {
          for (auto& p : t->second) cands.push_back(&p.second);
        }
      }
    } else {
      for (auto& t : q_) {
        if (peer) {
          auto p = t.second.find(*peer);
          if (p != t.second.end()) cands.push_back(&p->second);
        } else {
          for (auto& p : t.second) cands.push_back(&p.second);
        }
      }
    }
    if (MessagePtr m = take_min_locked(cands)) return m;
    if (peer) {
      auto d = dead_.find(*peer);
      if (d != dead_.end()) throw TransferErr(ErrKind::kPeerDead, *peer, d->second);
    }
    return nullptr;
  };
  return wait_loop(try_take, deadline);
}

MessagePtr Inbox::recv_any(const std::vector<std::string>& peers, uint64_t tag, int64_t deadline) {
  std::vector<std::deque<MessagePtr>*> cands;
  cands.reserve(peers.size());
  auto try_take = [&]() -> MessagePtr {
    cands.clear();
    auto t = q_.find(tag);
    if (t != q_.end()) {
      for (const auto& name : peers) {
        auto p = t->second.find(name);
        if (p != t->second.end()) cands.push_back(&p->second);
      }
    }
    if (MessagePtr m = take_min_locked(cands)) return m;
    if (!dead_.empty()) {
      for (const auto& name : peers) {
        auto d = dead_.find(name);
        if (d != dead_.end()) throw TransferErr(ErrKind::kPeerDead, name, d->second);
      }
    }
    return nullptr;
  };
  return wait_loop(try_take, deadline);
}

void Inbox::recv_round(const std::vector<std::string>& peers, uint64_t tag, int64_t deadline, size_t key_off,
                       const std::string& key, std::vector<MessagePtr>& out, std::vector<std::string>& dead) {
  const size_t n = peers.size();
  out.assign(n, nullptr);
  dead.assign(n, std::string());
  std::vector<char> done(n, 0);
  size_t left = n;
  // wait_loop returns what try_take returns: this marker ends the wait once every peer is resolved.
  static const MessagePtr kAllResolved = std::make_shared<Message>();
  auto stale = [&](const Message& m) {
    if (key.empty() || m.data.size() < key_off + key.size()) return false;
    return std::memcmp(m.data.data() + key_off, key.data(), key.size()) < 0;
  };
  auto try_take = [&]() -> MessagePtr {
    auto t = q_.find(tag);
    for (size_t i = 0; i < n; ++i) {
      if (done[i]) continue;
      if (t != q_.end()) {
        auto p = t->second.find(peers[i]);
        if (p != t->second.end()) {
          auto& dq = p->second;
          while (!dq.empty()) {
            MessagePtr m = std::move(dq.front());
            dq.pop_front();
            if (stale(*m)) continue;
            out[i] = std::move(m);
            break;
          }
          if (dq.empty()) {
            t->second.erase(p);
            if (t->second.empty()) {
              q_.erase(t);
              t = q_.end();
            }
          }
          if (out[i]) {
            done[i] = 1;
            --left;
            continue;
          }
        }
      }
      auto d = dead_.find(peers[i]);
      if (d != dead_.end()) {
        dead[i] = d->second.empty() ? "dead" : d->second;
        done[i] = 1;
        --left;
      }
    }
    return left == 0 ? kAllResolved : nullptr;
  };
  if (n) wait_loop(try_take, deadline);
}

}  // namespace mooncake::transfer
