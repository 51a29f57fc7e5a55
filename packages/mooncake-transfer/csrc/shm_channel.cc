#include "shm_channel.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <ctime>

#include "common.h"

namespace mooncake::transfer {

SharedRegion::~SharedRegion() {
  if (base_) munmap(base_, len_);
  if (fd_ >= 0) ::close(fd_);
}

std::shared_ptr<SharedRegion> SharedRegion::create(const std::string& name, size_t len) {
  auto r = std::make_shared<SharedRegion>();
  r->name_ = name;
  r->len_ = len;
  r->fd_ = memfd_create(name.c_str(), MFD_CLOEXEC);
  if (r->fd_ < 0) throw TransferErr(ErrKind::kGeneric, "", "memfd_create failed: " + errno_str(errno));
  if (ftruncate(r->fd_, static_cast<off_t>(len)) != 0)
    throw TransferErr(ErrKind::kGeneric, "", "ftruncate failed: " + errno_str(errno));
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd_, 0);
  if (p == MAP_FAILED) throw TransferErr(ErrKind::kGeneric, "", "mmap failed: " + errno_str(errno));
  r->base_ = static_cast<uint8_t*>(p);
  return r;
}

std::shared_ptr<SharedRegion> SharedRegion::open_peer(uint32_t pid, int fd, const std::string& name, size_t len,
                                                      std::string& why) {
  const std::string path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
  char link[512];
  ssize_t n = readlink(path.c_str(), link, sizeof(link) - 1);
  if (n < 0) {
    why = "readlink " + path + ": " + errno_str(errno);
    return nullptr;
  }
  link[n] = 0;
  const std::string expect = "/memfd:" + name;
  if (std::string(link).compare(0, expect.size(), expect) != 0 ||
      (static_cast<size_t>(n) > expect.size() && link[expect.size()] != ' ')) {
    why = path + " is not " + expect;
    return nullptr;
  }
  int f = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (f < 0) {
    why = "open " + path + ": " + errno_str(errno);
    return nullptr;
  }
  struct stat st;
  if (fstat(f, &st) != 0 || static_cast<size_t>(st.st_size) < len) {
    ::close(f);
    why = path + " is too small";
    return nullptr;
  }
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0);
  ::close(f);
  if (p == MAP_FAILED) {
    why = "mmap " + path + ": " + errno_str(errno);
    return nullptr;
  }
  auto r = std::make_shared<SharedRegion>();
  r->base_ = static_cast<uint8_t*>(p);
  r->len_ = len;
  r->name_ = name;
  return r;
}

void ring_doorbell(DoorbellWord* d) {
  d->seq.fetch_add(1, std::memory_order_seq_cst);
  if (d->sleepers.load(std::memory_order_seq_cst) > 0)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&d->seq), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

void wait_doorbell(DoorbellWord* d, uint32_t seen, int64_t deadline) {
  timespec ts;
  timespec* tsp = nullptr;
  if (deadline != kForever) {
    int64_t left = deadline - now_ns();
    if (left <= 0) return;
    ts.tv_sec = left / 1000000000;
    ts.tv_nsec = left % 1000000000;
    tsp = &ts;
  }
  // Shared (not PRIVATE) futex: producers in other processes wake us through their mapping.
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&d->seq), FUTEX_WAIT, seen, tsp, nullptr, 0);
}

RingWriter::RingWriter(const std::string& name) {
  region_ = SharedRegion::create(name, kRingDataOffset + kRingBytes);
  auto* h = new (region_->base()) RingHeader;
  h->head.store(0);
  h->tail.store(0);
  h->capacity = kRingBytes;
  h->magic = kRingMagic;
}

bool RingWriter::push(uint64_t seq, uint64_t tag, const void* data, size_t len) {
  if (len > kRingMaxPayload) return false;
  auto* h = reinterpret_cast<RingHeader*>(region_->base());
  uint8_t* area = region_->base() + kRingDataOffset;
  const uint64_t cap = kRingBytes;
  const uint64_t need = kRingRecordHeader + ((uint64_t(len) + 7) & ~uint64_t(7));
  const uint64_t head = h->head.load(std::memory_order_acquire);
  uint64_t tail = h->tail.load(std::memory_order_relaxed);
  uint64_t idx = tail % cap;
  const uint64_t pad = cap - idx < need ? cap - idx : 0;
  if (tail + pad + need - head > cap) return false;  // full: the consumer is behind
  if (pad) {
    if (pad >= kRingRecordHeader) {
      RingRecord r{0, 1, 0, 0, 0};
      std::memcpy(area + idx, &r, sizeof(r));
    }
    tail += pad;
    idx = 0;
  }
  RingRecord r{static_cast<uint32_t>(len), 0, seq, tag, now_ns()};
  std::memcpy(area + idx, &r, sizeof(r));
  if (len) std::memcpy(area + idx + kRingRecordHeader, data, len);
  h->tail.store(tail + need, std::memory_order_release);
  return true;
}

bool RingReader::valid() const {
  if (region_->size() < kRingDataOffset + kRingBytes) return false;
  auto* h = reinterpret_cast<RingHeader*>(region_->base());
  return h->magic == kRingMagic && h->capacity == kRingBytes;
}

}  // namespace mooncake::transfer
