// P2PTransport: the device transport over CUDA IPC mappings (see transport.cuh for the contract).
//
// Every rank's symmetric buffer is mapped into this process (cudaIpcOpenMemHandle; this rank's
// own buffer directly); `peer_base` is a device array of the R base addresses, built and rebuilt
// (on membership changes) by the host setup in p2p_host.h.
#pragma once

#include <cstdint>

#include "mooncake/device/transport.cuh"

namespace mooncake {
namespace device {

struct P2PTransport {
  static constexpr bool kDirectStore = true;

  const uint64_t* peer_base;  // device memory, [num_ranks]
  int rank;
  int num_ranks;

  __device__ __forceinline__ void* peer_ptr(int peer, uint64_t offset) const {
    return reinterpret_cast<char*>(__ldg(reinterpret_cast<const unsigned long long*>(peer_base) + peer)) + offset;
  }
  __device__ __forceinline__ void* local_ptr(uint64_t offset) const { return peer_ptr(rank, offset); }

  __device__ __forceinline__ void warm() const {
    for (int r = static_cast<int>(threadIdx.x) * 16; r < num_ranks; r += static_cast<int>(blockDim.x) * 16)
      asm volatile("prefetch.global.L1 [%0];" ::"l"(peer_base + r));
  }

  __device__ __forceinline__ void put(int peer, uint64_t dst_offset, const void* src, uint64_t bytes,
                                      int rank_in_group, int group_size) const {
    group_copy16(peer_ptr(peer, dst_offset), src, bytes, rank_in_group, group_size);
  }
  __device__ __forceinline__ void put_warp(int peer, uint64_t dst_offset, const void* src, uint64_t bytes) const {
    put(peer, dst_offset, src, bytes, static_cast<int>(threadIdx.x & 31u), 32);
  }
  __device__ __forceinline__ void put_value(int peer, uint64_t offset, uint64_t value) const {
    *static_cast<uint64_t*>(peer_ptr(peer, offset)) = value;
  }
  __device__ __forceinline__ void signal(int peer, uint64_t offset, uint64_t value) const {
    st_release_sys(static_cast<uint64_t*>(peer_ptr(peer, offset)), value);
  }
  __device__ __forceinline__ void signal_add(int peer, uint64_t offset, uint64_t value) const {
    red_release_sys_add(static_cast<uint64_t*>(peer_ptr(peer, offset)), value);
  }
  // Stores to mapped peer memory complete in order with respect to a system-scope fence, so
  // fence and quiet are the same instruction here.
  __device__ __forceinline__ void fence() const { fence_sys(); }
  __device__ __forceinline__ void quiet() const { fence_sys(); }
};

// The same transport with kDirectStore off: kernels take their staged path (local copy + put),
// the one a host-proxy or RDMA transport needs. Used to test that path on one GPU.
struct P2PStagedTransport : P2PTransport {
  static constexpr bool kDirectStore = false;
};

}  // namespace device
}  // namespace mooncake
