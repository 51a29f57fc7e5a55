// Host proxy: ring consumer thread, signal applier, host producer helpers (see proxy.h).
#include "proxy.h"

#include <sched.h>
#include <time.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace mooncake::transfer {

using device::ProxyDesc;
using device::ProxyRingHeader;

namespace {

void sleep_ns(int64_t ns) {
  timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
  nanosleep(&ts, nullptr);
}

inline void bump(uint64_t* counter) {
  // Written by the one consumer thread only; release so a reader that sees the count also sees
  // the effect it counts.
  __atomic_store_n(counter, __atomic_load_n(counter, __ATOMIC_RELAXED) + 1, __ATOMIC_RELEASE);
}

const char* op_name(uint8_t op) {
  switch (op) {
    case device::kProxyPut:
      return "PUT";
    case device::kProxyPutValue:
      return "PUT_VALUE";
    case device::kProxySignal:
      return "SIGNAL";
    case device::kProxySignalAdd:
      return "SIGNAL_ADD";
  }
  return "?";
}

}  // namespace

// ---- ProxyRing ------------------------------------------------------------------------------

ProxyRing::ProxyRing(uint32_t capacity, uint32_t num_peers) {
  if (capacity < 2 || capacity > device::kProxyRingMaxCapacity || (capacity & (capacity - 1)) != 0)
    throw std::invalid_argument("capacity must be a power of two in [2, " +
                                std::to_string(device::kProxyRingMaxCapacity) + "], got " +
                                std::to_string(capacity));
  if (num_peers < 1 || num_peers > device::kProxyRingMaxPeers)
    throw std::invalid_argument("num_peers must be in [1, " + std::to_string(device::kProxyRingMaxPeers) +
                                "], got " + std::to_string(num_peers));
  bytes_ = device::proxy_ring_bytes(capacity, num_peers);
  void* mem = nullptr;
  if (posix_memalign(&mem, 4096, bytes_) != 0 || mem == nullptr)
    throw TransferErr(ErrKind::kGeneric, "", "proxy ring: cannot allocate " + std::to_string(bytes_) + " bytes");
  device::proxy_ring_init(mem, capacity, num_peers);
  hdr_ = static_cast<ProxyRingHeader*>(mem);
}

ProxyRing::~ProxyRing() { std::free(hdr_); }

device::ProxyPostResult proxy_post(ProxyRing& r, const ProxyDesc& d, double timeout_s, uint64_t* ticket) {
  const int64_t deadline = timeout_s < 0 ? INT64_MAX
                                         : device::proxy_host_now_ns() + static_cast<int64_t>(timeout_s * 1e9);
  return device::proxy_ring_post_host(r.hdr(), d, deadline, ticket);
}

size_t proxy_post_many(ProxyRing& r, const ProxyDesc* d, size_t n, double timeout_s,
                       device::ProxyPostResult* stopped_by) {
  *stopped_by = device::kProxyPosted;
  for (size_t i = 0; i < n; ++i) {
    // The deadline is per descriptor: it bounds how long the ring may stay full.
    const auto res = proxy_post(r, d[i], timeout_s, nullptr);
    if (res != device::kProxyPosted) {
      *stopped_by = res;
      return i;
    }
  }
  return n;
}

// ---- HostProxy ------------------------------------------------------------------------------

