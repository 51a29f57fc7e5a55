// Engine I/O thread: epoll loop, accepting side of the handshake, frame dispatch, heartbeats and
// the failure detector's clock.
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "engine.h"
#include "sha256.h"

namespace mooncake::transfer {

namespace {
constexpr size_t kMaxHandshaking = 128;
// close(): how long queued frames (BYE) may take to leave, over all connections together.
constexpr int64_t kCloseLingerNs = 100 * 1000000LL;

std::string addr_str(const sockaddr_storage& ss) {
  char buf[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (ss.ss_family == AF_INET) {
    auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, buf, sizeof(buf));
    port = ntohs(a->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof(buf));
    port = ntohs(a->sin6_port);
  }
  return std::string(buf) + ":" + std::to_string(port);
}

std::string nonce() {
  std::string s(kNonceBytes, '\0');
  if (getrandom(&s[0], s.size(), 0) != static_cast<ssize_t>(s.size())) {
    for (auto& c : s) c = static_cast<char>(now_ns() & 0xff);  // getrandom cannot really fail here
  }
  return s;
}
}  // namespace

void Engine::wake_io() {
  uint64_t one = 1;
  ssize_t r = ::write(wake_fd_, &one, sizeof(one));
  (void)r;
}

void Engine::send_control(Connection& c, uint8_t type, uint64_t req, uint64_t a) {
  SendItem it;
  it.hdr = make_header(type, 0, 0, req, a);
  c.send(&it, 1, false);
}

void Engine::send_error(Connection& c, uint64_t req, uint32_t code, const std::string& msg) {
  SendItem it;
  it.owned = msg.substr(0, kMaxErrorPayload);
  it.len = it.owned.size();
  it.hdr = make_header(kError, 0, static_cast<uint32_t>(it.len), req, code);
  c.send(&it, 1, false);
}

void Engine::io_loop() {
  inbox_.hold_liveness();  // held by this thread until it ends (see DoorbellWord::alive)
  epoll_event evs[64];
  int64_t next_wake = now_ns() + detector_.interval_ns();
  while (!stop_.load()) {
    int64_t now = now_ns();
    int64_t wait_ns = next_wake - now;
    int timeout_ms = wait_ns <= 0 ? 0 : static_cast<int>(std::min<int64_t>((wait_ns + 999999) / 1000000, 1000));
    int n = epoll_wait(epfd_, evs, 64, timeout_ms);
    for (int i = 0; i < n && !stop_.load(); ++i) {
      void* ptr = evs[i].data.ptr;
      if (ptr == &listen_fd_) {
        accept_ready();
        continue;
      }
      if (ptr == &wake_fd_) {
        uint64_t v;
        while (::read(wake_fd_, &v, sizeof(v)) > 0) {
        }
        continue;
      }
      // Only this thread removes connections, so the pointer stays valid until close_conn.
      std::shared_ptr<Connection> c;
      {
        std::lock_guard<std::mutex> g(mu_);
        auto it = conns_.find(static_cast<Connection*>(ptr));
        if (it == conns_.end()) continue;
        c = it->second;
      }
      const uint32_t e = evs[i].events;
      if (e & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP)) {
        std::string why;
        bool eof = false;
        if (!c->on_readable(*this, why, eof)) {
          close_conn(c, why, eof);
          continue;
        }
      }
      if ((e & EPOLLOUT) && !c->flush()) close_conn(c, "send failed: " + errno_str(errno), false);
    }
    tick(now_ns(), &next_wake);
  }
  // Shutting down: queued frames (BYE, behind whatever was queued before it) get a short,
  // bounded moment to leave, so a peer that is reading sees a clean close; then close everything.
  std::vector<std::shared_ptr<Connection>> all;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& kv : conns_) all.push_back(kv.second);
  }
  const int64_t linger_end = now_ns() + kCloseLingerNs;
  for (auto& c : all) {
    while (c->flush() && !c->send_queue_empty()) {
      const int64_t left = linger_end - now_ns();
      if (left <= 0) break;
      pollfd pfd{c->fd(), POLLOUT, 0};
      if (::poll(&pfd, 1, static_cast<int>((left + 999999) / 1000000)) <= 0) break;
    }
  }
  for (auto& c : all) close_conn(c, "engine closed", false);
}

