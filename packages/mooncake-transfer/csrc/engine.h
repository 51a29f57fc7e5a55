// The transfer engine: listens on TCP, keeps one connection per peer, moves data through the
// transport chosen per remote segment, delivers notifications and runs the failure detector.
//
// Threads: one I/O thread (epoll: accept, handshakes, frame receive, send flushing, heartbeats,
// failure detection), one lazily started copy worker for large same-host async copies, and the
// callers' threads (connect handshakes, inline sends, small same-host copies, waits).
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "batch.h"
#include "common.h"
#include "connection.h"
#include "detector.h"
#include "inbox.h"
#include "peer.h"
#include "seg_guard.h"
#include "segment.h"
#include "transport.h"
#include "transport_ucx.h"

namespace mooncake::transfer {

// The failure detector's defaults: the one place they are defined (the Python wrapper and the
// backend read them through mooncake.transfer.DEFAULT_HEARTBEAT_*). 3 s: a killed process is
// detected at once through its connections either way; the heartbeat only catches hung or
// unreachable peers, and a short timeout turns a starved-but-alive process (seen at load
// average > 8 with 1 s) into a false failure.
constexpr double kDefaultHeartbeatIntervalS = 0.1;
constexpr double kDefaultHeartbeatTimeoutS = 3.0;

struct EngineConfig {
  std::string name;
  std::string host = "127.0.0.1";
  int port = 0;
  std::string secret;
  double heartbeat_interval_s = kDefaultHeartbeatIntervalS;
  double heartbeat_timeout_s = kDefaultHeartbeatTimeoutS;
  std::string transport = "auto";  // auto | tcp | cma | shm | rdma | ucx
  std::string host_id;             // empty: derived from boot id, hostname and pid namespace
  double handshake_timeout_s = 5.0;
  bool notify_ring = true;  // same-host notifications through a shared-memory ring
  std::string ucx_lib_dir;  // folder of libucp.so.0 (the libucx wheel's lib/); empty: loader search path
};

class Engine : private FrameHandler {
 public:
  explicit Engine(EngineConfig cfg);
  ~Engine() override;
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const std::string& name() const { return cfg_.name; }
  const std::string& endpoint() const { return endpoint_; }
  const std::string& host_id() const { return cfg_.host_id; }
  const std::string& transport_mode() const { return cfg_.transport; }
  double heartbeat_interval() const { return cfg_.heartbeat_interval_s; }
  double heartbeat_timeout() const { return cfg_.heartbeat_timeout_s; }

  // Connection management (engine.cc).
  std::string connect(const std::string& endpoint, double timeout_s);
  PeerState peer_state(const std::string& peer);
  std::vector<std::pair<std::string, int>> peers();
  void disconnect(const std::string& peer);
  double probe(const std::string& peer, double timeout_s);
  bool wait_peer_event(double timeout_s, Event& out);
  bool next_bg_event(double timeout_s, Event& out);
  void enable_callbacks() { callbacks_on_.store(true); }
  void close();
  bool is_closed() const { return closing_.load(); }

  // Segments (engine.cc).
  std::shared_ptr<LocalSegment> allocate(uint64_t length);
  std::shared_ptr<LocalSegment> register_memory(uint64_t addr, uint64_t length, const std::string& location);
  void unregister(uint64_t seg_id, double timeout_s);
  std::string descriptor(const LocalSegment& seg) const;
  std::shared_ptr<RemoteSeg> open_segment(const std::string& desc, double timeout_s,
                                          const std::string& transport_override);

  // Transfers and notifications (engine_ops.cc). Ops must be validated by the caller.
  std::shared_ptr<Batch> submit(std::vector<Op>& ops);
  void notify(const std::string& peer, const void* data, size_t len, uint64_t tag);
  MessagePtr recv_notify(const std::string* peer, const uint64_t* tag, double timeout_s);
  MessagePtr recv_notify_any(const std::vector<std::string>& peers, uint64_t tag, double timeout_s);
  Inbox& inbox() { return inbox_; }
  // Inbox::recv_round with a timeout.
  void recv_round(const std::vector<std::string>& peers, uint64_t tag, double timeout_s, size_t key_off,
                  const std::string& key, std::vector<MessagePtr>& out, std::vector<std::string>& dead) {
    inbox_.recv_round(peers, tag, deadline_after(timeout_s), key_off, key, out, dead);
  }