HostProxy::HostProxy(std::shared_ptr<Engine> engine, std::shared_ptr<ProxyRing> ring,
                     std::shared_ptr<LocalSegment> local, std::vector<std::shared_ptr<RemoteSeg>> peers,
                     ProxyConfig cfg)
    : engine_(std::move(engine)),
      ring_(std::move(ring)),
      hdr_(ring_ ? ring_->hdr() : nullptr),
      local_(std::move(local)),
      cfg_(cfg),
      peers_(std::move(peers)),
      put_failed_(peers_.size(), 0),
      reset_(peers_.size()) {
  if (!engine_) throw std::invalid_argument("engine must not be None");
  if (!ring_) throw std::invalid_argument("ring must not be None");
  if (!local_) throw std::invalid_argument("local must be a Segment, got None");
  if (peers_.size() != hdr_->num_peers)
    throw std::invalid_argument("peers: the ring has " + std::to_string(hdr_->num_peers) + " peer slots, got " +
                                std::to_string(peers_.size()) + " segments");
  // A None entry is a peer index that has no receive segment (the producer's own rank, whose
  // traffic a GPU keeps on the device): descriptors naming it are dropped as invalid.
  if (!(cfg_.op_timeout_s > 0) || cfg_.op_timeout_s > 3600)
    throw std::invalid_argument("op_timeout must be in (0, 3600] seconds, got " + std::to_string(cfg_.op_timeout_s));
  if (cfg_.idle_sleep_max_ns < 1000 || cfg_.idle_sleep_max_ns > 100000000)
    throw std::invalid_argument("idle_sleep_us must be in [1, 100000], got " +
                                std::to_string(cfg_.idle_sleep_max_ns / 1000));
  if (cfg_.max_inflight < 1 || cfg_.max_inflight > (1u << 20))
    throw std::invalid_argument("max_inflight must be in [1, 1048576], got " + std::to_string(cfg_.max_inflight));
  for (auto& r : reset_) r.store(0);
  next_ticket_ = device::proxy_load_acquire(&hdr_->tail);
}

HostProxy::~HostProxy() {
  stop(0.5);
  if (wait_settled(0.5) == 0) return;
  // A put the engine still holds reads its source after we are gone: a PUT_VALUE's source is the
  // `value` inside its deque entry. Leak the entries (moving a deque keeps its elements where
  // they are) rather than let the engine read freed memory; a few bytes, only after a peer
  // stalled past both deadlines.
  new std::deque<Inflight>(std::move(inflight_));
}

void HostProxy::start() {
  std::lock_guard<std::mutex> g(stop_mu_);
  if (thread_.joinable()) return;
  if (stop_.load() || device::proxy_load_acquire(&hdr_->closed) != 0)
    throw TransferErr(ErrKind::kGeneric, "", "proxy: the ring is closed (a stopped proxy cannot restart)");
  running_.store(true);
  thread_ = std::thread([this] { run(); });
}

void HostProxy::stop(double drain_s) {
  std::lock_guard<std::mutex> g(stop_mu_);
  device::proxy_store_release(&hdr_->closed, 1);
  if (!thread_.joinable()) {
    stop_.store(true);
    return;
  }
  drain_deadline_ = now_ns() + static_cast<int64_t>(std::max(0.0, std::min(drain_s, 3600.0)) * 1e9);
  stop_.store(true);
  thread_.join();
  running_.store(false);
}

void HostProxy::set_peer(uint32_t i, std::shared_ptr<RemoteSeg> seg) {
  if (i >= peers_.size())
    throw std::invalid_argument("peer must be in [0, " + std::to_string(peers_.size()) + "), got " +
                                std::to_string(i));
  {
    std::lock_guard<std::mutex> g(peers_mu_);
    peers_[i] = std::move(seg);
  }
  reset_[i].store(1);
}

std::shared_ptr<RemoteSeg> HostProxy::peer_seg(uint32_t i) {
  std::lock_guard<std::mutex> g(peers_mu_);
  return peers_[i];
}

std::string HostProxy::last_drop() {
  std::lock_guard<std::mutex> g(drop_mu_);
  return last_drop_;
}

void HostProxy::drop(uint32_t peer, const std::string& why, bool count_peer) {
  if (count_peer) bump(device::proxy_dropped(hdr_) + peer);
  std::lock_guard<std::mutex> g(drop_mu_);
  last_drop_ = why;
}

void HostProxy::complete(uint32_t peer) { bump(device::proxy_completed(hdr_) + peer); }

bool HostProxy::take(uint64_t t, ProxyDesc& out) {
  ProxyDesc* s = device::proxy_slots(hdr_) + (t & (hdr_->capacity - 1));
  if (device::proxy_load_acquire(&s->seq) != t + 1) return false;
  out.dst_offset = s->dst_offset;
  out.src = s->src;
  out.len = s->len;
  out.peer = s->peer;
  out.op = s->op;
  out.flags = s->flags;
  out.seq = t + 1;
  return true;
}

void HostProxy::publish_retired(uint64_t next_ticket) {
  const uint64_t r = inflight_.empty() ? next_ticket : inflight_.front().ticket;
  device::proxy_store_release(&hdr_->retired, r);
}