void Engine::accept_ready() {
  for (;;) {
    sockaddr_storage ss{};
    socklen_t sl = sizeof(ss);
    int fd = ::accept4(listen_fd_, reinterpret_cast<sockaddr*>(&ss), &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) log(kLogWarning, "accept failed: " + errno_str(errno));
      return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    const std::string remote = addr_str(ss);
    std::lock_guard<std::mutex> g(mu_);
    if (closing_.load() || handshaking_ >= kMaxHandshaking) {
      ::close(fd);
      log(kLogWarning, "refused connection from " + remote + ": too many unauthenticated connections");
      continue;
    }
    auto c = std::make_shared<Connection>(fd, epfd_, false, remote);
    c->hs_deadline = now_ns() + static_cast<int64_t>(cfg_.handshake_timeout_s * 1e9);
    c->banner_nonce = nonce();
    ++handshaking_;
    register_conn(c);
    BannerMsg b{cfg_.name, c->banner_nonce};
    SendItem it;
    it.owned = encode(b);
    it.len = it.owned.size();
    it.hdr = make_header(kBanner, 0, static_cast<uint32_t>(it.len));
    c->send(&it, 1, false);
  }
}

bool Engine::handle_hello(Connection& c, const std::string& payload, std::string& why) {
  HelloMsg m;
  auto refuse = [&](uint32_t status, const std::string& msg) {
    HelloAckMsg a;
    a.status = status;
    a.name = cfg_.name;
    a.message = msg;
    SendItem it;
    it.owned = encode(a);
    it.len = it.owned.size();
    it.hdr = make_header(kHelloAck, 0, static_cast<uint32_t>(it.len));
    c.send(&it, 1, false);
    why = msg;
    // Both sides dialing at once, or a dial that lost to an established connection or to our
    // close: the dialer uses the other connection or gives up; nothing went wrong.
    c.quiet_drop = status == kHelloDuplicate || status == kHelloClosing;
    return false;
  };
  if (!decode(payload, m)) return refuse(kHelloBadRequest, "malformed HELLO");
  if (!equal_ct(m.mac, mac_hello(c.banner_nonce, m.name))) {
    log(kLogWarning, "refused connection from " + c.remote() + " (claims to be '" + m.name + "'): bad secret");
    return refuse(kHelloBadSecret, "bad secret");
  }
  if (closing_.load()) return refuse(kHelloClosing, "engine is closing");
  std::shared_ptr<Peer> peer;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (m.name == cfg_.name) return refuse(kHelloBadRequest, "peer uses this engine's own name");
    auto rit = refused_.find(m.name);
    if (rit != refused_.end()) return refuse(kHelloDeadName, "name '" + m.name + "' is refused here: " + rit->second);
    auto it = peers_.find(m.name);
    if (it != peers_.end()) {
      if (it->second->dead()) return refuse(kHelloDeadName, "name '" + m.name + "' is dead here");
      return refuse(kHelloDuplicate, "already connected");
    }
    // Both sides dialing each other at once: keep the connection initiated by the smaller name.
    if (dialing_.count(m.name) && !(m.name < cfg_.name)) return refuse(kHelloDuplicate, "crossing dial");
    auto cit = conns_.find(&c);
    if (cit == conns_.end()) return refuse(kHelloClosing, "connection gone");
    peer = std::make_shared<Peer>();
    peer->name = m.name;
    peer->name_ptr = std::make_shared<const std::string>(m.name);
    peer->host_id = m.host_id;
    peer->pid = m.pid;
    peer->endpoint = m.endpoint;
    peer->same_host = m.host_id == cfg_.host_id;
    peer->doorbell_fd = m.doorbell_fd;
    peer->doorbell_name = m.doorbell_name;
    peer->conn = cit->second;
    c.peer = peer;
    c.established = true;
    if (handshaking_ > 0) --handshaking_;
    peers_[m.name] = peer;
    // Queued under mu_: no other frame can go out on this connection before the ACK.
    HelloAckMsg a;
    a.status = kHelloOk;
    a.name = cfg_.name;
    a.host_id = cfg_.host_id;
    a.pid = static_cast<uint32_t>(getpid());
    a.endpoint = endpoint_;
    a.mac = mac_ack(m.nonce, cfg_.name);
    a.doorbell_fd = static_cast<uint32_t>(inbox_.doorbell_region().fd());
    a.doorbell_name = inbox_.doorbell_region().name();
    SendItem si;
    si.owned = encode(a);
    si.len = si.owned.size();
    si.hdr = make_header(kHelloAck, 0, static_cast<uint32_t>(si.len));
    c.send(&si, 1, false);
    set_state(peer, PeerState::kAlive);
    peers_cv_.notify_all();
  }
  log(kLogInfo, "peer '" + m.name + "' connected from " + c.remote() + (peer->same_host ? " (same host)" : ""));
  return true;
}

