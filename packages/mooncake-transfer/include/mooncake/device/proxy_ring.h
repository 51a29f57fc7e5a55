// Host proxy ring: the command queue between a producer (a GPU kernel, or a host thread standing
// in for one) and the native proxy thread that carries the commands over the transfer engine.
//
// Usable from host C++ (no CUDA needed) and from CUDA device code (the device-only producer is
// guarded by __CUDACC__). The ring lives in one block of host memory; on a GPU machine that block
// is pinned and mapped (cudaHostAlloc(..., cudaHostAllocMapped) or cudaHostRegister) so kernels
// write descriptors straight into it.
//
// Layout of the block (every offset fixed by the static_asserts below):
//
//   [0, 384)              ProxyRingHeader (magic, capacity, counters' and slots' offsets, and the
//                          head / tail / retired / closed words, each on its own 64-byte line)
//   [counters_offset, +)  uint64_t completed[num_peers], then uint64_t dropped[num_peers]
//   [slots_offset, +)     ProxyDesc slots[capacity]   (capacity: a power of two)
//
// Descriptor (ProxyDesc, 32 bytes):
//
//   off  0  u64 dst_offset  byte offset in the peer's receive segment
//   off  8  u64 src         PUT: byte offset in the local (symmetric) segment;
//                           PUT_VALUE / SIGNAL / SIGNAL_ADD: the immediate 64-bit value
//   off 16  u32 len         PUT: bytes to copy (others: 0)
//   off 20  u16 peer        index into the proxy's peer table
//   off 22  u8  op          ProxyOp
//   off 23  u8  flags       0 (reserved)
//   off 24  u64 seq         ticket + 1: written LAST, with release semantics
//
// Memory-ordering contract:
//
//   Producer (any number, each call independent):
//     1. reserve a ticket t: CAS head from h to h + 1 while h - tail < capacity (the ring has
//        room); a producer that finds no room waits up to its deadline and gives up WITHOUT a
//        ticket, so a timed-out producer never leaves a hole the consumer would wait on;
//     2. fill every field of slots[t & (capacity - 1)] except seq (plain stores);
//     3. release-store seq = t + 1.
//   Consumer (the one proxy thread):
//     1. acquire-load slots[t & mask].seq until it equals t + 1 (a stale slot from an earlier lap
//        holds t + 1 - capacity or less, so no clearing is needed);
//     2. copy the descriptor out, then release-store tail = t + 1 (the slot may be reused);
//     3. carry it out; when it is complete (PUT: the bytes landed; SIGNAL: delivered) or dropped,
//        bump completed[peer] or dropped[peer], and advance `retired` so that every ticket below
//        it is complete or dropped (release stores).
//   quiet(): a producer that wants its earlier commands complete waits (deadline) until
//   retired > its last ticket.
//   Data before signal: the proxy delivers a SIGNAL / SIGNAL_ADD to a peer only after every
//   earlier PUT / PUT_VALUE to that peer completed successfully; if one of them failed the signal
//   is dropped (counted), never delivered over missing data.
//   Dead peers: commands for a peer the engine's failure detector reports DEAD are dropped and
//   counted in dropped[peer]; they never block the ring. closed != 0: the proxy stopped;
//   producers fail at once instead of waiting for room.
#pragma once

#include <stddef.h>
#include <stdint.h>

#if !defined(__CUDA_ARCH__)
#include <sched.h>
#include <time.h>
#endif

#if defined(__CUDACC__)
#define MC_PROXY_HD __host__ __device__
#else
#define MC_PROXY_HD
#endif

