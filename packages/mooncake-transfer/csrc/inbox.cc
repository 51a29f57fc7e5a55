#include "inbox.h"

namespace mooncake::transfer {

namespace {
constexpr int64_t kSpinNs = 20000;  // brief spin before sleeping (ping-pong latency)
}

void Inbox::push(std::shared_ptr<const std::string> peer, uint64_t tag, std::string data) {
  auto m = std::make_shared<Message>();
  m->peer = std::move(peer);
  m->tag = tag;
  m->data = std::move(data);
  bool wake;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (closed_) return;
    m->seq = ++seq_;
    q_[tag][*m->peer].push_back(std::move(m));
    version_.fetch_add(1, std::memory_order_release);
    wake = waiters_ > 0;
  }
  if (wake) cv_.notify_all();
}

void Inbox::mark_dead(const std::string& peer, const std::string& reason) {
  {
    std::lock_guard<std::mutex> g(mu_);
    dead_[peer] = reason;
    version_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
}

void Inbox::forget(const std::string& peer) {
  std::lock_guard<std::mutex> g(mu_);
  dead_.erase(peer);
  for (auto it = q_.begin(); it != q_.end();) {
    it->second.erase(peer);
    it = it->second.empty() ? q_.erase(it) : std::next(it);
  }
}

void Inbox::close() {
  {
    std::lock_guard<std::mutex> g(mu_);
    closed_ = true;
    version_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
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
    if (!d->empty() && (!best || d->front()->seq < best->front()->seq)) best = d;
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
  bool spun = false;
  for (;;) {
    if (closed_) throw TransferErr(ErrKind::kGeneric, "", "engine closed");
    if (MessagePtr m = try_take()) return m;  // may throw PeerDead
    int64_t now = now_ns();
    if (now >= deadline) return nullptr;
    if (!spun) {
      spun = true;
      const uint64_t v = version_.load(std::memory_order_acquire);
      lk.unlock();
      const int64_t end = std::min(deadline, now + kSpinNs);
      while (version_.load(std::memory_order_acquire) == v && now_ns() < end) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      }
      lk.lock();
      continue;
    }
    ++waiters_;
    if (deadline == kForever) {
      cv_.wait(lk);
    } else {
      cv_.wait_for(lk, std::chrono::nanoseconds(deadline - now));
    }
    --waiters_;
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

}  // namespace mooncake::transfer