bool Engine::on_header(Connection& c, const FrameHeader& h, RecvTarget& t, std::string& why) {
  if (h.type == kWrite) {
    auto seg = segments_.find(h.a);
    if (!seg) {
      t.discard = true;
      c.cur_err = kErrBadSegment;
    } else if (h.b > seg->length || h.length > seg->length - h.b) {
      t.discard = true;
      c.cur_err = kErrOutOfBounds;
    } else if (seg->location != "cpu") {
      t.discard = true;  // GPU memory: never touched by this thread (reachable over ucx only)
      c.cur_err = kErrBadRequest;
    } else {
      t.ptr = seg->addr + h.b;
      t.keep = std::make_shared<SegUse>(seg);
    }
  } else if (h.type == kReadResp) {
    Pending p;
    if (!c.find_pending(h.req, &p)) {
      t.discard = true;  // a request we gave up on
    } else if (p.kind != Pending::kRead || h.b > p.len || h.length > p.len - h.b) {
      why = "READ_RESP does not match its request";
      return false;
    } else {
      t.ptr = p.dst + h.b;
    }
  }
  return true;
}

bool Engine::on_frame(Connection& c, const FrameHeader& h, std::string& payload, std::string& why) {
  switch (h.type) {
    case kHello:
      return handle_hello(c, payload, why);
    case kHeartbeat:
      return true;
    case kBye:
      c.got_bye = true;
      why = "peer closed the connection (BYE)";
      return false;
    case kPing:
      send_control(c, kPong, h.req);
      return true;
    case kPong: {
      Pending p;
      if (c.take_pending(h.req, &p) && p.kind == Pending::kPing) {
        p.batch->value_ns.store(now_ns() - p.t0);
        p.batch->complete_ok();
      }
      return true;
    }
    case kNotify:
      if (c.peer) inbox_.push(c.peer->name_ptr, h.b, h.a, std::move(payload));
      return true;
    case kRingOffer:
      handle_ring_offer(c, h, payload);
      return true;
    case kRingAccept:
      if (c.peer) {
        int offered = Peer::kRingOffered;
        c.peer->ring_state.compare_exchange_strong(offered, h.a == 0 ? Peer::kRingReady : Peer::kRingOff);
      }
      return true;
    case kWrite:
      if (c.cur_err != 0) {
        if (c.last_err_req != h.req) {
          send_error(c, h.req, c.cur_err,
                     c.cur_err == kErrBadSegment   ? "WRITE to unknown segment " + std::to_string(h.a)
                     : c.cur_err == kErrBadRequest ? "WRITE over tcp to GPU segment " + std::to_string(h.a) +
                                                         " (use transport 'ucx')"
                                                   : "WRITE out of bounds (segment " + std::to_string(h.a) +
                                                         ", offset " + std::to_string(h.b) + ", length " +
                                                         std::to_string(h.length) + ")");
          c.last_err_req = h.req;
        }
        c.cur_err = 0;
      } else if ((h.flags & kFlagLast) && c.last_err_req != h.req) {
        send_control(c, kWriteAck, h.req);
      }
      return true;
    case kWriteAck: {
      Pending p;
      if (c.take_pending(h.req, &p)) p.batch->complete_ok();
      return true;
    }
    case kReadReq: {
      uint64_t len = 0;
      std::memcpy(&len, payload.data(), 8);
      auto seg = segments_.find(h.a);
      if (!seg) {
        send_error(c, h.req, kErrBadSegment, "READ of unknown segment " + std::to_string(h.a));
        return true;
      }
      if (len == 0 || h.b > seg->length || len > seg->length - h.b) {
        send_error(c, h.req, kErrOutOfBounds,
                   "READ out of bounds (segment " + std::to_string(h.a) + ", offset " + std::to_string(h.b) +
                       ", length " + std::to_string(len) + ", segment length " + std::to_string(seg->length) + ")");
        return true;
      }
      if (seg->location != "cpu") {
        send_error(c, h.req, kErrBadRequest,
                   "READ over tcp of GPU segment " + std::to_string(h.a) + " (use transport 'ucx')");
        return true;
      }
      auto use = std::make_shared<SegUse>(seg);
      const size_t n = static_cast<size_t>((len + kChunkBytes - 1) / kChunkBytes);
      std::vector<SendItem> items(n);
      for (size_t i = 0; i < n; ++i) {
        uint64_t off = i * uint64_t(kChunkBytes);
        uint32_t chunk = static_cast<uint32_t>(std::min<uint64_t>(kChunkBytes, len - off));
        items[i].hdr = make_header(kReadResp, i + 1 == n ? kFlagLast : 0, chunk, h.req, 0, off);
        items[i].data = seg->addr + h.b + off;
        items[i].len = chunk;
        items[i].keep = use;
      }
      c.send(items.data(), n, false);
      return true;
    }
    case kReadResp:
      if (h.flags & kFlagLast) {
        Pending p;
        if (c.take_pending(h.req, &p)) p.batch->complete_ok();
      }
      return true;
    case kUcxInfoReq:
      handle_ucx_info(c, h);
      return true;
    case kUcxInfoResp: {
      Pending p;
      if (!c.take_pending(h.req, &p)) return true;
      if (p.kind != Pending::kUcxInfo) {
        // A reply to a request of another kind: fail that request (it must not hang) and drop
        // the peer's connection, which broke the protocol.
        why = "UCX_INFO_RESP for a request of another kind";
        p.batch->complete_err(ErrorInfo{ErrKind::kGeneric, c.peer ? c.peer->name : "", why});
        return false;
      }
      *p.reply = std::move(payload);
      p.batch->complete_ok();
      return true;
    }
    case kError: {
      Pending p;
      if (c.take_pending(h.req, &p))
        p.batch->complete_err(ErrorInfo{ErrKind::kGeneric, c.peer ? c.peer->name : "",
                                        "rejected by the segment owner: " + payload});
      return true;
    }
    default:
      why = "unexpected frame";
      return false;
  }
}

