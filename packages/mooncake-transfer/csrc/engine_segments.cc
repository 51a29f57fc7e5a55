// Engine: segments this engine owns (allocate/register/unregister, descriptors) and peers'
// segments it opens (transport choice per segment).
#include <unistd.h>

#include <cerrno>

#include "engine.h"

namespace mooncake::transfer {

std::shared_ptr<LocalSegment> Engine::allocate(uint64_t length) {
  if (closing_.load()) throw TransferErr(ErrKind::kGeneric, "", "engine closed");
  return segments_.allocate(length, token_);
}

std::shared_ptr<LocalSegment> Engine::register_memory(uint64_t addr, uint64_t length, const std::string& location) {
  if (closing_.load()) throw TransferErr(ErrKind::kGeneric, "", "engine closed");
  return segments_.add_registered(reinterpret_cast<uint8_t*>(addr), length, location);
}

void Engine::unregister(uint64_t seg_id, double timeout_s) {
  auto seg = segments_.find(seg_id);
  if (!seg || !segments_.remove(seg_id))
    throw std::invalid_argument("seg: segment " + std::to_string(seg_id) + " is not registered with this engine");
  if (!SegmentRegistry::wait_idle(*seg, deadline_after(timeout_s)))
    throw TransferErr(ErrKind::kTimeout, "", "unregister: transfers into segment " + std::to_string(seg_id) +
                                                 " still in flight");
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
  return encode_descriptor(d);
}

std::shared_ptr<RemoteSeg> Engine::open_segment(const std::string& bytes, double timeout_s,
                                                const std::string& override_mode) {
  Descriptor d;
  std::string why = decode_descriptor(bytes, d);
  if (!why.empty()) throw std::invalid_argument("desc: " + why);
  if (d.owner == cfg_.name) throw std::invalid_argument("desc: the segment belongs to this engine itself");
  const std::string mode = override_mode.empty() ? cfg_.transport : override_mode;
  if (mode != "auto" && mode != "tcp" && mode != "cma" && mode != "shm" && mode != "rdma")
    throw std::invalid_argument("transport must be one of 'auto', 'tcp', 'cma', 'shm', 'rdma', got '" + mode + "'");
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
  const bool same = peer->same_host && peer->pid == d.pid && d.location == "cpu";
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
  int e = LocalCopyTransport::cma_probe(d.pid, d.addr);
  if (e == 0) {
    rs->kind = TransportKind::kCma;
    rs->transport = &cma_;
    return rs;
  }
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