void HostProxy::retire_done() {
  while (!inflight_.empty()) {
    Inflight& e = inflight_.front();
    const Status s = e.batch->poll();
    if (s == Status::kPending) break;
    if (s == Status::kDone) {
      complete(e.peer);
    } else {
      put_failed_[e.peer] = 1;
      drop(e.peer, "put to peer " + std::to_string(e.peer) + " failed: " + format_error(e.batch->error()));
    }
    inflight_.pop_front();
  }
  publish_retired(next_ticket_);
}

bool HostProxy::wait_batch(Batch& b, int64_t deadline) {
  for (;;) {
    const int64_t now = now_ns();
    const int64_t slice = std::min<int64_t>(deadline, now + 10000000);  // re-check stop every 10 ms
    if (b.wait(slice) != Status::kTimeout) return true;
    if (stop_.load(std::memory_order_relaxed) || now_ns() >= deadline) return false;
  }
}

bool HostProxy::wait_peer_puts(uint32_t peer, std::string& why) {
  const int64_t deadline = now_ns() + static_cast<int64_t>(cfg_.op_timeout_s * 1e9);
  for (auto& e : inflight_) {
    if (e.peer != peer) continue;
    if (!wait_batch(*e.batch, deadline)) {
      why = stop_.load() ? "proxy stopping while an earlier put was in flight"
                         : "an earlier put did not finish within op_timeout";
      return false;
    }
    if (e.batch->poll() == Status::kFailed) {
      why = "an earlier put failed: " + format_error(e.batch->error());
      return false;
    }
  }
  return true;
}

void HostProxy::handle(const ProxyDesc& d, uint64_t ticket) {
  const uint32_t n = static_cast<uint32_t>(put_failed_.size());
  const uint32_t p = d.peer;
  if (p >= n) {
    invalid.fetch_add(1, std::memory_order_relaxed);
    drop(0, "descriptor " + std::to_string(ticket) + ": peer " + std::to_string(p) + " is not in [0, " +
                std::to_string(n) + ")", false);
    return;
  }
  if (reset_[p].load(std::memory_order_relaxed) && reset_[p].exchange(0)) put_failed_[p] = 0;
  std::shared_ptr<RemoteSeg> seg = peer_seg(p);
  if (!seg) {
    invalid.fetch_add(1, std::memory_order_relaxed);
    drop(p, "descriptor " + std::to_string(ticket) + " (" + op_name(d.op) + "): peer " + std::to_string(p) +
                " has no receive segment");
    return;
  }
  const std::shared_ptr<Peer>& peer = seg->peer;
  const uint64_t rlen = seg->desc.length;
  auto bad = [&](const std::string& why) {
    invalid.fetch_add(1, std::memory_order_relaxed);
    drop(p, "descriptor " + std::to_string(ticket) + " (" + op_name(d.op) + "): " + why);
  };
  if (d.op < device::kProxyPut || d.op > device::kProxySignalAdd) {
    bad("unknown op " + std::to_string(d.op));
    return;
  }
  if (peer->dead()) {
    drop(p, "peer " + std::to_string(p) + " ('" + peer->name + "') is dead");
    return;
  }
  if (d.op == device::kProxyPut || d.op == device::kProxyPutValue) {
    const uint64_t len = d.op == device::kProxyPut ? d.len : 8;
    if (d.op == device::kProxyPut && len == 0) {
      complete(p);
      return;
    }
    if (d.op == device::kProxyPut && (d.src > local_->length || len > local_->length - d.src)) {
      bad("src " + std::to_string(d.src) + " + len " + std::to_string(len) + " exceeds the local segment length " +
          std::to_string(local_->length));
      return;
    }
    if (d.dst_offset > rlen || len > rlen - d.dst_offset) {
      bad("dst_offset " + std::to_string(d.dst_offset) + " + len " + std::to_string(len) +
          " exceeds the peer's segment length " + std::to_string(rlen));
      return;
    }
    if (inflight_.size() >= cfg_.max_inflight) {
      Inflight& front = inflight_.front();
      wait_batch(*front.batch, now_ns() + static_cast<int64_t>(cfg_.op_timeout_s * 1e9));
      retire_done();
    }
    inflight_.push_back(Inflight{ticket, p, d.src, nullptr});
    Inflight& e = inflight_.back();
    std::vector<Op> ops(1);
    ops[0].write = true;
    ops[0].seg = seg;
    ops[0].offset = d.dst_offset;
    ops[0].len = len;
    ops[0].local = d.op == device::kProxyPut ? local_->addr + d.src : reinterpret_cast<uint8_t*>(&e.value);
    try {
      e.batch = engine_->submit(ops);
    } catch (const std::exception& ex) {
      inflight_.pop_back();
      put_failed_[p] = 1;
      drop(p, std::string("put to peer ") + std::to_string(p) + " not started: " + ex.what());
    }
    return;
  }
  // SIGNAL / SIGNAL_ADD.
  if (d.dst_offset % 8 != 0 || d.dst_offset > rlen || rlen - d.dst_offset < 8) {
    bad("signal word at " + std::to_string(d.dst_offset) + " is not an aligned 8-byte word inside the peer's " +
        std::to_string(rlen) + "-byte segment");
    return;
  }
  std::string why;
  if (put_failed_[p]) {
    drop(p, "signal to peer " + std::to_string(p) + " dropped: an earlier put to it failed");
    return;
  }
  if (!wait_peer_puts(p, why)) {
    put_failed_[p] = 1;
    drop(p, "signal to peer " + std::to_string(p) + " dropped: " + why);
    return;
  }
  if (peer->dead()) {
    drop(p, "peer " + std::to_string(p) + " ('" + peer->name + "') is dead");
    return;
  }
  if (seg->kind == TransportKind::kShm && seg->map) {
    auto* w = reinterpret_cast<uint64_t*>(seg->map->base + d.dst_offset);
    if (d.op == device::kProxySignal) __atomic_store_n(w, d.src, __ATOMIC_RELEASE);
    else __atomic_fetch_add(w, d.src, __ATOMIC_RELEASE);
    signals_shm.fetch_add(1, std::memory_order_relaxed);
    complete(p);
    return;
  }
  ProxySignalMsg m{kProxySignalMagic, d.op, cfg_.epoch, seg->desc.seg_id, d.dst_offset, d.src};
  try {
    engine_->notify(peer->name, &m, sizeof(m), kProxySignalTag);
  } catch (const std::exception& ex) {
    drop(p, std::string("signal to peer ") + std::to_string(p) + " not sent: " + ex.what());
    return;
  }
  signals_notify.fetch_add(1, std::memory_order_relaxed);
  complete(p);
}

