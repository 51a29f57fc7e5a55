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
// "SIG2": version 2 of the message carries the sender's membership epoch (version 1, "SIGN", had
// a 32-bit op and no epoch; the applier rejects it).
constexpr uint32_t kProxySignalMagic = 0x32474953u;

// The payload of a signal notification (32 bytes, little-endian host order).
struct ProxySignalMsg {
  uint32_t magic;
  uint16_t op;     // kProxySignal or kProxySignalAdd
  uint16_t epoch;  // the sending proxy's membership epoch (ProxyConfig::epoch)
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
  // Membership epoch stamped into every notification-delivered signal: a peer's applier applies
  // only signals of its own epoch, so one still in flight across a membership change (EP
  // update_ep_member: stop, zero the buffer, restart with the next epoch) cannot land in the new
  // epoch's counters. 16 bits: compared for equality, wraps after 65536 changes.
  uint16_t epoch = 0;
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
  // Closes the ring (producers fail at once), stops and joins the thread: no signal of this proxy
  // (shared-memory store or notification send) happens after it returns. Puts still in flight
  // after `drain_s` are counted as dropped but kept (with their PUT_VALUE sources) until the
  // engine settles them: such a put may still land in the peer's segment (see wait_settled).
  // Idempotent.
  void stop(double drain_s);
  // After stop(): waits up to `timeout_s` until every put that stop() left in flight has
  // completed or failed at the engine, and returns how many are still unsettled (0: none of this
  // proxy's puts can land any more, except what a failed TCP connection's kernel buffer still
  // delivers; see the EP docs). Raises if the proxy is running.
  size_t wait_settled(double timeout_s);
  bool running() const { return running_.load(); }
  // Replaces peer i's receive segment (a replacement process; null: none); clears its
  // failed-put mark.
  void set_peer(uint32_t i, std::shared_ptr<RemoteSeg> seg);

  // Counters (read any time).
  std::atomic<uint64_t> consumed{0};
  std::atomic<uint64_t> invalid{0};
  std::atomic<uint64_t> signals_shm{0};
  std::atomic<uint64_t> signals_notify{0};
  std::atomic<uint64_t> unsettled{0};  // puts stop() left in flight and not yet settled
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
  size_t count_unsettled();  // stopped: pops settled entries off the front, counts pending ones
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
// the listed local segments with release atomics. One thread; stop() joins it. Only signals
// stamped with the applier's current epoch are applied; others count as rejected (and in
// stale_epoch).
class ProxySignalApplier {
 public:
  ProxySignalApplier(std::shared_ptr<Engine> engine, std::vector<std::shared_ptr<LocalSegment>> segs,
                     uint16_t epoch = 0);
  ~ProxySignalApplier();
  void start();
  void stop();
  // The epoch whose signals are applied from now on (set it while stopped, before the peers'
  // proxies of that epoch start, so that no signal of the new epoch is rejected).
  void set_epoch(uint16_t e) { epoch_.store(e); }
  uint16_t epoch() const { return epoch_.load(); }
  std::atomic<uint64_t> applied{0};
  std::atomic<uint64_t> rejected{0};
  std::atomic<uint64_t> stale_epoch{0};  // of `rejected`: well-formed, but another epoch's

 private:
  void run();
  std::atomic<uint16_t> epoch_{0};
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