namespace mooncake {
namespace device {

constexpr uint32_t kProxyRingMagic = 0x5250434Du;  // "MCPR" little-endian
constexpr uint32_t kProxyRingVersion = 1;
constexpr uint32_t kProxyRingMaxCapacity = 1u << 24;
constexpr uint32_t kProxyRingMaxPeers = 65535;

enum ProxyOp : uint8_t {
  kProxyPut = 1,        // len bytes: local[src, src + len) -> peer[dst_offset, ...)
  kProxyPutValue = 2,   // 8-byte non-signalling put of the immediate `src`
  kProxySignal = 3,     // atomic 8-byte store of `src` (release), after the peer's earlier puts
  kProxySignalAdd = 4,  // atomic add of `src` (release), after the peer's earlier puts
};

struct alignas(32) ProxyDesc {
  uint64_t dst_offset;
  uint64_t src;
  uint32_t len;
  uint16_t peer;
  uint8_t op;
  uint8_t flags;
  uint64_t seq;
};
static_assert(sizeof(ProxyDesc) == 32, "ProxyDesc is 32 bytes");
static_assert(offsetof(ProxyDesc, dst_offset) == 0, "layout");
static_assert(offsetof(ProxyDesc, src) == 8, "layout");
static_assert(offsetof(ProxyDesc, len) == 16, "layout");
static_assert(offsetof(ProxyDesc, peer) == 20, "layout");
static_assert(offsetof(ProxyDesc, op) == 22, "layout");
static_assert(offsetof(ProxyDesc, flags) == 23, "layout");
static_assert(offsetof(ProxyDesc, seq) == 24, "layout");

struct alignas(64) ProxyRingHeader {
  uint32_t magic;
  uint32_t version;
  uint32_t capacity;   // slots, a power of two
  uint32_t num_peers;  // entries of completed[] and dropped[]
  uint64_t counters_offset;
  uint64_t slots_offset;
  uint64_t total_bytes;
  uint8_t pad0_[64 - 40];
  alignas(64) uint64_t head;     // next ticket to hand out (producers, CAS)
  uint8_t pad1_[56];
  alignas(64) uint64_t tail;     // next ticket the consumer reads; slots below it are free
  uint8_t pad2_[56];
  alignas(64) uint64_t retired;  // every ticket below it is complete or dropped
  uint8_t pad3_[56];
  alignas(64) uint64_t closed;   // nonzero: the proxy stopped; producers fail at once
  uint8_t pad4_[56];
  alignas(64) uint64_t reserved_[8];
};
static_assert(sizeof(ProxyRingHeader) == 384, "ProxyRingHeader is 384 bytes");
static_assert(offsetof(ProxyRingHeader, head) == 64, "layout");
static_assert(offsetof(ProxyRingHeader, tail) == 128, "layout");
static_assert(offsetof(ProxyRingHeader, retired) == 192, "layout");
static_assert(offsetof(ProxyRingHeader, closed) == 256, "layout");

// Result of a post.
enum ProxyPostResult : int { kProxyPosted = 0, kProxyFull = 1, kProxyClosed = 2 };

// ---- layout helpers (host and device) ---------------------------------------------------------

MC_PROXY_HD inline constexpr uint64_t proxy_align64(uint64_t v) { return (v + 63u) & ~uint64_t(63u); }

MC_PROXY_HD inline constexpr uint64_t proxy_counters_offset() { return sizeof(ProxyRingHeader); }

MC_PROXY_HD inline constexpr uint64_t proxy_slots_offset(uint32_t num_peers) {
  return proxy_align64(proxy_counters_offset() + 2ull * 8ull * num_peers);
}

// Bytes of a ring block with `capacity` slots and `num_peers` peers.
MC_PROXY_HD inline constexpr uint64_t proxy_ring_bytes(uint32_t capacity, uint32_t num_peers) {
  return proxy_slots_offset(num_peers) + uint64_t(capacity) * sizeof(ProxyDesc);
}

MC_PROXY_HD inline ProxyDesc* proxy_slots(ProxyRingHeader* h) {
  return reinterpret_cast<ProxyDesc*>(reinterpret_cast<uint8_t*>(h) + h->slots_offset);
}
MC_PROXY_HD inline uint64_t* proxy_completed(ProxyRingHeader* h) {
  return reinterpret_cast<uint64_t*>(reinterpret_cast<uint8_t*>(h) + h->counters_offset);
}
MC_PROXY_HD inline uint64_t* proxy_dropped(ProxyRingHeader* h) {
  return proxy_completed(h) + h->num_peers;
}

#if !defined(__CUDA_ARCH__)
// ---- host side --------------------------------------------------------------------------------

inline int64_t proxy_host_now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000ll + ts.tv_nsec;
}

inline uint64_t proxy_load_acquire(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline void proxy_store_release(uint64_t* p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

// Initializes a zeroed or reused block of proxy_ring_bytes(capacity, num_peers) bytes (64-byte
// aligned). Returns false if capacity is not a power of two in [2, kProxyRingMaxCapacity] or
// num_peers is not in [1, kProxyRingMaxPeers].
inline bool proxy_ring_init(void* mem, uint32_t capacity, uint32_t num_peers) {
  if (capacity < 2 || capacity > kProxyRingMaxCapacity || (capacity & (capacity - 1)) != 0) return false;
  if (num_peers < 1 || num_peers > kProxyRingMaxPeers) return false;
  const uint64_t total = proxy_ring_bytes(capacity, num_peers);
  uint8_t* b = static_cast<uint8_t*>(mem);
  for (uint64_t i = 0; i < total; ++i) b[i] = 0;
  auto* h = static_cast<ProxyRingHeader*>(mem);
  h->version = kProxyRingVersion;
  h->capacity = capacity;
  h->num_peers = num_peers;
  h->counters_offset = proxy_counters_offset();
  h->slots_offset = proxy_slots_offset(num_peers);
  h->total_bytes = total;
  __atomic_store_n(&h->magic, kProxyRingMagic, __ATOMIC_RELEASE);
  return true;
}

// Host producer (a host thread standing in for the GPU; safe with several producer threads).
// Waits for room until `deadline_ns` (proxy_host_now_ns() clock; INT64_MAX: no deadline, but a
// closed ring still returns). On kProxyPosted, *ticket (if given) is the descriptor's ticket.
inline ProxyPostResult proxy_ring_post_host(ProxyRingHeader* h, const ProxyDesc& d, int64_t deadline_ns,
                                            uint64_t* ticket = nullptr) {
  const uint64_t cap = h->capacity;
  uint32_t spins = 0;
  uint64_t t;
  for (;;) {
    if (__atomic_load_n(&h->closed, __ATOMIC_ACQUIRE) != 0) return kProxyClosed;
    t = __atomic_load_n(&h->head, __ATOMIC_ACQUIRE);
    const uint64_t tl = __atomic_load_n(&h->tail, __ATOMIC_ACQUIRE);
    if (t - tl < cap) {
      if (__atomic_compare_exchange_n(&h->head, &t, t + 1, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) break;
      continue;  // another producer took it
    }
    // Full: spin a little, then yield, then sleep (2 cores: never starve the consumer).
    ++spins;
    if ((spins & 63u) == 0 && proxy_host_now_ns() > deadline_ns) return kProxyFull;
    if (spins > 256) {
      timespec ts{0, spins > 4096 ? 50000 : 5000};
      nanosleep(&ts, nullptr);
    } else if (spins > 64) {
      sched_yield();
    }
  }
  ProxyDesc* s = proxy_slots(h) + (t & (cap - 1));
  s->dst_offset = d.dst_offset;
  s->src = d.src;
  s->len = d.len;
  s->peer = d.peer;
  s->op = d.op;
  s->flags = d.flags;
  __atomic_store_n(&s->seq, t + 1, __ATOMIC_RELEASE);
  if (ticket) *ticket = t;
  return kProxyPosted;
}

// Host quiet(): waits until every ticket <= `ticket` is complete or dropped; false on deadline.
inline bool proxy_ring_quiet_host(ProxyRingHeader* h, uint64_t ticket, int64_t deadline_ns) {
  for (uint32_t spins = 0;; ++spins) {
    if (__atomic_load_n(&h->retired, __ATOMIC_ACQUIRE) > ticket) return true;
    if ((spins & 63u) == 0 && proxy_host_now_ns() > deadline_ns) return false;
    if (spins > 64) {
      timespec ts{0, 20000};
      nanosleep(&ts, nullptr);
    }
  }
}
#endif  // !__CUDA_ARCH__

}  // namespace device
}  // namespace mooncake

#if defined(__CUDACC__)
// ---- device side (compile-only on machines without a GPU) -------------------------------------
#include "mooncake/device/primitives.cuh"

namespace mooncake {
namespace device {

__device__ __forceinline__ uint64_t proxy_ld_acquire(const uint64_t* p) { return ld_acquire_sys(p); }

// Device producer: one thread posts one descriptor (callers elect a lane). Same protocol as the
// host producer: CAS-reserve only when there is room, fill, release-store seq. Returns
// kProxyFull when the deadline (%globaltimer ns, kNoDeadline for none) passes without room.
__device__ __forceinline__ int proxy_ring_post(ProxyRingHeader* h, const ProxyDesc& d, uint64_t deadline_ns,
                                               uint64_t* ticket = nullptr) {
  const uint64_t cap = h->capacity;
  unsigned long long t;
  for (uint32_t spin = 0;; ++spin) {
    if (proxy_ld_acquire(&h->closed) != 0) return kProxyClosed;
    t = proxy_ld_acquire(&h->head);
    const uint64_t tl = proxy_ld_acquire(&h->tail);
    if (t - tl < cap) {
      if (atomicCAS_system(reinterpret_cast<unsigned long long*>(&h->head), t, t + 1) == t) break;
      continue;
    }
    if ((spin & 15u) == 15u && deadline_passed(deadline_ns)) return kProxyFull;
  }
  ProxyDesc* s = proxy_slots(h) + (t & (cap - 1));
  volatile ProxyDesc* vs = s;
  vs->dst_offset = d.dst_offset;
  vs->src = d.src;
  vs->len = d.len;
  vs->peer = d.peer;
  vs->op = d.op;
  vs->flags = d.flags;
  st_release_sys(&s->seq, t + 1);
  if (ticket != nullptr) *ticket = t;
  return kProxyPosted;
}

// Device quiet(): waits until `retired` passes `ticket`; false on deadline.
__device__ __forceinline__ bool proxy_ring_quiet(ProxyRingHeader* h, uint64_t ticket, uint64_t deadline_ns) {
  return wait_until(&h->retired, [ticket](uint64_t v) { return v > ticket; }, deadline_ns);
}

}  // namespace device
}  // namespace mooncake
#endif  // __CUDACC__