void Engine::handle_ring_offer(Connection& c, const FrameHeader& h, const std::string& payload) {
  Reader r(payload.data(), payload.size());
  const uint32_t fd = r.u32();
  const std::string name = r.str(256);
  std::string why;
  std::shared_ptr<SharedRegion> region;
  if (!r.ok() || !r.at_end() || h.a != kRingBytes) why = "malformed offer";
  else if (!cfg_.notify_ring) why = "disabled here";
  else if (!c.peer || !c.peer->same_host) why = "not on this host";
  else region = SharedRegion::open_peer(c.peer->pid, static_cast<int>(fd), name, kRingDataOffset + kRingBytes, why);
  auto reader = region ? std::make_unique<RingReader>(region) : nullptr;
  if (reader && !reader->valid()) {
    reader.reset();
    why = "bad ring header";
  }
  const bool accepted = reader != nullptr;
  if (accepted) inbox_.add_ring(c.peer->name_ptr, std::move(reader));
  else log(kLogDebug, "refused notify ring from '" + (c.peer ? c.peer->name : c.remote()) + "': " + why);
  send_control(c, kRingAccept, 0, accepted ? 0 : 1);
}

void Engine::handle_ucx_info(Connection& c, const FrameHeader& h) {
  // A peer asks to reach segment `h.a` over UCX: answered by the UCX service thread.
  UcxInfoJob job;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = conns_.find(&c);
    if (it == conns_.end()) return;
    job.conn = it->second;
  }
  job.req = h.req;
  job.seg_id = h.a;
  {
    std::lock_guard<std::mutex> g(ucxq_mu_);
    if (ucxq_stop_) return;
    if (ucxq_.size() >= 4096) {  // a flood: refuse rather than queue without bound
      send_error(c, h.req, kErrBadRequest, "too many UCX requests in flight");
      return;
    }
    ucxq_.push_back(std::move(job));
    if (!ucxq_thread_.joinable()) ucxq_thread_ = std::thread([this] { ucx_service_loop(); });
  }
  ucxq_cv_.notify_one();
}

