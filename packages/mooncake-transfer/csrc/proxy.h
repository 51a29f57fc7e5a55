// Host proxy: one native thread per ring that consumes the descriptors a producer (a GPU kernel,
// or a host thread standing in for it) posts into a ProxyRing (include/mooncake/device/
// proxy_ring.h) and carries them over the transfer engine.
//
//   PUT         one-sided write of `len` bytes from the local segment at `src` into the peer's
//               receive segment at `dst_offset` (shm / cma / tcp, as the engine chose per segment).
//   PUT_VALUE   8-byte write of an immediate (kept alive by the proxy until it landed).
//   SIGNAL(_ADD) after every earlier PUT / PUT_VALUE to that peer completed: an atomic 8-byte
//               store (add) with release semantics into the peer's receive segment. Same-host
//               shared-memory segments ('shm'): done by this thread on the mapped memory.
//               Otherwise ('tcp', 'cma'): sent as an engine notification (tag kProxySignalTag),
//               which the peer's ProxySignalApplier thread applies with the same atomics.
//
// Failure rules: descriptors for a DEAD peer, malformed ones, and signals whose earlier puts
// failed or did not finish within op_timeout are dropped and counted (never block the ring);
// every wait has a deadline and checks stop(); stop() closes the ring and joins the thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine.h"
#include "mooncake/device/proxy_ring.h"

namespace mooncake::transfer {

// Tag of the signal notifications ("MCPXYSIG" minus the top bit so it is a valid Python int64).
constexpr uint64_t kProxySignalTag = 0x4D4350585953494Bull & 0x7FFFFFFFFFFFFFFFull;
constexpr uint32_t kProxySignalMagic = 0x4E474953u;  // "SIGN"

// The payload of a signal notification (32 bytes, little-endian host order).
struct ProxySignalMsg {
  uint32_t magic;
  uint32_t op;  // kProxySignal or kProxySignalAdd
  uint64_t seg_id;  // the receiver's segment id (from its descriptor)
  uint64_t offset;
  uint64_t value;
};
static_assert(sizeof(ProxySignalMsg) == 32, "ProxySignalMsg is 32 bytes");

// A ring block in host memory (page aligned; a GPU build pins and maps it).
class ProxyRing {
 public:
  ProxyRing(uint32_t capacity, uint32_t num_peers);  // throws std::invalid_argument
  ~ProxyRing();
  ProxyRing(const ProxyRing&) = delete;
  ProxyRing& operator=(const ProxyRing&) = delete;

  device::ProxyRingHeader* hdr() const { return hdr_; }
  uint64_t bytes() const { return bytes_; }

 private:
  device::ProxyRingHeader* hdr_ = nullptr;
  uint64_t bytes_ = 0;
};

struct ProxyConfig {
  double op_timeout_s = 10.0;    // a signal waits at most this long for its peer's earlier puts
  int64_t idle_sleep_max_ns = 200000;  // the idle consumer's longest sleep between polls
  uint32_t max_inflight = 4096;  // puts in flight before the consumer waits for the oldest
};

class HostProxy {
 public:
  // `local`: the segment PUT sources are offsets into; `peers[i]`: peer i's receive segment, or
  // null for an index with none (a GPU producer's own rank): its descriptors are dropped.
  HostProxy(std::shared_ptr<Engine> engine, std::shared_ptr<ProxyRing> ring, std::shared_ptr<LocalSegment> local,
            std::vector<std::shared_ptr<RemoteSeg>> peers, ProxyConfig cfg);
  ~HostProxy();
  HostProxy(const HostProxy&) = delete;
  HostProxy& operator=(const HostProxy&) = delete;

  void start();
  // Closes the ring (producers fail at once), stops and joins the thread. Puts still in flight
  // after `drain_s` are counted as dropped. Idempotent.
  void stop(double drain_s);
  bool running() const { return running_.load(); }
  // Replaces peer i's receive segment (a replacement process; null: none); clears its
  // failed-put mark.
  void set_peer(uint32_t i, std::shared_ptr<RemoteSeg> seg);

  // Counters (read any time).
  std::atomic<uint64_t> consumed{0};
  std::atomic<uint64_t> invalid{0};
  std::atomic<uint64_t> signals_shm{0};
  std::atomic<uint64_t> signals_notify{0};
  std::string last_drop();

 private:
  struct Inflight {
    uint64_t ticket;
    uint32_t peer;
    uint64_t value;  // PUT_VALUE source (stable: deque references survive push_back/pop_front)
    std::shared_ptr<Batch> batch;
  };

  void run();
  bool take(uint64_t t, device::ProxyDesc& out);
  void handle(const device::ProxyDesc& d, uint64_t ticket);
  void drop(uint32_t peer, const std::string& why, bool count_peer = true);
  void complete(uint32_t peer);
  void retire_done();
  void publish_retired(uint64_t next_ticket);
  bool wait_batch(Batch& b, int64_t deadline);
  // Waits (deadline) for every in-flight put to `peer`; false if one failed or did not finish.
  bool wait_peer_puts(uint32_t peer, std::string& why);
  std::shared_ptr<RemoteSeg> peer_seg(uint32_t i);

  std::shared_ptr<Engine> engine_;
  std::shared_ptr<ProxyRing> ring_;
  device::ProxyRingHeader* hdr_;
  std::shared_ptr<LocalSegment> local_;
  ProxyConfig cfg_;

  std::mutex peers_mu_;
  std::vector<std::shared_ptr<RemoteSeg>> peers_;
  std::vector<uint8_t> put_failed_;  // consumer thread only (set_peer clears through reset_)
  std::vector<std::atomic<uint8_t>> reset_;

  std::deque<Inflight> inflight_;
  uint64_t next_ticket_ = 0;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> running_{false};
  std::mutex stop_mu_;
  std::mutex drop_mu_;
  std::string last_drop_;
  int64_t drain_deadline_ = 0;
};

// The receiving side of notification-delivered signals: applies ProxySignalMsg notifications to
// the listed local segments with release atomics. One thread; stop() joins it.
class ProxySignalApplier {
 public:
  ProxySignalApplier(std::shared_ptr<Engine> engine, std::vector<std::shared_ptr<LocalSegment>> segs);
  ~ProxySignalApplier();
  void start();
  void stop();
  std::atomic<uint64_t> applied{0};
  std::atomic<uint64_t> rejected{0};

 private:
  void run();
  std::shared_ptr<Engine> engine_;
  std::vector<std::shared_ptr<LocalSegment>> segs_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
};

// Host producer helpers (the stand-in for a GPU kernel). post(): one descriptor, waiting for room
// until the deadline. post_many(): posts `n` descriptors in order from this (native) thread;
// returns how many were posted (fewer when the ring stayed full past a deadline or closed), and
// the result that stopped it.
device::ProxyPostResult proxy_post(ProxyRing& r, const device::ProxyDesc& d, double timeout_s, uint64_t* ticket);
size_t proxy_post_many(ProxyRing& r, const device::ProxyDesc* d, size_t n, double timeout_s,
                       device::ProxyPostResult* stopped_by);

}  // namespace mooncake::transfer
