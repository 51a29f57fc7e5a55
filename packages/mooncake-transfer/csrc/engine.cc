// Engine: construction, dialing (client side of the handshake), peers, segments, close.
#include "engine.h"
#include "sha256.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

namespace mooncake::transfer {

namespace {

std::string random_bytes(size_t n) {
  std::string s(n, '\0');
  size_t got = 0;
  while (got < n) {
    ssize_t r = getrandom(&s[got], n - got, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw TransferErr(ErrKind::kGeneric, "", "getrandom failed: " + errno_str(errno));
    got += static_cast<size_t>(r);
  }
  return s;
}

std::string hex(const std::string& s) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out.push_back(d[c >> 4]);
    out.push_back(d[c & 15]);
  }
  return out;
}

// Splits "host:port" / "[v6]:port"; throws std::invalid_argument naming the argument.
void split_endpoint(const std::string& ep, std::string& host, std::string& port) {
  auto bad = [&]() {
    return std::invalid_argument("endpoint must be 'host:port' with port 1..65535, got '" + ep + "'");
  };
  size_t colon;
  if (!ep.empty() && ep[0] == '[') {
    size_t close = ep.find(']');
    if (close == std::string::npos || close + 1 >= ep.size() || ep[close + 1] != ':') throw bad();
    host = ep.substr(1, close - 1);
    colon = close + 1;
  } else {
    colon = ep.rfind(':');
    if (colon == std::string::npos || colon == 0) throw bad();
    host = ep.substr(0, colon);
  }
  port = ep.substr(colon + 1);
  if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos) throw bad();
  int p = std::stoi(port);
  if (p < 1 || p > 65535) throw bad();
}

bool wait_fd(int fd, short events, int64_t deadline) {
  for (;;) {
    int64_t left = deadline - now_ns();
    if (left <= 0) return false;
    pollfd pfd{fd, events, 0};
    int ms = static_cast<int>(std::min<int64_t>((left + 999999) / 1000000, 1000));
    int r = ::poll(&pfd, 1, ms);
    if (r > 0) return true;
    if (r < 0 && errno != EINTR) return true;  // let the next syscall report it
  }
}

void send_all(int fd, const void* p, size_t n, int64_t deadline, const std::string& what) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t w = ::send(fd, c, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      c += w;
      n -= static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!wait_fd(fd, POLLOUT, deadline)) throw TransferErr(ErrKind::kTimeout, "", what + ": send timed out");
      continue;
    }
    throw TransferErr(ErrKind::kGeneric, "", what + ": send failed: " + errno_str(errno));
  }
}

void recv_exact(int fd, void* p, size_t n, int64_t deadline, const std::string& what) {
  char* c = static_cast<char*>(p);
  while (n > 0) {
    ssize_t r = ::recv(fd, c, n, MSG_DONTWAIT);
    if (r > 0) {
      c += r;
      n -= static_cast<size_t>(r);
      continue;
    }
    if (r == 0) throw TransferErr(ErrKind::kGeneric, "", what + ": connection closed during handshake");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (!wait_fd(fd, POLLIN, deadline)) throw TransferErr(ErrKind::kTimeout, "", what + ": handshake timed out");
      continue;
    }
    throw TransferErr(ErrKind::kGeneric, "", what + ": recv failed: " + errno_str(errno));
  }
}

std::string read_handshake_frame(int fd, uint8_t type, int64_t deadline, const std::string& what) {
  FrameHeader h;
  recv_exact(fd, &h, sizeof(h), deadline, what);
  if (h.magic != kFrameMagic || h.version != kWireVersion || h.type != type || h.reserved != 0 ||
      h.length == 0 || h.length > kMaxHandshakePayload)
    throw TransferErr(ErrKind::kGeneric, "", what + ": not a mooncake transfer engine (bad handshake frame)");
  std::string payload(h.length, '\0');
  recv_exact(fd, &payload[0], h.length, deadline, what);
  return payload;
}

void send_frame_blocking(int fd, uint8_t type, const std::string& payload, int64_t deadline,
                         const std::string& what) {
  FrameHeader h = make_header(type, 0, static_cast<uint32_t>(payload.size()));
  std::string buf(reinterpret_cast<const char*>(&h), sizeof(h));
  buf += payload;
  send_all(fd, buf.data(), buf.size(), deadline, what);
}

struct FdGuard {
  int fd;
  ~FdGuard() {
    if (fd >= 0) ::close(fd);
  }
  int release() {
    int f = fd;
    fd = -1;
    return f;
  }
};

}  // namespace

