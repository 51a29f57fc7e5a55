// Same-host notification channel: a single-producer ring in shared memory (memfd) per directed
// peer pair, plus a per-engine "doorbell" futex word that every producer bumps. A thread blocked in
// recv_notify sleeps on the doorbell, so a same-host notify costs one futex wake and no TCP, no
// I/O-thread hop. Rings only carry small notifications; everything else still goes over TCP, and
// per-sender sequence numbers keep the two channels in one FIFO order (see Inbox).
#pragma once

#include <pthread.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

namespace mooncake::transfer {

// Shared memory mapped from a memfd (ours, or a peer's through /proc/<pid>/fd/<n>).
class SharedRegion {
 public:
  ~SharedRegion();
  // Creates an anonymous shared region; throws TransferErr.
  static std::shared_ptr<SharedRegion> create(const std::string& name, size_t len);
  // Maps a same-host peer's region; null (and `why`) when not possible.
  static std::shared_ptr<SharedRegion> open_peer(uint32_t pid, int fd, const std::string& name, size_t len,
                                                 std::string& why);
  uint8_t* base() const { return base_; }
  size_t size() const { return len_; }
  int fd() const { return fd_; }
  const std::string& name() const { return name_; }

 private:
  uint8_t* base_ = nullptr;
  size_t len_ = 0;
  int fd_ = -1;  // kept open (owner side) so peers can open /proc/<pid>/fd/<fd>
  std::string name_;
};

struct DoorbellWord {
  std::atomic<uint32_t> seq;       // bumped by every delivery
  std::atomic<uint32_t> sleepers;  // threads in futex_wait on seq
  // Liveness lock: a robust, process-shared mutex that the owning engine's I/O thread holds for
  // the engine's whole life. When that thread ends (the process is killed, or the engine closes),
  // the kernel releases it with OWNER_DIED at the very start of the thread's exit, before the
  // address space is torn down and long before the sockets close (kill -> socket EOF measured
  // 15-20 ms for a bare torch process, 60-110 ms with 1 GiB more resident memory). Same-host
  // peers that map this doorbell wait on it (Engine::watch_liveness) and mark the owner DEAD.
  std::atomic<uint32_t> alive_armed;  // 1 once the owner holds `alive`
  // 1 once the owner began Engine::close() (set before its BYEs go out and before `alive` is
  // released): a release after this is a clean close, not a death. Zero-filled, so an engine
  // that never sets it (an older build) reads as before: a release means the process exited.
  std::atomic<uint32_t> closing;
  pthread_mutex_t alive;
};

// Rings the doorbell of an engine (ours or a peer's): wakes its sleeping receivers.
void ring_doorbell(DoorbellWord* d);
// Sleeps until seq != seen or the deadline (ns, steady clock; kForever = no deadline).
void wait_doorbell(DoorbellWord* d, uint32_t seen, int64_t deadline);

// Data area per directed pair (mapped lazily: pages are touched as the ring wraps). Collectives
// send payloads up to 512 KiB inline, so the ring carries up to 1 MiB per message (TCP between
// same-host processes costs ~100 us per message on the 2-core machines) and holds several.
constexpr size_t kRingBytes = 4 << 20;
constexpr size_t kRingMaxPayload = 1 << 20;  // larger notifications use TCP
constexpr size_t kRingRecordHeader = 32;

// Producer side, in the sending engine (owns the memory).
class RingWriter {
 public:
  explicit RingWriter(const std::string& name);
  // False when the record does not fit now (the caller falls back to TCP).
  bool push(uint64_t seq, uint64_t tag, const void* data, size_t len);
  const SharedRegion& region() const { return *region_; }

 private:
  std::shared_ptr<SharedRegion> region_;
};

// Consumer side, in the receiving engine (maps the sender's memory).
class RingReader {
 public:
  explicit RingReader(std::shared_ptr<SharedRegion> r) : region_(std::move(r)) {}
  bool valid() const;
  // Calls fn(seq, tag, stamp, data, len) for each complete record; false if the ring is corrupt.
  template <class Fn>
  bool drain(Fn fn);

 private:
  std::shared_ptr<SharedRegion> region_;
};

struct RingHeader {
  alignas(64) std::atomic<uint64_t> head;  // consumer position (bytes since start)
  alignas(64) std::atomic<uint64_t> tail;  // producer position
  alignas(64) uint64_t capacity;
  uint32_t magic;
};
constexpr uint32_t kRingMagic = 0x474E4952U;  // "RING"
constexpr size_t kRingDataOffset = 4096;

struct RingRecord {
  uint32_t len;
  uint32_t kind;  // 0 = message, 1 = padding up to the end of the data area
  uint64_t seq;
  uint64_t tag;
  int64_t stamp;  // steady-clock ns when sent (one clock per host): orders across peers
};
static_assert(sizeof(RingRecord) == kRingRecordHeader, "ring record header");

template <class Fn>
bool RingReader::drain(Fn fn) {
  auto* h = reinterpret_cast<RingHeader*>(region_->base());
  uint8_t* data = region_->base() + kRingDataOffset;
  const uint64_t cap = kRingBytes;
  uint64_t head = h->head.load(std::memory_order_relaxed);
  const uint64_t tail = h->tail.load(std::memory_order_acquire);
  if (tail < head || tail - head > cap) return false;
  while (head < tail) {
    const uint64_t idx = head % cap;
    if (cap - idx < kRingRecordHeader) {
      head += cap - idx;
      continue;
    }
    RingRecord rec;
    std::memcpy(&rec, data + idx, sizeof(rec));
    if (rec.kind == 1) {
      head += cap - idx;
      continue;
    }
    const uint64_t total = kRingRecordHeader + ((uint64_t(rec.len) + 7) & ~uint64_t(7));
    if (rec.kind != 0 || rec.len > kRingMaxPayload || idx + total > cap || head + total > tail) return false;
    fn(rec.seq, rec.tag, rec.stamp, data + idx + kRingRecordHeader, rec.len);
    head += total;
  }
  h->head.store(head, std::memory_order_release);
  return true;
}

}  // namespace mooncake::transfer