  // Used by transports.
  void log(int level, const std::string& msg);
  uint64_t next_req() { return next_req_.fetch_add(1, std::memory_order_relaxed); }
  // From any thread: marks the peer DEAD now; its connection is closed by the I/O thread.
  // `exited`: the peer's process was seen to exit (same host), not just fall silent or disconnect.
  void mark_dead(const std::shared_ptr<Peer>& p, const std::string& reason, bool exited = false);
  // mark_dead's reason for a peer that sent BYE (closed its engine): logged at info level.
  static constexpr const char* kReasonBye = "peer closed the connection";
  // True once `name` was marked dead with `exited` (a proof that its process is gone).
  bool peer_exited(const std::string& name);
  // Refuses every later connection from `name` with `reason` (its HELLO is answered "dead here:
  // <reason>"); with `disconnect`, also marks the connected peer of that name DEAD (its
  // connection closes, so the other side sees this engine gone on every channel).
  void refuse_name(const std::string& name, const std::string& reason, bool disconnect);
  void local_op_done(Peer& p);

  // The UCX transport, started on first use (owner: a peer asks for a segment over UCX; initiator:
  // transport 'ucx', or 'auto' across hosts when UCX has RDMA). Null + `why` when UCX is unusable.
  UcxTransport* ucx(std::string* why);
  // "" when register(..., "cuda:N") can work here (UCX with CUDA memory support), else why not.
  std::string ucx_cuda_status();

  // Established peer connections (tests and the bench).
  size_t connection_count();
  // Counters for tests and the bench: notifications sent through the same-host ring / over TCP.
  std::atomic<uint64_t> notify_ring_sent{0};
  std::atomic<uint64_t> notify_tcp_sent{0};
  // CMA guard (seg_guard.h): lanes of dead peer processes freed by this engine as the owner.
  uint64_t guard_dead_lanes();

 private:
  // engine.cc
  std::shared_ptr<Peer> find_peer(const std::string& name);
  std::shared_ptr<Peer> require_peer(const std::string& name);  // throws unless known
  void set_state(const std::shared_ptr<Peer>& p, PeerState s);
  void publish_state(const std::shared_ptr<Peer>& p, PeerState s);
  void register_conn(const std::shared_ptr<Connection>& c);
  std::string compute_host_id();

  // engine_io.cc
  void io_loop();
  void accept_ready();
  void tick(int64_t now, int64_t* next_wake);
  void close_conn(const std::shared_ptr<Connection>& c, const std::string& why, bool eof);
  void wake_io();
  bool on_header(Connection& c, const FrameHeader& h, RecvTarget& t, std::string& why) override;
  bool on_frame(Connection& c, const FrameHeader& h, std::string& payload, std::string& why) override;
  bool handle_hello(Connection& c, const std::string& payload, std::string& why);
  void send_error(Connection& c, uint64_t req, uint32_t code, const std::string& msg);
  void send_control(Connection& c, uint8_t type, uint64_t req = 0, uint64_t a = 0);
  void handle_ring_offer(Connection& c, const FrameHeader& h, const std::string& payload);
  void handle_ucx_info(Connection& c, const FrameHeader& h);
  void ucx_service_loop();
  std::string mac_hello(const std::string& nonce, const std::string& name) const;
  std::string mac_ack(const std::string& nonce, const std::string& name) const;

  // engine_ops.cc
  void copier_loop();
  void offer_ring(const std::shared_ptr<Peer>& p, Connection& c);
  // Waits (detached thread) on a same-host peer's liveness lock; marks the peer DEAD when the
  // lock is released (see DoorbellWord::alive).
  void watch_liveness(const std::shared_ptr<Peer>& p, std::shared_ptr<SharedRegion> bell);
  void run_local(const Op& op, const std::shared_ptr<Batch>& b);