Engine::Engine(EngineConfig cfg)
    : cfg_(std::move(cfg)),
      detector_(static_cast<int64_t>(cfg_.heartbeat_interval_s * 1e9),
                static_cast<int64_t>(cfg_.heartbeat_timeout_s * 1e9)),
      shm_(*this, TransportKind::kShm),
      cma_(*this, TransportKind::kCma),
      tcp_(*this) {
  const std::string& t = cfg_.transport;
  if (t != "auto" && t != "tcp" && t != "cma" && t != "shm" && t != "rdma" && t != "ucx")
    throw std::invalid_argument("transport must be one of 'auto', 'tcp', 'cma', 'shm', 'rdma', 'ucx', got '" + t +
                                "'");
  if (t == "rdma") {
    std::string why = VerbsTransport::probe();
    if (!why.empty()) throw TransferErr(ErrKind::kGeneric, "", "transport='rdma' is not usable: " + why);
  }
  if (t == "ucx") {
    std::string why;
    ucx_ = UcxTransport::create(*this, cfg_.ucx_lib_dir, why);
    if (!ucx_) throw TransferErr(ErrKind::kGeneric, "", "transport='ucx' is not usable: " + why);
    ucx_ptr_.store(ucx_.get());
  }
  token_ = hex(random_bytes(8));
  if (cfg_.name.empty()) cfg_.name = "engine-" + std::to_string(getpid()) + "-" + token_;
  if (cfg_.name.size() > kMaxNameBytes)
    throw std::invalid_argument("name must be at most 256 bytes, got " + std::to_string(cfg_.name.size()));
  if (cfg_.host_id.empty()) cfg_.host_id = compute_host_id();

  std::string port = std::to_string(cfg_.port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const char* host = cfg_.host.empty() ? nullptr : cfg_.host.c_str();
  int gai = getaddrinfo(host, port.c_str(), &hints, &res);
  if (gai != 0)
    throw std::invalid_argument("host '" + cfg_.host + "' cannot be resolved: " + gai_strerror(gai));
  std::string err = "no address";
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && ::listen(fd, 512) == 0) {
      listen_fd_ = fd;
      break;
    }
    err = errno_str(errno);
    ::close(fd);
  }
  freeaddrinfo(res);
  if (listen_fd_ < 0)
    throw TransferErr(ErrKind::kGeneric, "", "cannot listen on " + cfg_.host + ":" + port + ": " + err);
  sockaddr_storage ss{};
  socklen_t sl = sizeof(ss);
  getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&ss), &sl);
  int bound_port = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                                   : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  std::string adv = cfg_.host;
  if (adv.empty() || adv == "0.0.0.0" || adv == "::") {
    char hn[256] = {0};
    gethostname(hn, sizeof(hn) - 1);
    adv = hn;
  }
  endpoint_ = (adv.find(':') != std::string::npos ? "[" + adv + "]" : adv) + ":" + std::to_string(bound_port);

  epfd_ = epoll_create1(EPOLL_CLOEXEC);
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (epfd_ < 0 || wake_fd_ < 0) {
    int e = errno;
    if (epfd_ >= 0) ::close(epfd_);
    if (wake_fd_ >= 0) ::close(wake_fd_);
    ::close(listen_fd_);
    throw TransferErr(ErrKind::kGeneric, "", "epoll/eventfd setup failed: " + errno_str(e));
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = &listen_fd_;
  epoll_ctl(epfd_, EPOLL_CTL_ADD, listen_fd_, &ev);
  ev.data.ptr = &wake_fd_;
  epoll_ctl(epfd_, EPOLL_CTL_ADD, wake_fd_, &ev);
  watch_link_->engine = this;
  io_thread_ = std::thread([this] { io_loop(); });
}

Engine::~Engine() { close(); }

std::string Engine::compute_host_id() {
  std::string boot;
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::getline(f, boot);
  char hn[256] = {0};
  gethostname(hn, sizeof(hn) - 1);
  char ns[128] = {0};
  ssize_t n = readlink("/proc/self/ns/pid", ns, sizeof(ns) - 1);
  if (n > 0) ns[n] = 0;
  // Same boot, hostname and pid namespace: pids and /proc/<pid>/fd mean the same thing to both.
  return boot + "/" + hn + "/" + ns;
}

void Engine::log(int level, const std::string& msg) {
  bg_events_.push(Event{true, msg, level});
}

std::string Engine::mac_hello(const std::string& nonce, const std::string& name) const {
  return hmac_sha256(cfg_.secret, std::string("mooncake-hello", 15) + nonce + name);
}

