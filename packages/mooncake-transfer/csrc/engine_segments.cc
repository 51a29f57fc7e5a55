// Engine: segments this engine owns (allocate/register/unregister, descriptors) and peers'
// segments it opens (transport choice per segment).
#include <unistd.h>

#include <cerrno>

#include "engine.h"

namespace mooncake::transfer {

std::shared_ptr<LocalSegment> Engine::allocate(uint64_t length) {
  if (closing_.load()) throw TransferErr(ErrKind::kGeneric, "", "engine closed");
  auto seg = segments_.allocate(length, token_);
  guard_segment(*seg);  // reached over shm (nothing to revoke there), or over cma when asked for
  return seg;
}

void Engine::guard_segment(LocalSegment& seg) {
  std::lock_guard<std::mutex> g(guard_mu_);
  if (!guard_ && !guard_failed_) {
    try {
      guard_ = std::make_unique<GuardTable>("mooncake-guard-" + token_);
      guard_ptr_.store(guard_.get(), std::memory_order_release);
    } catch (const TransferErr& e) {
      guard_failed_ = true;
      log(kLogWarning, std::string("no CMA guard table (") + e.what() +
                           "): same-host peers reach this engine's segments over shm or tcp, never cma");
    }
  }
  if (!guard_) return;
  uint32_t slot = 0;
  uint64_t gen = 0;
  if (!guard_->acquire(slot, gen)) {
    if (!guard_full_logged_) {
      guard_full_logged_ = true;
      log(kLogWarning, "all " + std::to_string(kGuardSlots) +
                           " CMA guard slots are in use: segments registered from now on are reached over "
                           "shm or tcp by same-host peers until some are unregistered");
    }
    return;
  }
  seg.guard_slot = static_cast<int32_t>(slot);
  seg.guard_gen = gen;
}

uint64_t Engine::guard_dead_lanes() {
  GuardTable* gt = guard_ptr_.load(std::memory_order_acquire);
  return gt ? gt->dead_lanes() : 0;
}

bool Engine::attach_guard(RemoteSeg& rs, std::string& why) {
  const Descriptor& d = rs.desc;
  if (d.version < 2) {
    why = "the owner's build cannot revoke CMA access (descriptor version " + std::to_string(d.version) + ")";
    return false;
  }
  if (d.guard_fd < 0) {
    why = "the owner gave segment " + std::to_string(d.seg_id) + " no CMA guard slot";
    return false;
  }
  if (d.guard_slot >= kGuardSlots || d.guard_gen == 0) {
    why = "bad CMA guard slot in the descriptor";
    return false;
  }
  Peer& peer = *rs.peer;
  std::shared_ptr<GuardMap> gm;
  {
    std::lock_guard<std::mutex> g(peer.guard_mu);
    if (peer.guard && peer.guard->region->name() == d.guard_name) {
      gm = peer.guard;
    } else {
      gm = open_guard(d.pid, d.guard_fd, d.guard_name, why);
      if (!gm) return false;
      peer.guard = gm;
    }
  }
  rs.guard = gm;
  rs.guard_gen = &gm->view.gen(d.guard_slot);
  rs.guard_count = &gm->view.count(gm->lane, d.guard_slot);
  return true;
}

void Engine::revoke_all_cma() {
  GuardTable* gt = guard_ptr_.load(std::memory_order_acquire);
  if (!gt) return;
  auto segs = segments_.all();
  for (auto& s : segs)
    if (s->guard_slot >= 0) gt->revoke(static_cast<uint32_t>(s->guard_slot), /*closed=*/true);
  // Copies past their check are single syscalls; a peer stopped inside one is waited for 2 s.
  const int64_t deadline = now_ns() + 2000000000LL;
  for (auto& s : segs) {
    if (s->guard_slot < 0) continue;
    if (!gt->drain(static_cast<uint32_t>(s->guard_slot), deadline))
      log(kLogWarning, "close: CMA copies by a peer into segment " + std::to_string(s->id) +
                           " still in flight after 2 s");
  }
}

std::shared_ptr<LocalSegment> Engine::register_memory(uint64_t addr, uint64_t length, const std::string& location) {
  if (closing_.load()) throw TransferErr(ErrKind::kGeneric, "", "engine closed");
  if (location == "cpu") {
    auto seg = segments_.add_registered(reinterpret_cast<uint8_t*>(addr), length, location);
    guard_segment(*seg);
    return seg;
  }
  // GPU memory: reachable through UCX only (mapped now, so a bad pointer fails here).
  const std::string why = ucx_cuda_status();
  if (!why.empty()) throw TransferErr(ErrKind::kGeneric, "", "register(location='" + location + "'): " + why);
  std::string mwhy;
  auto reg = ucx(nullptr)->map(reinterpret_cast<void*>(addr), length, true, mwhy);
  if (!reg) throw TransferErr(ErrKind::kGeneric, "", "register(location='" + location + "'): " + mwhy);
  auto seg = segments_.add_registered(reinterpret_cast<uint8_t*>(addr), length, location);
  std::lock_guard<std::mutex> g(seg->mu);
  seg->ucx_reg = reg;
  return seg;
}

UcxTransport* Engine::ucx(std::string* why) {
  if (UcxTransport* u = ucx_ptr_.load(std::memory_order_acquire)) return u;
  std::lock_guard<std::mutex> g(ucx_mu_);
  if (ucx_) return ucx_.get();
  if (closing_.load()) {
    if (why) *why = "engine closed";
    return nullptr;
  }
  std::string w;
  ucx_ = UcxTransport::create(*this, cfg_.ucx_lib_dir, w);
  if (!ucx_) {
    ucx_why_ = w;
    if (why) *why = w;
    return nullptr;
  }
  ucx_ptr_.store(ucx_.get(), std::memory_order_release);
  log(kLogInfo, "UCX transport started: " + ucx_->describe());
  return ucx_.get();
}

std::string Engine::ucx_cuda_status() {
  std::string why;
  UcxTransport* u = ucx(&why);
  if (!u) return "GPU memory needs UCX with CUDA support, and " + why;
  if (!u->cuda())
    return "GPU memory needs UCX with CUDA memory support (the libucx-cu12/-cu13 wheel plus a CUDA driver); "
           "this UCX has none: " + u->describe();
  return {};
}

bool Engine::ucx_for_remote() {
  std::lock_guard<std::mutex> g(ucx_mu_);
  if (ucx_remote_ < 0) {
    bool rdma = false;
    std::string desc;
    std::string why = UcxTransport::probe(cfg_.ucx_lib_dir, &rdma, nullptr, &desc);
    ucx_remote_ = why.empty() && rdma ? 1 : 0;
    log(kLogInfo, ucx_remote_ ? "other hosts are reached over UCX: " + desc
                              : "other hosts are reached over tcp (" +
                                    (why.empty() ? "UCX has no RDMA transport: " + desc : why) + ")");
  }
  return ucx_remote_ == 1;
}

void Engine::open_ucx(const std::shared_ptr<RemoteSeg>& rs, double timeout_s) {
  const std::string& owner = rs->desc.owner;
  std::string why;
  UcxTransport* u = ucx(&why);
  if (!u) throw TransferErr(ErrKind::kGeneric, owner, "transport 'ucx' is not usable here: " + why);
  auto& peer = rs->peer;
  auto c = peer->get_conn();
  if (!c || peer->dead()) throw TransferErr(peer->dead_error());
  auto b = std::make_shared<Batch>(1);
  Pending p;
  p.kind = Pending::kUcxInfo;
  p.batch = b;
  p.reply = std::make_shared<std::string>();
  auto reply = p.reply;
  const uint64_t req = next_req();
  if (!c->add_pending(req, std::move(p))) throw TransferErr(peer->dead_error());
  send_control(*c, kUcxInfoReq, req, rs->desc.seg_id);
  Status s = b->wait(deadline_after(timeout_s));
  if (s == Status::kTimeout) {
    Pending drop;
    c->take_pending(req, &drop);
    throw TransferErr(ErrKind::kTimeout, owner, "the owner did not answer the UCX segment request");
  }
  if (s == Status::kFailed) throw TransferErr(b->error());
  u->attach(*rs, *reply);
  rs->kind = TransportKind::kUcx;
  rs->transport = u;
}

void Engine::unregister(uint64_t seg_id, double timeout_s) {
  auto seg = segments_.find(seg_id);
  if (!seg || !segments_.remove(seg_id))
    throw std::invalid_argument("seg: segment " + std::to_string(seg_id) + " is not registered with this engine");
  {
    // UCX: unmapped here unless a GPU segment's registration is still held elsewhere. One-sided
    // accesses cannot be waited for (see the README: what UCX cannot check on the owner side).
    std::lock_guard<std::mutex> g(seg->mu);
    seg->ucx_reg.reset();
  }
  const int64_t deadline = deadline_after(timeout_s);
  // CMA: refuse new copies, then wait for those past their check (seg_guard.h). The slot is
  // reused only once no copy can be running (a drain that timed out keeps it out of use).
  bool cma_idle = true;
  if (seg->guard_slot >= 0) {
    GuardTable* gt = guard_ptr_.load(std::memory_order_acquire);
    const uint32_t slot = static_cast<uint32_t>(seg->guard_slot);
    gt->revoke(slot);
    cma_idle = gt->drain(slot, deadline);
    if (cma_idle) gt->release(slot);
    else gt->quarantine(slot);
  }
  if (!SegmentRegistry::wait_idle(*seg, deadline) || !cma_idle)
    throw TransferErr(ErrKind::kTimeout, "", "unregister: transfers into segment " + std::to_string(seg_id) +
                                                 " still in flight" + (cma_idle ? "" : " (cma)"));
}

std::string Engine::descriptor(const LocalSegment& seg) const {
  Descriptor d;
  d.kind = seg.kind;
  d.owner = cfg_.name;
  d.endpoint = endpoint_;
  d.host_id = cfg_.host_id;
  d.pid = static_cast<uint32_t>(getpid());
  d.seg_id = seg.id;
  d.addr = reinterpret_cast<uint64_t>(seg.addr);
  d.length = seg.length;
  d.location = seg.location;
  d.memfd = seg.memfd;
  d.memfd_name = seg.memfd_name;
  if (seg.guard_slot >= 0) {
    GuardTable* gt = guard_ptr_.load(std::memory_order_acquire);
    d.guard_fd = gt->fd();
    d.guard_name = gt->name();
    d.guard_slot = static_cast<uint32_t>(seg.guard_slot);
    d.guard_gen = seg.guard_gen;
  }
  return encode_descriptor(d);
}

std::shared_ptr<RemoteSeg> Engine::open_segment(const std::string& bytes, double timeout_s,
                                                const std::string& override_mode) {
  Descriptor d;
  std::string why = decode_descriptor(bytes, d);
  if (!why.empty()) throw std::invalid_argument("desc: " + why);
  if (d.owner == cfg_.name) throw std::invalid_argument("desc: the segment belongs to this engine itself");
  const std::string mode = override_mode.empty() ? cfg_.transport : override_mode;
  if (mode != "auto" && mode != "tcp" && mode != "cma" && mode != "shm" && mode != "rdma" && mode != "ucx")
    throw std::invalid_argument("transport must be one of 'auto', 'tcp', 'cma', 'shm', 'rdma', 'ucx', got '" + mode +
                                "'");
  auto peer = find_peer(d.owner);
  if (peer && peer->dead()) throw TransferErr(peer->dead_error());
  if (!peer) {
    std::string got = connect(d.endpoint, timeout_s);
    if (got != d.owner)
      throw TransferErr(ErrKind::kGeneric, d.owner,
                        "endpoint " + d.endpoint + " is now engine '" + got + "', not the segment owner");
    peer = require_peer(d.owner);
  }
  auto rs = std::make_shared<RemoteSeg>();
  rs->peer = peer;
  rs->desc = d;
  if (mode == "rdma") {
    std::string w = VerbsTransport::probe();
    throw TransferErr(ErrKind::kGeneric, d.owner, "transport='rdma' is not usable: " + (w.empty() ? "not implemented" : w));
  }
  const bool gpu = d.location != "cpu";
  if (mode == "ucx" || (gpu && mode == "auto")) {
    open_ucx(rs, timeout_s);
    return rs;
  }
  if (gpu)
    throw TransferErr(ErrKind::kGeneric, d.owner,
                      "segment " + std::to_string(d.seg_id) + " is GPU memory (" + d.location +
                          "): only transport 'ucx' reaches it, not '" + mode + "'");
  const bool same = peer->same_host && peer->pid == d.pid;
  if (!peer->same_host && mode == "auto" && ucx_for_remote()) {
    try {
      open_ucx(rs, timeout_s);
      return rs;
    } catch (const TransferErr& e) {
      if (peer->dead()) throw;
      log(kLogWarning, std::string("segment of '") + d.owner + "' over tcp: UCX failed: " + e.what());
    }
  }
  if (!same || mode == "tcp") {
    rs->kind = TransportKind::kTcp;
    rs->transport = &tcp_;
    return rs;
  }
  if ((mode == "auto" || mode == "shm") && d.kind == SegKind::kMemfd) {
    const std::string key = d.owner + "#" + std::to_string(d.seg_id);
    std::lock_guard<std::mutex> g(maps_mu_);
    auto m = maps_[key].lock();
    std::string mwhy;
    if (!m) m = map_peer_memfd(d, mwhy);
    if (m) {
      maps_[key] = m;
      rs->kind = TransportKind::kShm;
      rs->map = m;
      rs->transport = &shm_;
      return rs;
    }
    log(kLogWarning, "cannot map shared memory of '" + d.owner + "' (" + mwhy + "); trying CMA");
  }
  // CMA only with the owner's guard (its unregister() must be able to stop us), else tcp.
  std::string gwhy;
  if (!attach_guard(*rs, gwhy)) {
    if (!cma_guard_logged_.exchange(true))
      log(kLogWarning, "segment of '" + d.owner + "' over tcp, not cma: " + gwhy);
    rs->kind = TransportKind::kTcp;
    rs->transport = &tcp_;
    return rs;
  }
  int e = LocalCopyTransport::cma_probe(d.pid, d.addr);
  if (e == 0) {
    rs->kind = TransportKind::kCma;
    rs->transport = &cma_;
    return rs;
  }
  rs->guard.reset();
  rs->guard_gen = nullptr;
  rs->guard_count = nullptr;
  if (e == ESRCH) {
    mark_dead(peer, "process " + std::to_string(d.pid) + " does not exist (ESRCH)", true);
    throw TransferErr(peer->dead_error());
  }
  if (!cma_eperm_logged_.exchange(true))
    log(kLogWarning, "cross-memory attach refused (" + errno_str(e) + "); falling back to TCP for same-host peers");
  rs->kind = TransportKind::kTcp;
  rs->transport = &tcp_;
  return rs;
}

}  // namespace mooncake::transfer