  // engine_segments.cc
  // Gives a new CPU segment its CMA guard slot (none when the table cannot be made or is full).
  void guard_segment(LocalSegment& seg);
  // Binds `rs` (a same-host segment that CMA can reach) to the owner's guard table; false and
  // `why` when not possible (the caller then uses tcp).
  bool attach_guard(RemoteSeg& rs, std::string& why);
  // Engine::close(): refuses CMA to every segment and waits (bounded) for copies in flight.
  void revoke_all_cma();
  // Binds `rs` to the owner's segment over UCX (asks the owner on the control connection).
  void open_ucx(const std::shared_ptr<RemoteSeg>& rs, double timeout_s);
  // auto mode, other host: is UCX loadable here with an RDMA transport? (asked once, logged)
  bool ucx_for_remote();

  EngineConfig cfg_;
  std::string endpoint_;
  std::string token_;  // random, names this engine's memfds
  FailureDetector detector_;

  int listen_fd_ = -1;
  int epfd_ = -1;
  int wake_fd_ = -1;
  std::thread io_thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> closing_{false};
  std::mutex close_mu_;

  // Guards peers_, conns_, dialing_, and Connection handshake fields.
  std::mutex mu_;
  std::condition_variable peers_cv_;  // a peer got established / a dial finished
  std::unordered_map<std::string, std::shared_ptr<Peer>> peers_;
  std::unordered_map<Connection*, std::shared_ptr<Connection>> conns_;
  std::set<std::string> dialing_;  // names we sent a HELLO to and await the answer from
  std::unordered_map<std::string, std::string> refused_;  // name -> reason (refuse_name)
  size_t handshaking_ = 0;

  SegmentRegistry segments_;
  // The CMA guard table (seg_guard.h), made on the first CPU segment; guard_failed_: could not be.
  std::mutex guard_mu_;
  std::unique_ptr<GuardTable> guard_;
  std::atomic<GuardTable*> guard_ptr_{nullptr};  // guard_, published for lock-free readers
  bool guard_failed_ = false;
  bool guard_full_logged_ = false;
  std::atomic<bool> cma_guard_logged_{false};
  Inbox inbox_;
  EventQueue poll_events_;
  EventQueue bg_events_;
  std::atomic<bool> callbacks_on_{false};
  std::atomic<uint64_t> next_req_{1};
  std::atomic<bool> cma_eperm_logged_{false};
  std::atomic<uint64_t> ring_counter_{0};
  // Liveness watchers are detached threads: they reach the engine only through this, which
  // close() clears under the mutex (so none calls into a closed engine).
  struct WatchLink {
    std::mutex mu;
    Engine* engine = nullptr;
  };
  std::shared_ptr<WatchLink> watch_link_ = std::make_shared<WatchLink>();

  LocalCopyTransport shm_;
  LocalCopyTransport cma_;
  TcpTransport tcp_;

  // UCX (transport_ucx.h): created once under ucx_mu_, published in ucx_ptr_ for lock-free
  // readers (mark_dead), destroyed with the engine.
  std::mutex ucx_mu_;
  std::unique_ptr<UcxTransport> ucx_;
  std::atomic<UcxTransport*> ucx_ptr_{nullptr};
  std::string ucx_why_;     // why the last attempt to start it failed
  int ucx_remote_ = -1;     // ucx_for_remote(): -1 not asked yet, 0 no, 1 yes (under ucx_mu_)
  // Peers' UCX_INFO_REQs are answered by this thread (started on the first one), never by the I/O
  // thread: loading UCX (~0.4 s once per process) and pinning memory (RDMA) take time.
  struct UcxInfoJob {
    std::shared_ptr<Connection> conn;
    uint64_t req = 0;
    uint64_t seg_id = 0;
  };
  std::mutex ucxq_mu_;
  std::condition_variable ucxq_cv_;
  std::deque<UcxInfoJob> ucxq_;
  std::thread ucxq_thread_;
  bool ucxq_stop_ = false;

  // Large same-host async copies.
  std::mutex copier_mu_;
  std::condition_variable copier_cv_;
  std::deque<std::pair<Op, std::shared_ptr<Batch>>> copier_q_;
  std::thread copier_;
  bool copier_stop_ = false;

  // Remote shm mappings, shared by every open of the same segment.
  std::mutex maps_mu_;
  std::unordered_map<std::string, std::weak_ptr<ShmMapping>> maps_;
};

}  // namespace mooncake::transfer