std::string Engine::mac_ack(const std::string& nonce, const std::string& name) const {
  return hmac_sha256(cfg_.secret, std::string("mooncake-ack", 13) + nonce + name);
}

void Engine::register_conn(const std::shared_ptr<Connection>& c) {
  conns_[c.get()] = c;
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLRDHUP;
  ev.data.ptr = c.get();
  epoll_ctl(epfd_, EPOLL_CTL_ADD, c->fd(), &ev);
}

std::string Engine::connect(const std::string& endpoint, double timeout_s) {
  if (closing_.load()) throw TransferErr(ErrKind::kGeneric, "", "engine closed");
  std::string host, port;
  split_endpoint(endpoint, host, port);
  const int64_t deadline = deadline_after(timeout_s);
  const std::string what = "connect to " + endpoint;

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  int gai = getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
  if (gai != 0) throw TransferErr(ErrKind::kGeneric, "", what + ": cannot resolve host: " + gai_strerror(gai));
  FdGuard g{-1};
  std::string err = "no address";
  bool timed_out = false;
  for (addrinfo* ai = res; ai && g.fd < 0; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    int r = ::connect(fd, ai->ai_addr, ai->ai_addrlen);
    if (r != 0 && errno == EINPROGRESS) {
      if (!wait_fd(fd, POLLOUT, deadline)) {
        timed_out = true;
        ::close(fd);
        break;
      }
      int soerr = 0;
      socklen_t sl = sizeof(soerr);
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
      r = soerr ? -1 : 0;
      errno = soerr;
    }
    if (r == 0) {
      g.fd = fd;
    } else {
      err = errno_str(errno);
      ::close(fd);
    }
  }
  freeaddrinfo(res);
  if (g.fd < 0) {
    if (timed_out) throw TransferErr(ErrKind::kTimeout, "", what + ": TCP connect timed out");
    throw TransferErr(ErrKind::kGeneric, "", what + ": " + err);
  }
  int one = 1;
  setsockopt(g.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

  BannerMsg banner;
  if (!decode(read_handshake_frame(g.fd, kBanner, deadline, what), banner))
    throw TransferErr(ErrKind::kGeneric, "", what + ": malformed banner");
  const std::string peer_name = banner.name;
  if (peer_name == cfg_.name) throw TransferErr(ErrKind::kGeneric, "", what + ": that is this engine itself");

  auto wait_established = [&](std::unique_lock<std::mutex>& lk) -> std::string {
    for (;;) {
      auto it = peers_.find(peer_name);
      if (it != peers_.end()) {
        if (it->second->dead()) throw TransferErr(it->second->dead_error());
        return peer_name;
      }
      if (closing_.load()) throw TransferErr(ErrKind::kGeneric, "", "engine closed");
      int64_t left = deadline - now_ns();
      if (left <= 0) throw TransferErr(ErrKind::kTimeout, peer_name, what + ": peer did not finish connecting");
      peers_cv_.wait_for(lk, std::chrono::nanoseconds(std::min<int64_t>(left, 50000000)));
    }
  };
  {
    std::unique_lock<std::mutex> lk(mu_);
    // Already connected (or another thread is dialing it): use that connection.
    if (peers_.count(peer_name) || dialing_.count(peer_name)) return wait_established(lk);
    dialing_.insert(peer_name);
  }
  struct DialDone {
    Engine* e;
    const std::string& n;
    ~DialDone() {
      std::lock_guard<std::mutex> g(e->mu_);
      e->dialing_.erase(n);
      e->peers_cv_.notify_all();
    }
  } dial_done{this, peer_name};

  HelloMsg hello;
  hello.name = cfg_.name;
  hello.host_id = cfg_.host_id;
  hello.pid = static_cast<uint32_t>(getpid());
  hello.endpoint = endpoint_;
  hello.nonce = random_bytes(kNonceBytes);
  hello.mac = mac_hello(banner.nonce, cfg_.name);
  hello.doorbell_fd = static_cast<uint32_t>(inbox_.doorbell_region().fd());
  hello.doorbell_name = inbox_.doorbell_region().name();
  send_frame_blocking(g.fd, kHello, encode(hello), deadline, what);
  HelloAckMsg ack;
  if (!decode(read_handshake_frame(g.fd, kHelloAck, deadline, what), ack))
    throw TransferErr(ErrKind::kGeneric, peer_name, what + ": malformed HELLO_ACK");
  switch (ack.status) {
    case kHelloOk:
      break;
    case kHelloDuplicate: {
      ::close(g.release());
      std::unique_lock<std::mutex> lk(mu_);
      dialing_.erase(peer_name);
      return wait_established(lk);
    }
    case kHelloBadSecret:
      throw TransferErr(ErrKind::kGeneric, peer_name, "connection refused by peer: bad secret");
    case kHelloDeadName:
      throw TransferErr(ErrKind::kGeneric, peer_name,
                        "connection refused: the peer considers this engine's name dead (use a new engine): " +
                            ack.message);
    default:
      throw TransferErr(ErrKind::kGeneric, peer_name, "connection refused by peer: " + ack.message);
  }
  if (!equal_ct(ack.mac, mac_ack(hello.nonce, peer_name)))
    throw TransferErr(ErrKind::kGeneric, peer_name, "peer failed the secret check (different group secret)");

  auto peer = std::make_shared<Peer>();
  peer->name = peer_name;
  peer->name_ptr = std::make_shared<const std::string>(peer_name);
  peer->host_id = ack.host_id;
  peer->pid = ack.pid;
  peer->endpoint = ack.endpoint.empty() ? endpoint : ack.endpoint;
  peer->same_host = ack.host_id == cfg_.host_id;
  peer->doorbell_fd = ack.doorbell_fd;
  peer->doorbell_name = ack.doorbell_name;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (closing_.load()) throw TransferErr(ErrKind::kGeneric, "", "engine closed");
    if (peers_.count(peer_name)) {
      // Cannot happen with the crossing rule; keep the existing connection.
      log(kLogError, "duplicate connection to '" + peer_name + "' after handshake; dropping the new one");
      return peer_name;
    }
    auto c = std::make_shared<Connection>(g.release(), epfd_, true, endpoint);
    c->established = true;
    c->peer = peer;
    peer->conn = c;
    peers_[peer_name] = peer;
    dialing_.erase(peer_name);
    register_conn(c);
    set_state(peer, PeerState::kAlive);
  }
  log(kLogInfo, "connected to peer '" + peer_name + "' at " + endpoint + (peer->same_host ? " (same host)" : ""));
  return peer_name;
}

