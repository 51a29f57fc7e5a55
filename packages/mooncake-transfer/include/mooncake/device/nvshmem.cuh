// NvshmemTransport: the device transport over NVSHMEM's device API (see transport.cuh for the
// contract). mooncake-ep's NVSHMEM mode instantiates its dispatch/combine kernels with it in a
// library of its own (_mooncake_ep_nvshmem.so, linked with libnvshmem_device.a, -rdc=true); the
// production kernel library never includes this header.
//
// Every rank's symmetric buffer is one nvshmem_malloc allocation of the same size, so byte
// `offset` of a peer's buffer has the symmetric address `local_base + offset` here.
//
// Per peer, at run time: where nvshmem_ptr() maps the peer's buffer into this GPU (same node:
// NVLink / PCIe P2P), `mapped[peer]` holds that address and every put / word / signal is a plain
// store or a release atomic into it, as in P2PTransport. Elsewhere (`mapped[peer] == 0`: another
// node) puts become nvshmem_putmem_nbi (IBGDA: a GPU-posted RDMA write), words nvshmem_uint64_p
// and signals nvshmemx_signal_op (an RDMA atomic). When every peer is mapped the host side
// launches the P2P instantiation instead (direct stores from the kernels, peer table filled
// from nvshmem_ptr), so this transport's kDirectStore is false: kernels stage data in the local
// symmetric buffer (kLocalSourceOnly: NVSHMEM's network transports read only registered memory,
// the symmetric heap) and put() it.
//
// Ordering: NVSHMEM orders puts before a later signal to the same PE only through
// nvshmem_fence (kFenceBeforeSignals: the kernels call fence() once per block, from one thread,
// after the block barrier that follows the block's puts and before its arrival signals; over
// IBGDA NVSHMEM's fence quiets every QP of the GPU, so it covers the puts of every thread).
// Waiting stays transport independent: signals land in local memory and kernels poll them with
// wait_until and the op's %globaltimer deadline (never nvshmem_signal_wait_until, which has no
// deadline), so a dead PE is detected exactly as on the P2P path.
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "mooncake/device/transport.cuh"

namespace mooncake {
namespace device {

struct NvshmemTransport {
  static constexpr bool kDirectStore = false;
  static constexpr bool kLocalSourceOnly = true;     // put() sources lie in [local_base, +bytes)
  static constexpr bool kFenceBeforeSignals = true;  // fence() between a block's puts and signals

  const uint64_t* mapped;  // device memory, [num_ranks]: nvshmem_ptr of each peer's buffer, or 0
  char* local_base;        // this rank's symmetric buffer (an nvshmem_malloc address)
  int rank;
  int num_ranks;

  __device__ __forceinline__ void warm() const {}
  __device__ __forceinline__ char* mapped_base(int peer) const {
    return reinterpret_cast<char*>(__ldg(reinterpret_cast<const unsigned long long*>(mapped) + peer));
  }
  __device__ __forceinline__ void* peer_ptr(int peer, uint64_t offset) const {
    char* base = mapped_base(peer);
    return base == nullptr ? nullptr : base + offset;
  }
  __device__ __forceinline__ void* local_ptr(uint64_t offset) const { return local_base + offset; }

  __device__ __forceinline__ void put(int peer, uint64_t dst_offset, const void* src, uint64_t bytes,
                                      int rank_in_group, int group_size) const {
    char* base = peer == rank ? local_base : mapped_base(peer);
    if (base != nullptr) {
      group_copy16(base + dst_offset, src, bytes, rank_in_group, group_size);
      return;
    }
    if (rank_in_group != 0) return;
    fence_sys();  // the group's writes of the source (synchronized by the caller) reach the NIC
    nvshmem_putmem_nbi(local_base + dst_offset, src, bytes, peer);
  }
  __device__ __forceinline__ void put_warp(int peer, uint64_t dst_offset, const void* src, uint64_t bytes) const {
    put(peer, dst_offset, src, bytes, static_cast<int>(threadIdx.x & 31u), 32);
  }
  __device__ __forceinline__ void put_value(int peer, uint64_t offset, uint64_t value) const {
    char* base = peer == rank ? local_base : mapped_base(peer);
    if (base != nullptr) *reinterpret_cast<volatile uint64_t*>(base + offset) = value;
    else nvshmem_uint64_p(reinterpret_cast<uint64_t*>(local_base + offset), value, peer);
  }
  __device__ __forceinline__ void signal(int peer, uint64_t offset, uint64_t value) const {
    char* base = peer == rank ? local_base : mapped_base(peer);
    if (base != nullptr) {
      st_release_sys(reinterpret_cast<uint64_t*>(base + offset), value);
      return;
    }
    fence_sys();  // release: what this thread (and, after a barrier, its block) stored before
    nvshmemx_signal_op(reinterpret_cast<uint64_t*>(local_base + offset), value, NVSHMEM_SIGNAL_SET, peer);
  }
  __device__ __forceinline__ void signal_add(int peer, uint64_t offset, uint64_t value) const {
    char* base = peer == rank ? local_base : mapped_base(peer);
    if (base != nullptr) {
      red_release_sys_add(reinterpret_cast<uint64_t*>(base + offset), value);
      return;
    }
    fence_sys();  // as in signal()
    nvshmemx_signal_op(reinterpret_cast<uint64_t*>(local_base + offset), value, NVSHMEM_SIGNAL_ADD, peer);
  }
  // Stores (mapped peers) and NVSHMEM operations (the others) issued before are delivered before
  // later ones to the same PE.
  __device__ __forceinline__ void fence() const {
    fence_sys();
    nvshmem_fence();
  }
  __device__ __forceinline__ void quiet() const {
    fence_sys();
    nvshmem_quiet();
  }
};

}  // namespace device
}  // namespace mooncake
