#include "segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>

#include "common.h"
#include "frame.h"

namespace mooncake::transfer {

namespace {
constexpr uint32_t kDescMagic = 0x4453434DU;  // "MCSD"
constexpr uint8_t kDescVersion = 2;  // 1: before the CMA guard fields

size_t page_round(uint64_t n) {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  return static_cast<size_t>((n + page - 1) / page * page);
}
}  // namespace

LocalSegment::~LocalSegment() {
  if (kind == SegKind::kMemfd) {
    if (addr) munmap(addr, map_len);
    if (memfd >= 0) close(memfd);
  }
}

SegUse::~SegUse() {
  if (seg_->active.fetch_sub(1) == 1) {
    std::lock_guard<std::mutex> g(seg_->mu);
    seg_->cv.notify_all();
  }
}

std::shared_ptr<LocalSegment> SegmentRegistry::allocate(uint64_t length, const std::string& token) {
  auto seg = std::make_shared<LocalSegment>();
  {
    std::lock_guard<std::mutex> g(mu_);
    seg->id = next_id_++;
  }
  seg->kind = SegKind::kMemfd;
  seg->length = length;
  seg->map_len = page_round(length);
  seg->memfd_name = "mooncake:" + token + ":" + std::to_string(seg->id);
  int fd = memfd_create(seg->memfd_name.c_str(), MFD_CLOEXEC);
  if (fd < 0) throw TransferErr(ErrKind::kGeneric, "", "memfd_create failed: " + errno_str(errno));
  seg->memfd = fd;
  if (ftruncate(fd, static_cast<off_t>(seg->map_len)) != 0)
    throw TransferErr(ErrKind::kGeneric, "", "ftruncate(" + std::to_string(seg->map_len) +
                                                 ") failed: " + errno_str(errno));
  void* p = mmap(nullptr, seg->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) throw TransferErr(ErrKind::kGeneric, "", "mmap failed: " + errno_str(errno));
  seg->addr = static_cast<uint8_t*>(p);
  std::lock_guard<std::mutex> g(mu_);
  map_[seg->id] = seg;
  return seg;
}

std::shared_ptr<LocalSegment> SegmentRegistry::add_registered(uint8_t* addr, uint64_t length,
                                                              const std::string& location) {
  auto seg = std::make_shared<LocalSegment>();
  seg->kind = SegKind::kRegistered;
  seg->addr = addr;
  seg->length = length;
  seg->location = location;
  std::lock_guard<std::mutex> g(mu_);
  seg->id = next_id_++;
  map_[seg->id] = seg;
  return seg;
}

std::shared_ptr<LocalSegment> SegmentRegistry::find(uint64_t id) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = map_.find(id);
  return it == map_.end() ? nullptr : it->second;
}

std::vector<std::shared_ptr<LocalSegment>> SegmentRegistry::all() {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<std::shared_ptr<LocalSegment>> out;
  out.reserve(map_.size());
  for (auto& kv : map_) out.push_back(kv.second);
  return out;
}

bool SegmentRegistry::remove(uint64_t id) {
  std::lock_guard<std::mutex> g(mu_);
  return map_.erase(id) > 0;
}

bool SegmentRegistry::wait_idle(LocalSegment& seg, int64_t deadline) {
  std::unique_lock<std::mutex> lk(seg.mu);
  while (seg.active.load() != 0) {
    int64_t left = deadline - now_ns();
    if (left <= 0) return false;
    seg.cv.wait_for(lk, std::chrono::nanoseconds(std::min<int64_t>(left, 100000000)));
  }
  return true;
}

std::string encode_descriptor(const Descriptor& d) {
  Writer w;
  w.u32(kDescMagic);
  w.u8(kDescVersion);
  w.u8(static_cast<uint8_t>(d.kind));
  w.str(d.owner);
  w.str(d.endpoint);
  w.str(d.host_id);
  w.u32(d.pid);
  w.u64(d.seg_id);
  w.u64(d.addr);
  w.u64(d.length);
  w.str(d.location);
  w.u32(static_cast<uint32_t>(d.memfd));
  w.str(d.memfd_name);
  w.u32(static_cast<uint32_t>(d.guard_fd));
  w.str(d.guard_name);
  w.u32(d.guard_slot);
  w.u64(d.guard_gen);
  return std::move(w.data());
}

std::string decode_descriptor(const std::string& bytes, Descriptor& d) {
  Reader r(bytes.data(), bytes.size());
  if (r.u32() != kDescMagic || !r.ok()) return "not a mooncake segment descriptor (bad magic)";
  uint8_t ver = r.u8();
  if (ver != 1 && ver != kDescVersion) return "unsupported descriptor version " + std::to_string(ver);
  d.version = ver;
  uint8_t kind = r.u8();
  if (kind > 1) return "bad segment kind " + std::to_string(kind);
  d.kind = static_cast<SegKind>(kind);
  d.owner = r.str(kMaxNameBytes);
  d.endpoint = r.str(512);
  d.host_id = r.str(512);
  d.pid = r.u32();
  d.seg_id = r.u64();
  d.addr = r.u64();
  d.length = r.u64();
  d.location = r.str(64);
  d.memfd = static_cast<int32_t>(r.u32());
  d.memfd_name = r.str(512);
  d.guard_fd = -1;
  if (ver >= 2) {
    d.guard_fd = static_cast<int32_t>(r.u32());
    d.guard_name = r.str(512);
    d.guard_slot = r.u32();
    d.guard_gen = r.u64();
  }
  if (!r.ok() || !r.at_end()) return "truncated or oversized descriptor";
  if (d.owner.empty() || d.endpoint.empty()) return "descriptor without owner/endpoint";
  if (d.seg_id == 0) return "descriptor with segment id 0";
  return {};
}

ShmMapping::~ShmMapping() {
  if (base) munmap(base, len);
}

std::shared_ptr<ShmMapping> map_peer_memfd(const Descriptor& d, std::string& why) {
  if (d.kind != SegKind::kMemfd || d.memfd < 0) {
    why = "segment is not engine-allocated shared memory";
    return nullptr;
  }
  const std::string path = "/proc/" + std::to_string(d.pid) + "/fd/" + std::to_string(d.memfd);
  // The fd number could have been recycled for another file: check the memfd name first.
  char link[1024];
  ssize_t n = readlink(path.c_str(), link, sizeof(link) - 1);
  if (n < 0) {
    why = "readlink " + path + ": " + errno_str(errno);
    return nullptr;
  }
  link[n] = 0;
  const std::string expect = "/memfd:" + d.memfd_name;
  if (std::string(link).compare(0, expect.size(), expect) != 0 ||
      (static_cast<size_t>(n) > expect.size() && link[expect.size()] != ' ')) {
    why = "fd " + path + " is no longer the segment (" + link + ")";
    return nullptr;
  }
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    why = "open " + path + ": " + errno_str(errno);
    return nullptr;
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < d.length) {
    why = "memfd smaller than the descriptor's length";
    close(fd);
    return nullptr;
  }
  size_t len = page_round(d.length);
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) {
    why = "mmap of peer memfd failed: " + errno_str(errno);
    return nullptr;
  }
  auto m = std::make_shared<ShmMapping>();
  m->base = static_cast<uint8_t*>(p);
  m->len = len;
  return m;
}

}  // namespace mooncake::transfer