std::shared_ptr<Peer> Engine::find_peer(const std::string& name) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = peers_.find(name);
  return it == peers_.end() ? nullptr : it->second;
}

std::shared_ptr<Peer> Engine::require_peer(const std::string& name) {
  auto p = find_peer(name);
  if (!p) throw TransferErr(ErrKind::kGeneric, name, "unknown peer (not connected)");
  return p;
}

void Engine::set_state(const std::shared_ptr<Peer>& p, PeerState s) {
  int cur = p->state.load();
  do {
    // DEAD is final.
    if (cur == static_cast<int>(PeerState::kDead) || cur == static_cast<int>(s)) return;
  } while (!p->state.compare_exchange_weak(cur, static_cast<int>(s)));
  publish_state(p, s);
}

void Engine::publish_state(const std::shared_ptr<Peer>& p, PeerState s) {
  if (p->forgotten.load()) return;
  poll_events_.push(Event{false, p->name, static_cast<int>(s)});
  if (callbacks_on_.load()) bg_events_.push(Event{false, p->name, static_cast<int>(s)});
}

void Engine::mark_dead(const std::shared_ptr<Peer>& p, const std::string& reason, bool exited) {
  std::shared_ptr<Connection> c;
  {
    std::lock_guard<std::mutex> g(p->mu);
    if (exited) p->exited = true;  // also when already dead: a later, stronger reason
    if (p->state.exchange(static_cast<int>(PeerState::kDead)) == static_cast<int>(PeerState::kDead)) return;
    p->reason = reason;
    c = p->conn;
    p->cv.notify_all();
  }
  publish_state(p, PeerState::kDead);
  if (!p->forgotten.load()) inbox_.mark_dead(p->name, reason);
  // UCX ops to it fail now: its endpoint is force-closed by the UCX progress thread.
  if (UcxTransport* u = ucx_ptr_.load(std::memory_order_acquire)) u->peer_dead(p->name);
  // Pending requests are failed by the I/O thread when it closes the connection.
  if (c) {
    c->request_close();
    wake_io();
  }
  // A peer that closed its engine (BYE) is the normal end of a job: not worth a warning.
  log(reason == kReasonBye ? kLogInfo : kLogWarning, "peer '" + p->name + "' is DEAD: " + reason);
}

void Engine::refuse_name(const std::string& name, const std::string& reason, bool disconnect) {
  std::shared_ptr<Peer> p;
  {
    std::lock_guard<std::mutex> g(mu_);
    refused_[name] = reason;
    auto it = peers_.find(name);
    if (it != peers_.end()) p = it->second;
  }
  if (disconnect && p) mark_dead(p, "refused here: " + reason);
}

