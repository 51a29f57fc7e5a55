// Transports move the bytes of one operation between this process and a peer's segment.
// The engine picks one per opened remote segment (same host: shm or cma; else tcp; rdma when a
// device exists; ucx when asked for, or across hosts when UCX has RDMA). Completion is always
// reported on the operation's Batch, exactly once.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "batch.h"
#include "peer.h"
#include "seg_guard.h"
#include "segment.h"

namespace mooncake::transfer {

class Engine;

enum class TransportKind : int { kTcp = 0, kShm = 1, kCma = 2, kRdma = 3, kUcx = 4 };
const char* transport_name(TransportKind k);

class Transport;
struct UcxRemote;  // transport_ucx.h

// A peer's segment opened by this engine.
struct RemoteSeg {
  std::shared_ptr<Peer> peer;
  Descriptor desc;
  TransportKind kind = TransportKind::kTcp;
  std::shared_ptr<ShmMapping> map;  // kShm only
  std::shared_ptr<UcxRemote> ucx;   // kUcx only: endpoint, rkey and the owner's address/length
  Transport* transport = nullptr;
  // kCma only: the owner's guard table (kept mapped), the segment's generation word in it and
  // this process's in-flight count for the segment (see seg_guard.h).
  std::shared_ptr<GuardMap> guard;
  std::atomic<uint64_t>* guard_gen = nullptr;
  std::atomic<uint32_t>* guard_count = nullptr;
};

struct Op {
  bool write = true;
  std::shared_ptr<RemoteSeg> seg;
  uint64_t offset = 0;   // in the remote segment
  uint8_t* local = nullptr;
  uint64_t len = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual TransportKind kind() const = 0;
  // Starts or performs `op`; reports its completion on `b` exactly once (maybe before returning).
  virtual void post(const Op& op, const std::shared_ptr<Batch>& b) = 0;
};

// Same-host copies: kShm = memcpy through the mapped memfd, kCma = process_vm_readv/writev.
class LocalCopyTransport : public Transport {
 public:
  LocalCopyTransport(Engine& e, TransportKind k) : engine_(e), kind_(k) {}
  TransportKind kind() const override { return kind_; }
  void post(const Op& op, const std::shared_ptr<Batch>& b) override;
  // 0 if this process may use CMA on `pid` at `addr`, else the errno (EPERM, ESRCH, ...).
  static int cma_probe(uint32_t pid, uint64_t addr);

 private:
  Engine& engine_;
  TransportKind kind_;
};

// Frames over the peer's TCP connection; the owner bounds-checks against its segment table.
class TcpTransport : public Transport {
 public:
  explicit TcpTransport(Engine& e) : engine_(e) {}
  TransportKind kind() const override { return TransportKind::kTcp; }
  void post(const Op& op, const std::shared_ptr<Batch>& b) override;

 private:
  Engine& engine_;
};

// RDMA verbs: libibverbs.so.1 is dlopen()ed at run time (no build-time dependency). Only device
// discovery is implemented; with no device (the case on every machine here) it reports so cleanly.
class VerbsTransport : public Transport {
 public:
  TransportKind kind() const override { return TransportKind::kRdma; }
  void post(const Op& op, const std::shared_ptr<Batch>& b) override;
  // Empty when usable, else why not ("libibverbs.so.1 not found", "no RDMA device").
  static std::string probe(std::string* devices = nullptr);
};

}  // namespace mooncake::transfer