void HostProxy::run() {
  uint32_t idle = 0;
  int64_t nap = 0;
  while (!stop_.load(std::memory_order_relaxed)) {
    ProxyDesc d;
    if (take(next_ticket_, d)) {
      const uint64_t t = next_ticket_++;
      device::proxy_store_release(&hdr_->tail, next_ticket_);  // the slot is free again
      consumed.fetch_add(1, std::memory_order_relaxed);
      try {
        handle(d, t);
      } catch (const std::exception& ex) {  // never let one descriptor end the thread
        drop(d.peer < put_failed_.size() ? d.peer : 0, std::string("descriptor failed: ") + ex.what(),
             d.peer < put_failed_.size());
      }
      retire_done();
      idle = 0;
      nap = 0;
      continue;
    }
    if (!inflight_.empty()) retire_done();
    // Idle: spin briefly, then yield, then sleep with a growing nap (2-core machines).
    ++idle;
    if (idle < 64) continue;
    if (idle < 256) {
      sched_yield();
      continue;
    }
    nap = nap == 0 ? 2000 : std::min<int64_t>(nap * 2, cfg_.idle_sleep_max_ns);
    sleep_ns(nap);
  }
  // Stopping: give puts in flight until the drain deadline, then count the rest as dropped.
  while (!inflight_.empty() && now_ns() < drain_deadline_) {
    retire_done();
    if (!inflight_.empty()) sleep_ns(100000);
  }
  retire_done();
  // What is left: the front is pending, entries behind it may have finished. Count each once;
  // keep every entry (the engine may still read a pending PUT_VALUE's source, and erasing from
  // the middle of a deque would move it) until wait_settled() or the destructor sees it settle.
  size_t pending = 0;
  for (auto& e : inflight_) {
    const Status s = e.batch->poll();
    if (s == Status::kDone) {
      complete(e.peer);
    } else if (s == Status::kFailed) {
      drop(e.peer, "put to peer " + std::to_string(e.peer) + " failed: " + format_error(e.batch->error()));
    } else {
      ++pending;
      drop(e.peer, "proxy stopped with the put still in flight (it may still land)");
    }
  }
  unsettled.store(pending);
  device::proxy_store_release(&hdr_->retired, next_ticket_);  // every descriptor is accounted for
}

