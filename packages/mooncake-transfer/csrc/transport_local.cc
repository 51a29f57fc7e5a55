// Same-host transports: shm (memcpy through the peer's mapped memfd, no syscall) and cma
// (process_vm_readv/writev into the peer's registered memory).
#include <sys/uio.h>

#include <cerrno>
#include <cstring>

#include "engine.h"
#include "faults.h"

namespace mooncake::transfer {

namespace {
// Ends this process's in-flight mark on a CMA segment (seg_guard.h) on every path.
struct GuardHold {
  std::atomic<uint32_t>* count;
  ~GuardHold() {
    if (count) count->fetch_sub(1, std::memory_order_release);
  }
};
}  // namespace

int LocalCopyTransport::cma_probe(uint32_t pid, uint64_t addr) {
  uint8_t byte;
  iovec l{&byte, 1};
  iovec r{reinterpret_cast<void*>(addr), 1};
  ssize_t n = process_vm_readv(static_cast<pid_t>(pid), &l, 1, &r, 1, 0);
  return n == 1 ? 0 : errno;
}

void LocalCopyTransport::post(const Op& op, const std::shared_ptr<Batch>& b) {
  Peer& p = *op.seg->peer;
  // A dead peer's memory must not be touched: its pid may be recycled (cma) and nobody reads it.
  if (p.dead()) {
    b->complete_err(p.dead_error());
    return;
  }
  if (kind_ == TransportKind::kShm) {
    uint8_t* remote = op.seg->map->base + op.offset;
    if (op.write) std::memcpy(remote, op.local, op.len);
    else std::memcpy(op.local, remote, op.len);
  } else {
    // The owner's unregister() clears the generation word and then waits for our count: raise
    // it, then check (seq_cst both, see seg_guard.h), so a copy that passes the check is waited for.
    GuardHold hold{op.seg->guard_count};
    if (hold.count) {
      hold.count->fetch_add(1, std::memory_order_seq_cst);
      const uint64_t gen = op.seg->guard_gen->load(std::memory_order_seq_cst);
      if (gen == kGenClosed) {  // the owner closed its engine; its BYE (-> DEAD) is on the way
        b->complete_err(ErrorInfo{ErrKind::kPeerDead, p.name, Engine::kReasonBye});
        return;
      }
      if (gen != op.seg->desc.guard_gen) {
        b->complete_err(ErrorInfo{ErrKind::kGeneric, p.name,
                                  std::string("rejected by the segment owner: ") +
                                      (op.write ? "WRITE to unknown segment " : "READ of unknown segment ") +
                                      std::to_string(op.seg->desc.seg_id) + " (unregistered; cma)"});
        return;
      }
    }
    fault_hit(FaultPoint::kCma);
    uint64_t done = 0;
    while (done < op.len) {
      iovec l{op.local + done, static_cast<size_t>(op.len - done)};
      iovec r{reinterpret_cast<void*>(op.seg->desc.addr + op.offset + done), static_cast<size_t>(op.len - done)};
      ssize_t n = op.write ? process_vm_writev(static_cast<pid_t>(p.pid), &l, 1, &r, 1, 0)
                           : process_vm_readv(static_cast<pid_t>(p.pid), &l, 1, &r, 1, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        int e = n < 0 ? errno : EIO;
        if (e == ESRCH) {
          engine_.mark_dead(op.seg->peer, "process " + std::to_string(p.pid) + " is gone (ESRCH)", true);
          b->complete_err(p.dead_error());
          return;
        }
        std::string why = std::string("cma ") + (op.write ? "write" : "read") + " failed: " + errno_str(e);
        if (e == EFAULT) why += " (remote range not mapped: segment freed?)";
        b->complete_err(ErrorInfo{ErrKind::kGeneric, p.name, why});
        return;
      }
      done += static_cast<uint64_t>(n);
    }
  }
  if (p.dead()) {
    b->complete_err(p.dead_error());
    return;
  }
  b->complete_ok();
}

}  // namespace mooncake::transfer