void Engine::ucx_service_loop() {
  for (;;) {
    UcxInfoJob job;
    {
      std::unique_lock<std::mutex> lk(ucxq_mu_);
      ucxq_cv_.wait(lk, [this] { return ucxq_stop_ || !ucxq_.empty(); });
      if (ucxq_stop_) return;
      job = std::move(ucxq_.front());
      ucxq_.pop_front();
    }
    Connection& c = *job.conn;
    if (c.closed()) continue;
    // Answer with this worker's address and the segment's rkey (UCX is started, and the segment
    // mapped, on the first such request).
    auto seg = segments_.find(job.seg_id);
    if (!seg) {
      send_error(c, job.req, kErrBadSegment, "UCX request for unknown segment " + std::to_string(job.seg_id));
      continue;
    }
    // Only an engine that allows UCX (transport 'ucx' or 'auto') starts it for a peer: UCX's own
    // sockets are not covered by the group secret. GPU segments are reachable over UCX only.
    if (cfg_.transport != "auto" && cfg_.transport != "ucx" && seg->location.rfind("cuda", 0) != 0) {
      send_error(c, job.req, kErrBadRequest,
                 "this engine does not serve segments over UCX (its transport is '" + cfg_.transport + "')");
      continue;
    }
    std::string why;
    UcxTransport* u = ucx(&why);
    std::string payload;
    if (!u || !u->export_segment(*seg, payload, why)) {
      send_error(c, job.req, kErrBadRequest, "the owner cannot serve this segment over UCX: " + why);
      continue;
    }
    SendItem it;
    it.owned = std::move(payload);
    it.len = it.owned.size();
    it.hdr = make_header(kUcxInfoResp, 0, static_cast<uint32_t>(it.len), job.req);
    c.send(&it, 1, false);
  }
}