bool Engine::peer_exited(const std::string& name) {
  auto p = find_peer(name);
  if (!p) return false;
  std::lock_guard<std::mutex> g(p->mu);
  return p->exited;
}

PeerState Engine::peer_state(const std::string& name) {
  auto p = find_peer(name);
  return p ? static_cast<PeerState>(p->state.load()) : PeerState::kUnknown;
}

std::vector<std::pair<std::string, int>> Engine::peers() {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<std::pair<std::string, int>> out;
  out.reserve(peers_.size());
  for (auto& kv : peers_) out.emplace_back(kv.first, kv.second->state.load());
  return out;
}

void Engine::disconnect(const std::string& name) {
  std::shared_ptr<Peer> p;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = peers_.find(name);
    if (it == peers_.end()) return;
    p = it->second;
    peers_.erase(it);
  }
  if (auto c = p->get_conn()) send_control(*c, kBye);
  mark_dead(p, "disconnected locally");
  p->forgotten.store(true);
  inbox_.forget(name);
  log(kLogInfo, "forgot peer '" + name + "'");
}

double Engine::probe(const std::string& name, double timeout_s) {
  auto p = require_peer(name);
  if (p->dead()) throw TransferErr(p->dead_error());
  auto c = p->get_conn();
  if (!c) throw TransferErr(p->dead_error());
  auto b = std::make_shared<Batch>(1);
  const uint64_t req = next_req();
  Pending pend;
  pend.kind = Pending::kPing;
  pend.batch = b;
  pend.t0 = now_ns();
  if (!c->add_pending(req, pend)) throw TransferErr(p->dead_error());
  send_control(*c, kPing, req);
  Status s = b->wait(deadline_after(timeout_s));
  if (s == Status::kTimeout) {
    Pending drop;
    c->take_pending(req, &drop);
    throw TransferErr(ErrKind::kTimeout, name, "probe got no answer");
  }
  if (s == Status::kFailed) throw TransferErr(b->error());
  return static_cast<double>(b->value_ns.load()) / 1e9;
}

bool Engine::wait_peer_event(double timeout_s, Event& out) {
  return poll_events_.pop(out, deadline_after(timeout_s));
}

bool Engine::next_bg_event(double timeout_s, Event& out) { return bg_events_.pop(out, deadline_after(timeout_s)); }

size_t Engine::connection_count() {
  std::lock_guard<std::mutex> g(mu_);
  size_t n = 0;
  for (auto& kv : conns_) n += kv.second->established ? 1 : 0;
  return n;
}

void Engine::close() {
  std::lock_guard<std::mutex> guard(close_mu_);
  if (closing_.exchange(true)) return;
  // Before the BYEs and before the liveness lock is released (the I/O thread ends below): a
  // same-host peer whose watcher sees the lock go before it reads our BYE still knows this was a
  // clean close. From here on, a peer's answer to our BYE (it drops the connection) is no news
  // either (close_conn checks closing_).
  inbox_.mark_closing();
  // Same-host peers' CMA copies into our segments stop here (TCP ones with the I/O thread).
  revoke_all_cma();
  std::vector<std::shared_ptr<Connection>> conns;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& kv : conns_)
      if (kv.second->established) conns.push_back(kv.second);
    peers_cv_.notify_all();
  }
  for (auto& c : conns) send_control(*c, kBye);
  {
    std::lock_guard<std::mutex> g(watch_link_->mu);  // detached liveness watchers stop calling in
    watch_link_->engine = nullptr;
  }
  stop_.store(true);
  wake_io();
  if (io_thread_.joinable()) io_thread_.join();
  {
    std::lock_guard<std::mutex> g(ucxq_mu_);
    ucxq_stop_ = true;
    ucxq_.clear();
  }
  ucxq_cv_.notify_all();
  if (ucxq_thread_.joinable()) ucxq_thread_.join();
  {
    std::lock_guard<std::mutex> g(copier_mu_);
    copier_stop_ = true;
  }
  copier_cv_.notify_all();
  if (copier_.joinable()) copier_.join();
  {
    std::lock_guard<std::mutex> g(ucx_mu_);
    if (ucx_) ucx_->shutdown();  // fails what is left in flight over UCX ("engine closed")
  }
  inbox_.close();
  poll_events_.close();
  bg_events_.close();
  ::close(listen_fd_);
  ::close(epfd_);
  ::close(wake_fd_);
  listen_fd_ = epfd_ = wake_fd_ = -1;
}

}  // namespace mooncake::transfer
