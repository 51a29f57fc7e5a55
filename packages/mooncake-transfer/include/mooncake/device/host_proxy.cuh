// HostProxyTransport: the device transport over the host proxy ring (see transport.cuh for the
// contract, proxy_ring.h for the ring protocol). mooncake-ep's proxy mode instantiates its
// dispatch/combine kernels with it (ep_launch.cu).
//
// Puts and signals to another rank become 32-byte descriptors posted into a ring in pinned,
// mapped host memory; the host's HostProxy thread (mooncake-transfer csrc/proxy.h) carries them
// over the engine and delivers each signal only after the earlier puts to that peer completed.
// Peer memory is not addressable (kDirectStore = false), and the proxy copies from the local
// symmetric buffer only (kLocalSourceOnly): kernels stage data in `local_base` (the host segment
// the engine moves, mapped into the GPU) and put() it from there.
//
// This rank's own traffic (peer == rank) never enters the ring: the local buffer is addressable,
// so put / put_value / signal to self are device stores into it (only this GPU writes the words
// a rank signals itself, so device atomics on the mapped memory are atomic enough).
//
// Group semantics: put() is called by `group_size` cooperating threads after the group's writes
// of the source are complete and synchronized by the caller (__syncthreads / __syncwarp); the
// group's rank 0 posts one descriptor (per 2 GiB), the other threads return at once.
#pragma once

#include <cstdint>

#include "mooncake/device/proxy_ring.h"
#include "mooncake/device/transport.cuh"

namespace mooncake {
namespace device {

struct HostProxyTransport {
  static constexpr bool kDirectStore = false;
  static constexpr bool kLocalSourceOnly = true;  // put() sources must lie in [local_base, +bytes)

  ProxyRingHeader* ring;  // device pointer of the mapped host ring
  char* local_base;       // this rank's symmetric buffer (device pointer of mapped host memory)
  int64_t timeout_us;     // how long a post waits for room in a full ring (-1: no deadline)
  int rank;
  int num_ranks;

  __device__ __forceinline__ void warm() const {}
  __device__ __forceinline__ void* peer_ptr(int, uint64_t) const { return nullptr; }
  __device__ __forceinline__ void* local_ptr(uint64_t offset) const { return local_base + offset; }

  __device__ __forceinline__ void post(uint8_t op, int peer, uint64_t dst_offset, uint64_t src, uint32_t len) const {
    ProxyDesc d;
    d.dst_offset = dst_offset;
    d.src = src;
    d.len = len;
    d.peer = static_cast<uint16_t>(peer);
    d.op = op;
    d.flags = 0;
    d.seq = 0;
    // A full ring past the deadline (or a closed one) drops the command: the receiver's wait
    // deadline then fires, as for a dead peer.
    proxy_ring_post(ring, d, deadline_after(globaltimer_ns(), timeout_us));
  }

  __device__ __forceinline__ void put(int peer, uint64_t dst_offset, const void* src, uint64_t bytes,
                                      int rank_in_group, int group_size) const {
    if (peer == rank) {
      group_copy16(local_base + dst_offset, src, bytes, rank_in_group, group_size);
      return;
    }
    if (rank_in_group != 0) return;
    fence_sys();  // the group's writes of the source are visible to the host's copy
    const uint64_t src_off = static_cast<uint64_t>(static_cast<const char*>(src) - local_base);
    for (uint64_t done = 0; done < bytes;) {  // len is 32-bit in the descriptor
      const uint32_t chunk = static_cast<uint32_t>(bytes - done > 0x80000000ull ? 0x80000000ull : bytes - done);
      post(kProxyPut, peer, dst_offset + done, src_off + done, chunk);
      done += chunk;
    }
  }
  __device__ __forceinline__ void put_warp(int peer, uint64_t dst_offset, const void* src, uint64_t bytes) const {
    put(peer, dst_offset, src, bytes, static_cast<int>(threadIdx.x & 31u), 32);
  }
  __device__ __forceinline__ void put_value(int peer, uint64_t offset, uint64_t value) const {
    if (peer == rank) *reinterpret_cast<volatile uint64_t*>(local_base + offset) = value;
    else post(kProxyPutValue, peer, offset, value, 0);
  }
  // Ring order is ticket order and the proxy delivers a signal after every earlier put to that
  // peer: a put this thread (or, after a barrier + fence(), its block) posted before is covered.
  __device__ __forceinline__ void signal(int peer, uint64_t offset, uint64_t value) const {
    if (peer == rank) st_release_sys(reinterpret_cast<uint64_t*>(local_base + offset), value);
    else post(kProxySignal, peer, offset, value, 0);
  }
  __device__ __forceinline__ void signal_add(int peer, uint64_t offset, uint64_t value) const {
    if (peer == rank) red_release_sys_add(reinterpret_cast<uint64_t*>(local_base + offset), value);
    else post(kProxySignalAdd, peer, offset, value, 0);
  }
  __device__ __forceinline__ void fence() const { fence_sys(); }
  // Waits (up to timeout_us) until every command posted so far, by any thread, is complete or
  // dropped.
  __device__ __forceinline__ void quiet() const {
    fence_sys();
    const uint64_t head = proxy_ld_acquire(&ring->head);
    if (head == 0) return;
    proxy_ring_quiet(ring, head - 1, deadline_after(globaltimer_ns(), timeout_us));
  }
};

}  // namespace device
}  // namespace mooncake
