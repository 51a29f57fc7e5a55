// Memory segments: the ones this engine owns (allocated memfd buffers or registered user memory),
// their portable descriptors, and the same-host mappings of a peer's memfd segments.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace mooncake::transfer {

enum class SegKind : uint8_t { kRegistered = 0, kMemfd = 1 };

struct LocalSegment {
  uint64_t id = 0;
  uint8_t* addr = nullptr;
  uint64_t length = 0;
  std::string location = "cpu";
  SegKind kind = SegKind::kRegistered;
  int memfd = -1;          // kMemfd only: fd peers open through /proc/<pid>/fd/<memfd>
  std::string memfd_name;  // checked by the peer so a recycled fd number is never mapped
  size_t map_len = 0;
  // Slot in the engine's CMA guard table (seg_guard.h) and its generation; -1: none (GPU memory,
  // or the table is full), then peers do not reach it over CMA.
  int32_t guard_slot = -1;
  uint64_t guard_gen = 0;

  // Transfers the I/O thread is moving into/out of this segment right now.
  std::atomic<int> active{0};
  std::mutex mu;
  std::condition_variable cv;

  // UcxMemReg (transport_ucx.h) once the segment was mapped for UCX (guarded by mu); reset by
  // unregister, which unmaps it when no other holder is left.
  std::shared_ptr<void> ucx_reg;

  ~LocalSegment();
};

// RAII marker for one in-flight remote access to a local segment (unregister waits for these).
class SegUse {
 public:
  explicit SegUse(std::shared_ptr<LocalSegment> s) : seg_(std::move(s)) { seg_->active.fetch_add(1); }
  ~SegUse();
  SegUse(const SegUse&) = delete;
  SegUse& operator=(const SegUse&) = delete;

 private:
  std::shared_ptr<LocalSegment> seg_;
};

class SegmentRegistry {
 public:
  // Throws TransferErr on OS failure.
  std::shared_ptr<LocalSegment> allocate(uint64_t length, const std::string& token);
  std::shared_ptr<LocalSegment> add_registered(uint8_t* addr, uint64_t length, const std::string& location);
  std::shared_ptr<LocalSegment> find(uint64_t id);
  // Every registered segment (a snapshot).
  std::vector<std::shared_ptr<LocalSegment>> all();
  // Removes it so no new remote access starts; returns false if unknown.
  bool remove(uint64_t id);
  // Waits until no remote access is in flight; false on deadline.
  static bool wait_idle(LocalSegment& seg, int64_t deadline);

 private:
  std::mutex mu_;
  std::unordered_map<uint64_t, std::shared_ptr<LocalSegment>> map_;
  uint64_t next_id_ = 1;
};

// What a peer needs to reach a segment, as portable bytes. Version 2 adds the CMA guard fields;
// version 1 (older builds) is still read, and such a segment is never reached over CMA.
struct Descriptor {
  uint8_t version = 2;
  SegKind kind = SegKind::kRegistered;
  std::string owner;     // engine name
  std::string endpoint;  // "host:port"
  std::string host_id;
  uint32_t pid = 0;
  uint64_t seg_id = 0;
  uint64_t addr = 0;  // in the owner's address space
  uint64_t length = 0;
  std::string location;
  int32_t memfd = -1;
  std::string memfd_name;
  // The owner's CMA guard table (fd in the owner, memfd name) and this segment's slot and
  // generation in it; guard_fd -1: no slot.
  int32_t guard_fd = -1;
  std::string guard_name;
  uint32_t guard_slot = 0;
  uint64_t guard_gen = 0;
};

std::string encode_descriptor(const Descriptor& d);
// Returns an empty string on success, else why the bytes are not a valid descriptor.
std::string decode_descriptor(const std::string& bytes, Descriptor& d);

// A peer's memfd segment mapped into this process.
struct ShmMapping {
  uint8_t* base = nullptr;
  size_t len = 0;
  ~ShmMapping();
};

// Maps a same-host peer's memfd segment; returns null and sets `why` when not possible.
std::shared_ptr<ShmMapping> map_peer_memfd(const Descriptor& d, std::string& why);

}  // namespace mooncake::transfer
