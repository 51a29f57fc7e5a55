// UCX transport: one-sided put/get through UCX's UCP API, loaded at run time (ucx_api.h), so the
// same build uses whatever UCX offers where it runs (RDMA verbs, tcp, shared memory, CUDA memory).
//
// Wiring: an initiator that opens a segment over UCX asks the owner, on the engine's authenticated
// TCP connection (UCX_INFO_REQ / UCX_INFO_RESP frames), for its UCP worker address and the
// segment's packed rkey, address and length; the owner maps the segment (ucp_mem_map) on the first
// such request. One UCP endpoint per peer; writes are put + endpoint flush (complete when the data
// is in the owner's memory), reads are get. A progress thread drives the worker and sleeps on its
// event fd (every wait has a deadline). Completion is reported on the op's Batch exactly once.
//
// Deadlines: every op has one (see UcxTransport::op_deadline_locked). A peer that stops answering
// at all is caught first by the failure detector (heartbeat_timeout: PeerDeadError, as over tcp);
// an op still unfinished at its own deadline (the UCX path stalled while the peer still answers
// heartbeats) fails with a timeout naming the peer and the deadline, and its endpoint is
// force-closed: the only way to cancel UCX RMA requests (ucp_request_cancel only cancels tag
// receives). The peer's segments then bind to a fresh endpoint on their next op.
//
// Lifetime: an op's state (the user data of its UCX requests) is freed only once UCX has returned
// every request it holds, whenever that is (even after the op was reported failed, the transport
// shut down, or inside ucp_worker_destroy): it is owned by UcxCore, which outlives the worker.
// The rkey an op was posted with lives as long: a segment dropped (or rebound after a stall)
// while ops name its rkey hands the rkey to UcxCore, which destroys it when the last of them is
// freed (before ucp_worker_destroy at the latest).
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "transport.h"
#include "ucx_api.h"

namespace mooncake::transfer {

struct UcxCore;
struct UcxEp;
struct UcxOp;

// A local segment mapped for UCX (owner side); unmapped when the last holder lets go.
struct UcxMemReg {
  std::shared_ptr<UcxCore> core;
  ucx::ucp_mem_h memh = nullptr;
  std::string rkey;  // packed
  ~UcxMemReg();
};

// A peer's segment bound to its UCX endpoint (initiator side).
struct UcxRemote {
  std::shared_ptr<UcxCore> core;
  std::shared_ptr<UcxEp> ep;       // under the core lock: replaced after a stall reset its endpoint
  // Under the core lock (unpacked on `ep`). Given to UcxCore::drop_rkey when replaced or when
  // this goes: destroyed once no op in UCX's hands names it.
  ucx::ucp_rkey_h rkey = nullptr;
  std::string address;             // the owner's worker address and packed rkey, to rebind
  std::string rkey_packed;
  uint64_t addr = 0;    // in the owner's address space, as the owner said
  uint64_t length = 0;  // as the owner said
  ~UcxRemote();
};

class UcxTransport : public Transport {
 public:
  // Loads UCX, creates a context and a worker and starts the progress thread; null + `why`
  // (naming what is missing) when UCX cannot be used here.
  static std::unique_ptr<UcxTransport> create(Engine& e, const std::string& lib_dir, std::string& why);
  // "" when UCX can be loaded from `lib_dir` (or the loader's path) and starts, else why not;
  // with what it offers (a throwaway context: no worker, no thread).
  static std::string probe(const std::string& lib_dir, bool* rdma = nullptr, bool* cuda = nullptr,
                           std::string* describe = nullptr);
  ~UcxTransport() override;

  TransportKind kind() const override { return TransportKind::kUcx; }
  void post(const Op& op, const std::shared_ptr<Batch>& b) override;

  // Owner: maps `addr`/`length` (memory type host or CUDA) for remote access.
  std::shared_ptr<UcxMemReg> map(void* addr, uint64_t length, bool cuda, std::string& why);
  // Owner: the UCX_INFO_RESP payload for `seg` (mapped on first use); false + `why` on failure.
  bool export_segment(LocalSegment& seg, std::string& payload, std::string& why);
  // Initiator: binds `rs` to the owner's worker and segment from an UCX_INFO_RESP payload.
  // Throws TransferErr (malformed answer, endpoint or rkey refused by UCX).
  void attach(RemoteSeg& rs, const std::string& payload);
  // The failure detector marked `peer` DEAD: its endpoint is force-closed by the progress thread
  // and every UCX op to it fails (callable from any thread; does not wait for UCX).
  void peer_dead(const std::string& peer);
  // Engine close: stops the progress thread, force-closes every endpoint, fails what is left.
  void shutdown();

  bool cuda() const { return cuda_; }
  // True when UCX found a transport that reaches other hosts faster than our TCP (RDMA).
  bool rdma() const { return rdma_; }
  // "UCX 1.22.0 (<path>): transports self, tcp, ..." for logs and ucx_status().
  const std::string& describe() const { return describe_; }

 private:
  explicit UcxTransport(Engine& e) : engine_(e) {}
  void progress_loop();
  void kick();
  // Core lock held: start a forced close of `ep` (once) and remember it as closing.
  void close_ep_locked(const std::shared_ptr<UcxEp>& ep, const std::string& why);
  void reap_closing_locked(bool force_all);
  void finish_locked(UcxOp* op, int status);
  void finish_err_locked(UcxOp* op, const ErrorInfo& e);
  void settle_locked(UcxOp* op);
  void run_deferred_locked(bool all);
  // The peer's live endpoint (created from `address` when there is none or it failed).
  std::shared_ptr<UcxEp> ep_for_locked(const std::string& peer, const std::string& address);
  // An op's deadline: op_timeout_ns_ plus the time every byte queued on this worker (this op's
  // included) takes at kMinBytesPerSec.
  int64_t op_deadline_locked(uint64_t len) const;
  // Fails ops past their deadline (timeout) and force-closes their endpoints; returns the next
  // deadline of an op in flight (kForever when none).
  int64_t expire_locked(int64_t now);
  void release_locked(UcxOp* op);
  static void on_request(void* req, int status, void* user);
  static void on_ep_error(void* arg, ucx::ucp_ep_h ep, int status);

  Engine& engine_;
  std::shared_ptr<UcxCore> core_;
  std::string address_;  // this worker's UCP address
  bool cuda_ = false;
  bool rdma_ = false;
  std::string describe_;

  // Guarded by core_->mu.
  std::unordered_map<std::string, std::shared_ptr<UcxEp>> eps_;
  struct Closing {
    std::shared_ptr<UcxEp> ep;
    void* req = nullptr;  // the close request, null when it completed at once
    int64_t deadline = 0;
  };
  std::vector<Closing> closing_;
  std::vector<std::shared_ptr<UcxEp>> to_close_;  // failed in UCX's error callback
  std::vector<std::pair<UcxOp*, int64_t>> deferred_;  // failed ops waiting (deadline) for DEAD
  uint64_t queued_bytes_ = 0;  // bytes of the ops in flight (not finished)
  int64_t op_timeout_ns_ = 0;  // an op's deadline, before the allowance for queued bytes
  int64_t next_expiry_ = kForever;  // no op in flight has an earlier deadline (maybe finished)

  std::mutex q_mu_;  // peers marked dead, handed to the progress thread
  std::vector<std::string> dead_q_;
  std::atomic<bool> stop_{false};
  int epfd_ = -1;
  int wake_fd_ = -1;
  int worker_fd_ = -1;
  std::thread thread_;
};

}  // namespace mooncake::transfer