void Engine::tick(int64_t now, int64_t* next_wake) {
  inbox_.drain();  // same-host rings nobody is waiting on
  const bool stalled = detector_.begin_tick(now);
  int64_t nw = now + detector_.interval_ns();
  std::vector<std::shared_ptr<Connection>> beat, expired, finished;
  std::vector<std::pair<std::shared_ptr<Peer>, PeerState>> changes;
  std::vector<std::pair<std::shared_ptr<Peer>, int64_t>> silent;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& kv : conns_) {
      auto& c = kv.second;
      if (!c->established) {
        if (now >= c->hs_deadline) expired.push_back(c);
        else nw = std::min(nw, c->hs_deadline);
        continue;
      }
      auto p = c->peer;
      if (!p || p->dead() || c->closed()) {
        finished.push_back(c);
        continue;
      }
      if (stalled) c->last_rx.store(now);  // we were not running: their silence proves nothing
      const int64_t rx = c->last_rx.load();
      switch (detector_.judge(now, rx)) {
        case FailureDetector::Verdict::kDead:
          silent.emplace_back(p, now - rx);
          continue;
        case FailureDetector::Verdict::kSuspect:
          if (p->state.load() == static_cast<int>(PeerState::kAlive)) changes.emplace_back(p, PeerState::kSuspect);
          break;
        case FailureDetector::Verdict::kAlive:
          if (p->state.load() == static_cast<int>(PeerState::kSuspect)) changes.emplace_back(p, PeerState::kAlive);
          break;
      }
      if (detector_.heartbeat_due(now, c->last_tx.load())) beat.push_back(c);
      nw = std::min(nw, detector_.next_deadline(now, rx, now));
    }
  }
  for (auto& c : beat)
    if (c->send_queue_empty()) send_control(*c, kHeartbeat);  // a busy queue is itself a sign of life
  for (auto& pc : changes) {
    if (pc.first->dead()) continue;
    set_state(pc.first, pc.second);
    if (pc.second == PeerState::kSuspect)
      log(kLogInfo, "peer '" + pc.first->name + "' is SUSPECT (silent for half the heartbeat timeout)");
  }
  for (auto& ps : silent) {
    auto c = ps.first->get_conn();
    mark_dead(ps.first, "no frame for " + std::to_string(ps.second / 1000000) + " ms (heartbeat timeout " +
                            std::to_string(detector_.timeout_ns() / 1000000) + " ms)");
    if (c) close_conn(c, "heartbeat timeout", false);
  }
  for (auto& c : expired) close_conn(c, "handshake timed out", false);
  for (auto& c : finished) close_conn(c, "peer dead", false);
  *next_wake = nw;
}

void Engine::close_conn(const std::shared_ptr<Connection>& c, const std::string& why, bool eof) {
  std::shared_ptr<Peer> p;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = conns_.find(c.get());
    if (it == conns_.end()) return;
    conns_.erase(it);
    if (!c->established && handshaking_ > 0) --handshaking_;
    p = c->peer;
  }
  if (c->fd() >= 0) epoll_ctl(epfd_, EPOLL_CTL_DEL, c->fd(), nullptr);
  std::vector<Pending> pend = c->shut(false);
  c->close_fd();
  ErrorInfo err{ErrKind::kGeneric, p ? p->name : "", why};
  if (p) {
    bool active;
    {
      std::lock_guard<std::mutex> g(p->mu);
      active = p->conn == c;
      if (active) p->conn.reset();
    }
    if (closing_.load()) {
      // Our own close: the peer answering our BYE by dropping the connection is no failure.
      err = ErrorInfo{ErrKind::kGeneric, p->name, "engine closed"};
    } else {
      if (active) {
        std::string reason = c->got_bye ? kReasonBye : eof ? "connection lost (EOF)" : why;
        mark_dead(p, reason);
      }
      err = p->dead_error();
    }
    c->peer.reset();
  } else if (!closing_.load()) {
    // Refusals were logged already, normal races (a crossing or repeated dial) are no news, and
    // a client that just went away is only worth a debug line.
    const bool quiet = eof || c->quiet_drop || why.rfind("recv:", 0) == 0 || why == "bad secret";
    log(quiet ? kLogDebug : kLogWarning, "dropped unauthenticated connection from " + c->remote() + ": " + why);
  }
  for (auto& x : pend) x.batch->complete_err(err);
}

}  // namespace mooncake::transfer