size_t HostProxy::count_unsettled() {
  while (!inflight_.empty() && inflight_.front().batch->poll() != Status::kPending) inflight_.pop_front();
  size_t n = 0;
  for (auto& e : inflight_)
    if (e.batch->poll() == Status::kPending) ++n;
  unsettled.store(n);
  return n;
}

size_t HostProxy::wait_settled(double timeout_s) {
  std::lock_guard<std::mutex> g(stop_mu_);  // the thread is joined: inflight_ is ours
  if (running_.load())
    throw TransferErr(ErrKind::kGeneric, "", "proxy: wait_settled() needs a stopped proxy (call stop() first)");
  const int64_t deadline = now_ns() + static_cast<int64_t>(std::max(0.0, std::min(timeout_s, 3600.0)) * 1e9);
  for (;;) {
    const size_t n = count_unsettled();
    if (n == 0 || now_ns() >= deadline) return n;
    for (auto& e : inflight_) {
      if (e.batch->poll() != Status::kPending) continue;
      e.batch->wait(std::min<int64_t>(deadline, now_ns() + 10000000));  // bounded slice
      break;
    }
  }
}

// ---- ProxySignalApplier ---------------------------------------------------------------------

ProxySignalApplier::ProxySignalApplier(std::shared_ptr<Engine> engine,
                                       std::vector<std::shared_ptr<LocalSegment>> segs, uint16_t epoch)
    : epoch_(epoch), engine_(std::move(engine)), segs_(std::move(segs)) {
  if (!engine_) throw std::invalid_argument("engine must not be None");
  for (size_t i = 0; i < segs_.size(); ++i)
    if (!segs_[i]) throw std::invalid_argument("segments[" + std::to_string(i) + "] must be a Segment, got None");
}

ProxySignalApplier::~ProxySignalApplier() { stop(); }

void ProxySignalApplier::start() {
  if (thread_.joinable()) return;
  stop_.store(false);
  thread_ = std::thread([this] { run(); });
}

void ProxySignalApplier::stop() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
}

void ProxySignalApplier::run() {
  const uint64_t tag = kProxySignalTag;
  while (!stop_.load(std::memory_order_relaxed)) {
    MessagePtr m;
    try {
      m = engine_->recv_notify(nullptr, &tag, 0.05);  // 50 ms slices: stop() is seen promptly
    } catch (const std::exception&) {
      if (engine_->is_closed()) return;
      sleep_ns(10000000);
      continue;
    }
    if (!m) continue;
    ProxySignalMsg s;
    if (m->data.size() != sizeof(s)) {
      rejected.fetch_add(1);
      continue;
    }
    std::memcpy(&s, m->data.data(), sizeof(s));
    if (s.magic != kProxySignalMagic || (s.op != device::kProxySignal && s.op != device::kProxySignalAdd) ||
        s.offset % 8 != 0) {
      rejected.fetch_add(1);
      continue;
    }
    // A signal of another membership epoch (sent before the last update_ep_member and delivered
    // after the buffer was zeroed) must not touch the new epoch's counters.
    if (s.epoch != epoch_.load(std::memory_order_relaxed)) {
      stale_epoch.fetch_add(1);
      rejected.fetch_add(1);
      continue;
    }
    LocalSegment* seg = nullptr;
    for (auto& sp : segs_)
      if (sp->id == s.seg_id) seg = sp.get();
    if (!seg || s.offset > seg->length || seg->length - s.offset < 8) {
      rejected.fetch_add(1);
      continue;
    }
    auto* w = reinterpret_cast<uint64_t*>(seg->addr + s.offset);
    if (s.op == device::kProxySignal) __atomic_store_n(w, s.value, __ATOMIC_RELEASE);
    else __atomic_fetch_add(w, s.value, __ATOMIC_RELEASE);
    applied.fetch_add(1);
  }
}

}  // namespace mooncake::transfer
