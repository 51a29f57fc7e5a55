// UCX transport (see transport_ucx.h).
#include "transport_ucx.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>

#include "engine.h"
#include "frame.h"

namespace mooncake::transfer {

using namespace ucx;  // NOLINT: the ucp_* / UCS_* names of ucx_api.h

namespace {
constexpr uint32_t kInfoVersion = 1;
constexpr int64_t kCloseDeadlineNs = 2LL * 1000000000LL;  // a forced close that UCX does not finish
constexpr int kIdleWaitMs = 100;                          // the progress thread re-checks this often
// An op that failed because its endpoint failed, while the peer is not DEAD (yet), waits this long
// for the failure detector: a killed peer's UCX connection often breaks a few ms before the
// engine's own connection reports EOF, and the op should then fail with PeerDeadError.
constexpr int64_t kDeadGraceNs = 500LL * 1000000LL;
constexpr size_t kMaxAddressBytes = 16384;
constexpr size_t kMaxRkeyBytes = 16384;
// An op's deadline allows every byte queued on the worker ahead of it (and its own) to move at
// this rate at least (a floor far below any transport UCX uses, shared by all peers).
constexpr double kMinBytesPerSec = 100e6;
// The deadline's fixed part, by default this many heartbeat timeouts: a peer that stops
// answering is declared DEAD by the failure detector first (PeerDeadError, as over tcp); this
// catches a UCX path that stalls while the peer still answers on the engine's connection.
// MOONCAKE_UCX_OP_TIMEOUT_MS overrides it.
constexpr double kOpTimeoutHeartbeats = 2.0;
constexpr double kMaxOpTimeoutMs = 3600e3;
}  // namespace

// Context + worker, shared by the transport, the endpoints, rkeys and memory maps so that UCX
// objects are released in order (rkeys and maps before the worker and context) whoever goes last.
//
// It also owns what UCX may still call back into or read: every op whose requests UCX has not
// returned (the requests' user data), every endpoint whose close UCX did not finish (the error
// callback's argument), and every rkey that such an op was posted with but no segment holds any
// more. Ops and endpoints are freed after ucp_worker_destroy at the latest, whose purge may
// complete requests: the callbacks then see `live` null and only release what they own.
//
// rkeys: UCX reads an op's rkey until it returns the op's last request (its software RMA over tcp
// packs the rkey's memory type into every fragment it sends, fragments that wait in UCX's queues
// while the owner's socket is full), so an rkey is destroyed only when no UcxRemote holds it
// (the RemoteSegment was dropped, or rebound to a fresh endpoint after a stall) *and* no op that
// names it is left (rkey_ops). Ops do not hold their UcxRemote: that would hold the core (and
// its worker) from the core's own op table, so ops pending at shutdown would never be freed.
struct UcxCore {
  const Lib* lib = nullptr;
  ucp_context_h ctx = nullptr;
  ucp_worker_h worker = nullptr;
  std::mutex mu;  // every UCX call on this context/worker (the worker is SERIALIZED)
  // All under mu (or single-threaded in the destructor).
  UcxTransport* live = nullptr;                   // null once the transport shut down
  std::unordered_set<UcxOp*> ops;                 // every op not yet freed
  std::vector<std::shared_ptr<UcxEp>> keep_eps;   // closes UCX did not finish in time
  std::unordered_map<ucp_rkey_h, int> rkey_ops;   // rkey -> ops not yet freed posted with it
  std::unordered_set<ucp_rkey_h> dropped_rkeys;   // no UcxRemote holds them; ops still name them
  // `u` is about to post requests naming `rk`: `rk` is kept until `u` is freed.
  void use_rkey(UcxOp* u, ucp_rkey_h rk);
  // Its holder lets go of `rk`: destroyed now, or when the last op naming it is freed.
  void drop_rkey(ucp_rkey_h rk);
  // Frees `u` (finished, every request returned by UCX) and the rkey it was the last user of.
  void free_op(UcxOp* u);
  ~UcxCore();
};

struct UcxEp {
  std::string peer;
  ucp_ep_h ep = nullptr;
  UcxCore* core = nullptr;  // outlives every UcxEp UCX can call back about
  bool failed = false;   // no new ops
  bool closing = false;  // ucp_ep_close_nbx was called
  std::string why;
  ErrKind why_kind = ErrKind::kGeneric;  // kTimeout: reset because an op passed its deadline
  std::unordered_set<UcxOp*> ops;  // started, not finished
};

// One op. Guarded by the core lock; owned by UcxCore::ops, freed (UcxCore::free_op) once it is
// finished and UCX has returned every request it holds for it, never earlier.
struct UcxOp {
  UcxCore* core = nullptr;
  std::shared_ptr<Batch> batch;
  std::shared_ptr<Peer> peer;
  std::shared_ptr<UcxEp> ep;
  bool write = true;
  uint64_t len = 0;
  int64_t started = 0;
  int64_t deadline = kForever;
  int outstanding = 0;  // UCX requests not called back yet
  bool finished = false;
  int status = UCS_OK;
  ucp_rkey_h rkey = nullptr;  // the rkey its requests name (counted in UcxCore::rkey_ops)
};

void UcxCore::use_rkey(UcxOp* u, ucp_rkey_h rk) {
  u->rkey = rk;
  ++rkey_ops[rk];
}

void UcxCore::drop_rkey(ucp_rkey_h rk) {
  if (!rk) return;
  if (rkey_ops.count(rk)) dropped_rkeys.insert(rk);
  else lib->rkey_destroy(rk);
}

void UcxCore::free_op(UcxOp* u) {
  ops.erase(u);
  if (u->rkey) {
    auto it = rkey_ops.find(u->rkey);
    if (it != rkey_ops.end() && --it->second == 0) {
      rkey_ops.erase(it);
      // UCX has returned every request that named it (possibly inside its own progress: UCX
      // destroys rkeys from request completions itself).
      if (dropped_rkeys.erase(u->rkey)) lib->rkey_destroy(u->rkey);
    }
  }
  delete u;
}

UcxCore::~UcxCore() {
  if (worker) {
    // No UcxRemote is left (each holds the core): the rkeys left are named by ops whose requests
    // UCX never returned (their endpoints' forced close did not finish). They come from the
    // worker's memory pool, so they go before it; ucp_worker_destroy then only purges those
    // requests (completes them with an error, sending nothing), calling on_request with
    // live == null.
    for (ucp_rkey_h rk : dropped_rkeys) lib->rkey_destroy(rk);
    dropped_rkeys.clear();
    rkey_ops.clear();
    lib->worker_destroy(worker);
  }
  for (UcxOp* u : ops) delete u;  // no worker, no callbacks any more
  ops.clear();
  keep_eps.clear();
  if (ctx) lib->cleanup(ctx);
}

UcxMemReg::~UcxMemReg() {
  if (!core || !memh) return;
  std::lock_guard<std::mutex> g(core->mu);
  core->lib->mem_unmap(core->ctx, memh);
}

UcxRemote::~UcxRemote() {
  if (!core || !rkey) return;
  // Ops posted with the rkey may still be in UCX's hands (the segment was dropped right after
  // submit()): the core then keeps the rkey until UCX returned them.
  std::lock_guard<std::mutex> g(core->mu);
  core->drop_rkey(rkey);
}

namespace {

// Creates `core.ctx` and reads what UCX offers: CUDA memory, RDMA transports, a description.
bool open_context(UcxCore& core, bool& cuda, bool& rdma, std::string& describe, std::string& why) {
  const Lib* lib = core.lib;
  ucp_config_t* config = nullptr;
  ucs_status_t st = lib->config_read(nullptr, nullptr, &config);
  if (st != UCS_OK) {
    why = "UCX configuration (UCX_* environment) is invalid: " + lib->err(st);
    return false;
  }
  // UCX's tcp transport redials a connection that fails while it is being established
  // (tcp_ep.c: states CONNECTING / WAITING_ACK) up to UCX_TCP_MAX_CONN_RETRIES times (default 25)
  // to the same IP:port, which a different process may listen on by then: it accepts without
  // authentication, and UCX's tcp put / software get handlers act on the raw addresses they are
  // sent. One attempt only, unless the user set it. (ucp_config_modify takes the name without
  // "UCX_" and hands it to every transport's config; a UCX that lacks it refuses it: ignored.)
  if (!std::getenv("UCX_TCP_MAX_CONN_RETRIES")) lib->config_modify(config, "TCP_MAX_CONN_RETRIES", "1");
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
  params.name = "mooncake-transfer";
  st = lib->init_version(1, 12, &params, config, &core.ctx);
  lib->config_release(config);
  if (st != UCS_OK) {
    core.ctx = nullptr;
    why = "UCX " + lib->version + " (" + lib->path + ") could not start: ucp_init: " + lib->err(st) +
          " (check UCX_TLS / UCX_NET_DEVICES)";
    return false;
  }
  ucp_context_attr_t attr{};
  attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  cuda = lib->context_query(core.ctx, &attr) == UCS_OK && ((attr.memory_types >> UCS_MEMORY_TYPE_CUDA) & 1);

  // Which transports UCX will use: from its own report (ucp_context_print_info), whose resource
  // lines end in "<transport>/<device>".
  std::set<std::string> tls;
  char* buf = nullptr;
  size_t blen = 0;
  if (FILE* f = open_memstream(&buf, &blen)) {
    lib->context_print_info(core.ctx, f);
    fclose(f);
    std::string text(buf ? buf : "", blen);
    free(buf);
    size_t pos = 0;
    while (pos < text.size()) {
      size_t end = text.find('\n', pos);
      if (end == std::string::npos) end = text.size();
      const std::string line = text.substr(pos, end - pos);
      pos = end + 1;
      if (line.find("resource") == std::string::npos) continue;
      size_t sp = line.find_last_of(" \t");
      std::string tl = line.substr(sp == std::string::npos ? 0 : sp + 1);
      size_t slash = tl.find('/');
      if (slash == std::string::npos || slash == 0) continue;
      tls.insert(tl.substr(0, slash));
    }
  }
  std::string names;
  rdma = false;
  for (auto& n : tls) {
    names += (names.empty() ? "" : ", ") + n;
    // RDMA: the verbs families (rc*, dc*, ud*) and other fabrics' RMA transports.
    if (n.rfind("rc", 0) == 0 || n.rfind("dc", 0) == 0 || n.rfind("ud", 0) == 0 || n.rfind("gga", 0) == 0 ||
        n == "srd" || n == "ugni_rdma")
      rdma = true;
  }
  describe = "UCX " + lib->version + " (" + lib->path + "): transports " + (names.empty() ? "?" : names) +
             (cuda ? "; CUDA memory supported" : "; no CUDA memory support");
  return true;
}

}  // namespace

std::string UcxTransport::probe(const std::string& lib_dir, bool* rdma, bool* cuda, std::string* describe) {
  std::string why;
  const Lib* lib = ucx::load(lib_dir, why);
  if (!lib) return why;
  UcxCore core;
  core.lib = lib;
  bool c = false, r = false;
  std::string d;
  if (!open_context(core, c, r, d, why)) return why;
  if (rdma) *rdma = r;
  if (cuda) *cuda = c;
  if (describe) *describe = d;
  return {};
}

std::unique_ptr<UcxTransport> UcxTransport::create(Engine& e, const std::string& lib_dir, std::string& why) {
  const Lib* lib = ucx::load(lib_dir, why);
  if (!lib) return nullptr;
  std::unique_ptr<UcxTransport> t(new UcxTransport(e));
  auto core = std::make_shared<UcxCore>();
  core->lib = lib;
  if (!open_context(*core, t->cuda_, t->rdma_, t->describe_, why)) return nullptr;
  ucs_status_t st;

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;  // serialized by UcxCore::mu
  st = lib->worker_create(core->ctx, &wp, &core->worker);
  if (st != UCS_OK) {
    core->worker = nullptr;
    why = "UCX worker could not be created: " + lib->err(st);
    return nullptr;
  }
  ucp_address_t* addr = nullptr;
  size_t alen = 0;
  st = lib->worker_get_address(core->worker, &addr, &alen);
  if (st != UCS_OK || alen == 0 || alen > kMaxAddressBytes) {
    if (st == UCS_OK) lib->worker_release_address(core->worker, addr);
    why = "UCX worker address unavailable: " + (st == UCS_OK ? "size " + std::to_string(alen) : lib->err(st));
    return nullptr;
  }
  t->address_.assign(reinterpret_cast<const char*>(addr), alen);
  lib->worker_release_address(core->worker, addr);
  st = lib->worker_get_efd(core->worker, &t->worker_fd_);
  if (st != UCS_OK) {
    why = "UCX worker has no event fd (UCP_FEATURE_WAKEUP): " + lib->err(st);
    return nullptr;
  }
  t->epfd_ = epoll_create1(EPOLL_CLOEXEC);
  t->wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (t->epfd_ < 0 || t->wake_fd_ < 0) {
    why = "epoll/eventfd for the UCX progress thread: " + errno_str(errno);
    return nullptr;
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = t->worker_fd_;
  epoll_ctl(t->epfd_, EPOLL_CTL_ADD, t->worker_fd_, &ev);
  ev.data.fd = t->wake_fd_;
  epoll_ctl(t->epfd_, EPOLL_CTL_ADD, t->wake_fd_, &ev);
  double op_timeout_s = kOpTimeoutHeartbeats * e.heartbeat_timeout();
  if (const char* v = std::getenv("MOONCAKE_UCX_OP_TIMEOUT_MS"); v && *v) {
    char* end = nullptr;
    const double ms = std::strtod(v, &end);
    if (end && *end == '\0' && ms > 0 && ms <= kMaxOpTimeoutMs) {
      op_timeout_s = ms / 1e3;
    } else {
      e.log(kLogWarning, std::string("MOONCAKE_UCX_OP_TIMEOUT_MS='") + v + "' is not a number of ms in (0, " +
                             std::to_string(static_cast<int64_t>(kMaxOpTimeoutMs)) + "]: using " +
                             std::to_string(op_timeout_s) + " s");
    }
  }
  t->op_timeout_ns_ = static_cast<int64_t>(op_timeout_s * 1e9);
  core->live = t.get();
  t->core_ = std::move(core);
  UcxTransport* raw = t.get();
  t->thread_ = std::thread([raw] { raw->progress_loop(); });
  return t;
}

UcxTransport::~UcxTransport() {
  shutdown();
  if (epfd_ >= 0) ::close(epfd_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

void UcxTransport::kick() {
  uint64_t one = 1;
  ssize_t r = ::write(wake_fd_, &one, sizeof(one));
  (void)r;
}

std::shared_ptr<UcxMemReg> UcxTransport::map(void* addr, uint64_t length, bool cuda, std::string& why) {
  auto reg = std::make_shared<UcxMemReg>();
  std::lock_guard<std::mutex> g(core_->mu);
  const Lib* lib = core_->lib;
  ucp_mem_map_params_t mp{};
  mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  mp.address = addr;
  mp.length = static_cast<size_t>(length);
  if (cuda) {
    mp.field_mask |= UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
    mp.memory_type = UCS_MEMORY_TYPE_CUDA;
  }
  ucp_mem_h memh = nullptr;
  ucs_status_t st = lib->mem_map(core_->ctx, &mp, &memh);
  if (st != UCS_OK) {
    why = "ucp_mem_map of " + std::to_string(length) + " bytes failed: " + lib->err(st);
    return nullptr;
  }
  void* rk = nullptr;
  size_t rlen = 0;
  st = lib->rkey_pack(core_->ctx, memh, &rk, &rlen);
  if (st != UCS_OK || rlen > kMaxRkeyBytes) {
    if (st == UCS_OK) lib->rkey_buffer_release(rk);
    lib->mem_unmap(core_->ctx, memh);
    why = "ucp_rkey_pack failed: " + (st == UCS_OK ? "rkey of " + std::to_string(rlen) + " bytes" : lib->err(st));
    return nullptr;
  }
  reg->rkey.assign(static_cast<const char*>(rk), rlen);
  lib->rkey_buffer_release(rk);
  reg->memh = memh;
  reg->core = core_;
  return reg;
}

bool UcxTransport::export_segment(LocalSegment& seg, std::string& payload, std::string& why) {
  std::shared_ptr<UcxMemReg> reg;
  {
    std::lock_guard<std::mutex> g(seg.mu);
    reg = std::static_pointer_cast<UcxMemReg>(seg.ucx_reg);
  }
  if (!reg) {
    if (seg.location != "cpu") {
      why = "segment " + std::to_string(seg.id) + " (" + seg.location + ") has no UCX mapping";
      return false;
    }
    reg = map(seg.addr, seg.length, false, why);
    if (!reg) return false;
    std::lock_guard<std::mutex> g(seg.mu);
    if (seg.ucx_reg) reg = std::static_pointer_cast<UcxMemReg>(seg.ucx_reg);  // a concurrent export won
    else seg.ucx_reg = reg;
  }
  Writer w;
  w.u32(kInfoVersion);
  w.str(address_);
  w.str(reg->rkey);
  w.u64(reinterpret_cast<uint64_t>(seg.addr));
  w.u64(seg.length);
  payload = std::move(w.data());
  return true;
}

void UcxTransport::attach(RemoteSeg& rs, const std::string& payload) {
  const std::string& peer = rs.peer->name;
  Reader r(payload.data(), payload.size());
  const uint32_t ver = r.u32();
  const std::string address = r.str(kMaxAddressBytes);
  const std::string rkey = r.str(kMaxRkeyBytes);
  const uint64_t addr = r.u64();
  const uint64_t length = r.u64();
  if (!r.ok() || !r.at_end() || ver != kInfoVersion || address.empty() || rkey.empty())
    throw TransferErr(ErrKind::kGeneric, peer, "malformed UCX segment information from the owner");
  if (length != rs.desc.length || addr != rs.desc.addr)
    throw TransferErr(ErrKind::kGeneric, peer,
                      "the owner's segment " + std::to_string(rs.desc.seg_id) + " is " + std::to_string(length) +
                          " bytes at " + std::to_string(addr) + ", not what the descriptor says (" +
                          std::to_string(rs.desc.length) + " bytes): forged or stale descriptor");
  auto remote = std::make_shared<UcxRemote>();
  {
    std::lock_guard<std::mutex> g(core_->mu);
    if (!core_->live) throw TransferErr(ErrKind::kGeneric, peer, "engine closed");
    // A peer marked DEAD before this point had its endpoints closed already (peer_dead); one
    // marked later is closed by the progress thread, which takes this lock after us.
    if (rs.peer->dead()) throw TransferErr(rs.peer->dead_error());
    const Lib* lib = core_->lib;
    std::shared_ptr<UcxEp> slot = ep_for_locked(peer, address);
    ucp_rkey_h rk = nullptr;
    ucs_status_t st = lib->ep_rkey_unpack(slot->ep, rkey.data(), &rk);
    if (st != UCS_OK)
      throw TransferErr(ErrKind::kGeneric, peer, "the owner's rkey was refused by UCX: " + lib->err(st));
    remote->core = core_;
    remote->ep = slot;
    remote->rkey = rk;
    remote->address = address;
    remote->rkey_packed = rkey;
    remote->addr = addr;
    remote->length = length;
  }
  kick();  // the new endpoint's wire-up needs progress
  rs.ucx = std::move(remote);
}

std::shared_ptr<UcxEp> UcxTransport::ep_for_locked(const std::string& peer, const std::string& address) {
  const Lib* lib = core_->lib;
  std::shared_ptr<UcxEp> slot;
  auto found = eps_.find(peer);
  if (found != eps_.end()) slot = found->second;
  if (slot && !slot->failed) return slot;
  auto ep = std::make_shared<UcxEp>();
  ep->peer = peer;
  ep->core = core_.get();
  ucp_ep_params_t ep_params{};
  ep_params.field_mask =
      UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep_params.address = reinterpret_cast<const ucp_address_t*>(address.data());
  ep_params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep_params.err_handler.cb = &UcxTransport::on_ep_error;
  // Lives in eps_ / to_close_ / closing_ until its close finished, else in core_->keep_eps.
  ep_params.err_handler.arg = ep.get();
  ucs_status_t st = lib->ep_create(core_->worker, &ep_params, &ep->ep);
  if (st != UCS_OK)
    throw TransferErr(ErrKind::kGeneric, peer,
                      "ucp_ep_create to the owner failed: " + lib->err(st) +
                          (st == -6 /* UCS_ERR_UNREACHABLE */
                               ? " (the ucx transport needs peer failure handling: UCX_TLS must include a "
                                 "transport that has it, such as tcp or an RDMA one; shared-memory-only "
                                 "sets like 'sm' lack it)"
                               : ""));
  if (slot) to_close_.push_back(slot);  // a failed one: closed by the progress thread
  eps_[peer] = ep;
  return ep;
}

int64_t UcxTransport::op_deadline_locked(uint64_t len) const {
  const double allowance_ns = static_cast<double>(queued_bytes_ + len) / kMinBytesPerSec * 1e9;
  return now_ns() + op_timeout_ns_ + static_cast<int64_t>(std::min(allowance_ns, 1e17));
}

void UcxTransport::release_locked(UcxOp* u) { core_->free_op(u); }

void UcxTransport::post(const Op& op, const std::shared_ptr<Batch>& b) {
  const auto& peer = op.seg->peer;
  auto finish_now = [&](const ErrorInfo& e) {
    b->complete_err(e);
    engine_.local_op_done(*peer);
  };
  UcxRemote* rem = op.seg->ucx.get();
  if (!rem) return finish_now(ErrorInfo{ErrKind::kGeneric, peer->name, "segment not opened over ucx"});
  // Checked again here against what the owner said (the bindings check the descriptor).
  if (op.offset > rem->length || op.len > rem->length - op.offset)
    return finish_now(ErrorInfo{ErrKind::kGeneric, peer->name,
                                "ucx: offset + length = " + std::to_string(op.offset + op.len) +
                                    " exceeds the owner's segment length " + std::to_string(rem->length)});
  if (peer->dead()) return finish_now(peer->dead_error());
  bool pending;
  {
    std::unique_lock<std::mutex> g(core_->mu);
    if (!core_->live) {
      g.unlock();
      return finish_now(ErrorInfo{ErrKind::kGeneric, peer->name, "engine closed"});
    }
    const Lib* lib = core_->lib;
    if (rem->ep->failed && peer->dead()) {
      g.unlock();
      return finish_now(peer->dead_error());
    }
    if (rem->ep->failed && rem->ep->why_kind == ErrKind::kTimeout) {
      // Its endpoint was reset after an op passed its deadline (a stalled UCX path, the peer
      // alive): bind this segment to the peer's current endpoint, a fresh one if need be.
      ucp_rkey_h rk = nullptr;
      std::string why;
      try {
        auto ep = ep_for_locked(peer->name, rem->address);
        ucs_status_t st = lib->ep_rkey_unpack(ep->ep, rem->rkey_packed.data(), &rk);
        if (st != UCS_OK) {
          why = "the owner's rkey was refused by UCX: " + lib->err(st);
        } else {
          // The old rkey may still be named by requests UCX has not returned on the old
          // endpoint: the core destroys it once their ops are freed.
          core_->drop_rkey(rem->rkey);
          rem->rkey = rk;
          rem->ep = ep;
        }
      } catch (const TransferErr& e) {
        why = e.info.reason;
      }
      if (!why.empty()) {
        g.unlock();
        return finish_now(ErrorInfo{ErrKind::kGeneric, peer->name, "ucx: reconnecting after a stall failed: " + why});
      }
    }
    auto& ep = rem->ep;
    auto* u = new UcxOp;
    core_->ops.insert(u);
    u->core = core_.get();
    u->batch = b;
    u->peer = peer;
    u->ep = ep;
    u->write = op.write;
    u->len = op.len;
    u->started = now_ns();
    u->deadline = op_deadline_locked(op.len);
    next_expiry_ = std::min(next_expiry_, u->deadline);
    queued_bytes_ += op.len;
    if (ep->failed) {
      // UCX saw the connection fail before the engine's detector did: like an op that failed in
      // flight, it waits (kDeadGraceNs at most) for the detector's verdict, so a killed peer
      // reads as PeerDeadError here too.
      u->status = -25;  // UCS_ERR_CONNECTION_RESET
      settle_locked(u);
      pending = true;
    } else {
      ep->ops.insert(u);
      core_->use_rkey(u, rem->rkey);  // kept (even if the segment is dropped) until `u` is freed
      ucp_request_param_t rp{};
      rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      rp.send_cb = reinterpret_cast<ucp_send_nbx_callback_t>(&UcxTransport::on_request);
      rp.user_data = u;
      auto track = [&](ucs_status_ptr_t r) {
        if (r == nullptr) return true;
        if (ptr_is_err(r)) {
          if (u->status == UCS_OK) u->status = ptr_status(r);
          return false;
        }
        ++u->outstanding;
        return true;
      };
      const uint64_t raddr = rem->addr + op.offset;
      if (op.write) {
        if (track(lib->put_nbx(ep->ep, op.local, static_cast<size_t>(op.len), raddr, rem->rkey, &rp)))
          track(lib->ep_flush_nbx(ep->ep, &rp));  // remote completion: the data is in the owner's memory
      } else {
        track(lib->get_nbx(ep->ep, op.local, static_cast<size_t>(op.len), raddr, rem->rkey, &rp));
      }
      pending = u->outstanding > 0;
      settle_locked(u);
    }
  }
  if (pending) kick();
}

void UcxTransport::on_request(void* req, int status, void* user) {
  // Inside worker_progress (core lock held) or ucp_worker_destroy (~UcxCore, single-threaded).
  auto* u = static_cast<UcxOp*>(user);
  UcxCore* core = u->core;
  core->lib->request_free(req);
  if (status != UCS_OK && u->status == UCS_OK) u->status = status;
  --u->outstanding;
  if (core->live) {
    core->live->settle_locked(u);
  } else if (u->outstanding == 0) {
    // The transport shut down (it failed the op already): only the op's memory is left (and
    // the rkey it was the last user of, unless ~UcxCore destroyed that already).
    core->free_op(u);
  }
}

void UcxTransport::settle_locked(UcxOp* u) {
  if (u->outstanding > 0) return;
  // Connection-type failures (reset, unreachable, timed out, canceled, I/O error).
  const int s = u->status;
  const bool conn_err = s == -25 || s == -6 || s == -20 || s == -80 || s == UCS_ERR_CANCELED || s == -3;
  if (!u->finished && s != UCS_OK && (u->ep->failed || conn_err) && u->ep->why_kind != ErrKind::kTimeout &&
      !u->peer->dead() && !stop_.load()) {
    u->ep->ops.erase(u);  // the endpoint's reaper leaves it alone: finished by run_deferred_locked
    deferred_.push_back({u, now_ns() + kDeadGraceNs});
    return;
  }
  if (!u->finished) finish_locked(u, u->status);
  release_locked(u);
}

void UcxTransport::run_deferred_locked(bool all) {
  const int64_t now = now_ns();
  for (size_t i = 0; i < deferred_.size();) {
    UcxOp* u = deferred_[i].first;
    if (!all && !u->peer->dead() && now < deferred_[i].second) {
      ++i;
      continue;
    }
    finish_locked(u, u->status);
    release_locked(u);
    deferred_[i] = deferred_.back();
    deferred_.pop_back();
  }
}

void UcxTransport::finish_locked(UcxOp* u, int status) {
  if (u->finished) return;
  if (status == UCS_OK) {
    u->finished = true;
    u->ep->ops.erase(u);
    queued_bytes_ -= std::min(queued_bytes_, u->len);
    u->batch->complete_ok();
    engine_.local_op_done(*u->peer);
    return;
  }
  const char* what = u->write ? "write" : "read";
  if (u->peer->dead()) {
    finish_err_locked(u, u->peer->dead_error());
  } else if (u->ep->why_kind == ErrKind::kTimeout) {
    // Canceled with its endpoint, which another op's deadline reset.
    finish_err_locked(u, ErrorInfo{ErrKind::kTimeout, u->peer->name, std::string("ucx ") + what + " canceled: " + u->ep->why});
  } else {
    std::string why = u->ep->failed && !u->ep->why.empty() ? u->ep->why : core_->lib->err(status);
    finish_err_locked(u, ErrorInfo{ErrKind::kGeneric, u->peer->name, std::string("ucx ") + what + " failed: " + why});
  }
}

void UcxTransport::finish_err_locked(UcxOp* u, const ErrorInfo& e) {
  if (u->finished) return;
  u->finished = true;
  u->ep->ops.erase(u);
  queued_bytes_ -= std::min(queued_bytes_, u->len);
  u->batch->complete_err(e);
  engine_.local_op_done(*u->peer);
}

void UcxTransport::on_ep_error(void* arg, ucp_ep_h, int status) {
  auto* ep = static_cast<UcxEp*>(arg);
  UcxTransport* t = ep->core->live;
  // Core lock held (inside worker_progress): no new ops; the progress thread closes it after
  // progress returns (not from inside UCX's callback). Inside ucp_worker_destroy: nothing to do.
  if (ep->failed || !t) return;
  ep->failed = true;
  ep->why = "connection to the peer failed: " + t->core_->lib->err(status);
  auto it = t->eps_.find(ep->peer);
  if (it != t->eps_.end() && it->second.get() == ep) t->to_close_.push_back(it->second);
}

void UcxTransport::close_ep_locked(const std::shared_ptr<UcxEp>& ep, const std::string& why) {
  if (ep->closing) return;
  ep->closing = true;
  if (!ep->failed) {
    ep->failed = true;
    ep->why = why;
  }
  auto it = eps_.find(ep->peer);
  if (it != eps_.end() && it->second == ep) eps_.erase(it);
  Closing c;
  c.ep = ep;
  c.deadline = now_ns() + kCloseDeadlineNs;
  ucp_request_param_t rp{};
  rp.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  rp.flags = UCP_EP_CLOSE_FLAG_FORCE;  // cancels what is outstanding, no handshake with the peer
  ucs_status_ptr_t r = core_->lib->ep_close_nbx(ep->ep, &rp);
  c.req = (r == nullptr || ptr_is_err(r)) ? nullptr : r;
  closing_.push_back(std::move(c));
}

void UcxTransport::reap_closing_locked(bool force_all) {
  const Lib* lib = core_->lib;
  const int64_t now = now_ns();
  for (size_t i = 0; i < closing_.size();) {
    Closing& c = closing_[i];
    bool done = c.req == nullptr || lib->request_check_status(c.req) != UCS_INPROGRESS;
    if (!done && !force_all && now < c.deadline) {
      ++i;
      continue;
    }
    if (c.req) lib->request_free(c.req);  // an unfinished one is released by UCX when it ends
    // UCX may still call the endpoint's error callback until its close ends: keep its argument.
    if (!done) core_->keep_eps.push_back(c.ep);
    // Ops UCX did not return by now are failed here; they stay allocated (UcxCore::ops) until
    // UCX returns their requests, as late as ucp_worker_destroy.
    std::vector<UcxOp*> left(c.ep->ops.begin(), c.ep->ops.end());
    for (UcxOp* u : left) finish_locked(u, UCS_ERR_CANCELED);
    closing_.erase(closing_.begin() + static_cast<std::ptrdiff_t>(i));
  }
}

int64_t UcxTransport::expire_locked(int64_t now) {
  int64_t next = kForever;
  std::vector<UcxOp*> expired;
  for (UcxOp* u : core_->ops) {
    if (u->finished || u->outstanding == 0) continue;
    if (now < u->deadline) next = std::min(next, u->deadline);
    else expired.push_back(u);
  }
  std::vector<std::shared_ptr<UcxEp>> stalled;
  for (UcxOp* u : expired) {
    char secs[64];
    snprintf(secs, sizeof(secs), "%.1f s", static_cast<double>(u->deadline - u->started) / 1e9);
    const std::string what = std::string("ucx ") + (u->write ? "write" : "read") + " of " + std::to_string(u->len) +
                             " bytes";
    std::string why = what + " did not complete within its deadline of " + secs +
                      " (the peer's UCX path is stalled; its endpoint was reset)";
    if (!u->ep->closing && std::find(stalled.begin(), stalled.end(), u->ep) == stalled.end()) {
      stalled.push_back(u->ep);
      if (!u->ep->failed) {
        u->ep->failed = true;
        u->ep->why_kind = ErrKind::kTimeout;
        u->ep->why = "an earlier " + what + " passed its " + secs + " deadline (the peer's UCX path is stalled)";
      }
      engine_.log(kLogWarning, "peer '" + u->peer->name + "': " + why);
    }
    // Reported now; the op stays allocated until UCX returns its requests (the close cancels them).
    finish_err_locked(u, u->peer->dead() ? u->peer->dead_error() : ErrorInfo{ErrKind::kTimeout, u->peer->name, why});
  }
  for (auto& ep : stalled) close_ep_locked(ep, ep->why);  // cancels every request on it
  return next;
}

void UcxTransport::peer_dead(const std::string& peer) {
  {
    std::lock_guard<std::mutex> g(q_mu_);
    dead_q_.push_back(peer);
  }
  kick();
}

void UcxTransport::progress_loop() {
  const Lib* lib = core_->lib;
  epoll_event evs[4];
  while (!stop_.load()) {
    std::vector<std::string> dead;
    {
      std::lock_guard<std::mutex> g(q_mu_);
      dead.swap(dead_q_);
    }
    ucs_status_t armed;
    bool closing;
    int64_t next_deadline;
    {
      std::lock_guard<std::mutex> g(core_->mu);
      for (auto& name : dead) {
        auto it = eps_.find(name);
        if (it != eps_.end()) {
          auto ep = it->second;
          close_ep_locked(ep, "the peer is dead");
        }
      }
      for (int i = 0; i < 4096 && lib->worker_progress(core_->worker) != 0; ++i) {
      }
      std::vector<std::shared_ptr<UcxEp>> failed;
      failed.swap(to_close_);
      for (auto& ep : failed) close_ep_locked(ep, ep->why);
      const int64_t now = now_ns();
      if (now >= next_expiry_) next_expiry_ = expire_locked(now);  // scans the ops only then
      next_deadline = next_expiry_;
      reap_closing_locked(false);
      run_deferred_locked(false);
      closing = !closing_.empty() || !deferred_.empty();
      armed = lib->worker_arm(core_->worker);
    }
    if (armed == UCS_ERR_BUSY) continue;  // more events already: progress again
    int ms = closing ? 10 : kIdleWaitMs;
    if (next_deadline != kForever) {
      const int64_t left = next_deadline - now_ns();
      ms = std::max<int>(1, std::min<int>(ms, static_cast<int>(std::max<int64_t>(0, left) / 1000000 + 1)));
    }
    int n = epoll_wait(epfd_, evs, 4, ms);
    for (int i = 0; i < n; ++i) {
      if (evs[i].data.fd == wake_fd_) {
        uint64_t v;
        while (::read(wake_fd_, &v, sizeof(v)) > 0) {
        }
      }
    }
  }
}

void UcxTransport::shutdown() {
  if (stop_.exchange(true)) return;
  kick();
  if (thread_.joinable()) thread_.join();
  if (!core_) return;
  std::lock_guard<std::mutex> g(core_->mu);
  std::vector<std::shared_ptr<UcxEp>> all;
  for (auto& kv : eps_) all.push_back(kv.second);
  for (auto& ep : to_close_) all.push_back(ep);
  to_close_.clear();
  for (auto& ep : all) close_ep_locked(ep, "engine closed");
  // Bounded: a forced close cancels what is outstanding without asking the peer, so it normally
  // ends at once; one that does not is left to UCX (its endpoint kept in core_->keep_eps).
  const int64_t deadline = now_ns() + kCloseDeadlineNs;
  while (!closing_.empty() && now_ns() < deadline) {
    if (core_->lib->worker_progress(core_->worker) == 0) usleep(1000);
    reap_closing_locked(false);
  }
  reap_closing_locked(true);
  run_deferred_locked(true);
  // Whatever is left is failed now; its memory stays with the core until UCX returns its
  // requests (at the latest inside ucp_worker_destroy, whose callbacks see live == null).
  std::vector<UcxOp*> left(core_->ops.begin(), core_->ops.end());
  for (UcxOp* u : left) {
    finish_err_locked(u, ErrorInfo{ErrKind::kGeneric, u->peer->name, "engine closed"});
    if (u->outstanding == 0) release_locked(u);
  }
  core_->live = nullptr;
}

}  // namespace mooncake::transfer
