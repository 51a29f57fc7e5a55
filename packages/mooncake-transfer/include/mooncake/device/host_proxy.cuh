// HostProxyTransport: the device transport over the host proxy ring (see transport.cuh for the
// contract, proxy_ring.h for the ring protocol). COMPILE-ONLY so far: built with nvcc on the CPU
// machines, not yet run on a GPU (issue 15, acceptance 2 is where it gets run).
//
// Puts and signals become 32-byte descriptors posted into a ring in pinned, mapped host memory;
// the host's HostProxy thread (mooncake-transfer csrc/proxy.h) carries them over the engine and
// delivers each signal only after the earlier puts to that peer completed. Peer memory is not
// addressable (kDirectStore = false): kernels stage data in the local symmetric buffer
// (local_base, registered with the engine as the proxy's local segment) and put() it.
//
// Group semantics: put() is called by `group_size` cooperating threads that have finished
// writing the source; the group's rank 0 posts one descriptor. For group_size <= 32 (a warp) the
// group is synchronized here (__syncwarp); larger groups must __syncthreads() before calling.
#pragma once

#include <cstdint>

#include "mooncake/device/proxy_ring.h"
#include "mooncake/device/transport.cuh"

namespace mooncake {
namespace device {

struct HostProxyTransport {
  static constexpr bool kDirectStore = false;

  ProxyRingHeader* ring;  // device pointer of the mapped host ring
  char* local_base;       // this rank's symmetric buffer (device memory)
  uint64_t timeout_ns;    // how long a post waits for room / quiet waits; then it gives up
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
    // A full ring past the deadline drops the command: the receiver's wait deadline then fires,
    // as for a dead peer.
    proxy_ring_post(ring, d, deadline_after(globaltimer_ns(), static_cast<int64_t>(timeout_ns / 1000)));
  }

  __device__ __forceinline__ void put(int peer, uint64_t dst_offset, const void* src, uint64_t bytes,
                                      int rank_in_group, int group_size) const {
    if (group_size <= 32) __syncwarp();
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
    post(kProxyPutValue, peer, offset, value, 0);
  }
  // Ring order is ticket order and the proxy delivers a signal after every earlier put to that
  // peer: a put this thread (or, after a barrier + fence(), its block) posted before is covered.
  __device__ __forceinline__ void signal(int peer, uint64_t offset, uint64_t value) const {
    post(kProxySignal, peer, offset, value, 0);
  }
  __device__ __forceinline__ void signal_add(int peer, uint64_t offset, uint64_t value) const {
    post(kProxySignalAdd, peer, offset, value, 0);
  }
  __device__ __forceinline__ void fence() const { fence_sys(); }
  // Waits (up to timeout_ns) until every command posted so far, by any thread, is complete or
  // dropped.
  __device__ __forceinline__ void quiet() const {
    const uint64_t head = proxy_ld_acquire(&ring->head);
    if (head == 0) return;
    proxy_ring_quiet(ring, head - 1, deadline_after(globaltimer_ns(), static_cast<int64_t>(timeout_ns / 1000)));
  }
};

}  // namespace device
}  // namespace mooncake
