// Device transport: the primitives GPU kernels use to talk to peers.
//
// Kernels (e.g. mooncake-ep's dispatch/combine) are templates over a transport type `Tp` and
// use only the members below, so a new implementation slots in without touching them.
//
//   struct Tp {
//     // True when peer memory is load/store addressable from this GPU (P2P over CUDA IPC,
//     // NVSHMEM with nvshmem_ptr != nullptr). Kernels may then store computed values straight
//     // into peer_ptr(); otherwise they stage data in local symmetric memory and put() it.
//     static constexpr bool kDirectStore;
//     int rank, num_ranks;
//
//     // Called by every thread of a block at kernel start: may prefetch per-peer metadata (the
//     // P2P peer table) so the first puts do not wait for it.
//     __device__ void warm() const;
//
//     // Address of byte `offset` of `peer`'s symmetric buffer (only meaningful if kDirectStore).
//     __device__ void* peer_ptr(int peer, uint64_t offset) const;
//     // This rank's own symmetric buffer (always addressable).
//     __device__ void* local_ptr(uint64_t offset) const;
//
//     // Copies `bytes` (multiple of 16, 16-byte aligned) from local `src` to `peer`'s buffer at
//     // `dst_offset`, with the `group_size` threads that call it together (a warp, a block
//     // slice). Completes asynchronously: ordered before later signals only through fence().
//     __device__ void put(int peer, uint64_t dst_offset, const void* src, uint64_t bytes,
//                         int rank_in_group, int group_size) const;
//     // Warp-cooperative form of put (all 32 lanes call it).
//     __device__ void put_warp(int peer, uint64_t dst_offset, const void* src, uint64_t bytes) const;
//
//     // Non-signalling 8-byte put of an immediate value (message headers).
//     __device__ void put_value(int peer, uint64_t offset, uint64_t value) const;
//
//     // Release-store of a 64-bit signal word into `peer`'s buffer at `offset`: every put and
//     // store this thread issued before (and, after a barrier + fence(), its block's) is
//     // visible to a peer that observes the value with an acquire load.
//     __device__ void signal(int peer, uint64_t offset, uint64_t value) const;
//     // Atomic add with release semantics on a peer's signal word.
//     __device__ void signal_add(int peer, uint64_t offset, uint64_t value) const;
//
//     // Orders earlier puts/stores before later signals (release fence at system scope; with
//     // kFenceBeforeSignals, also the puts of every thread of the block that synchronised first).
//     __device__ void fence() const;
//     // Waits until every earlier put of this thread is complete at its destination.
//     __device__ void quiet() const;
//   };
//
// Waiting is transport independent: signals land in local memory, so kernels poll them with
// mooncake::device::wait_until(local address, predicate, deadline) from primitives.cuh.
//
// Implementations:
//   p2p.cuh         P2PTransport: peers' buffers mapped through CUDA IPC (same host, same or peer
//                   GPU); puts are plain stores over NVLink/PCIe. Host setup: p2p_host.h.
//   host_proxy.cuh  HostProxyTransport (compile-only, not yet run on a GPU): put/signal post
//                   32-byte descriptors into a pinned host ring that a native engine thread
//                   carries over shm/TCP (RDMA later). The ring protocol (descriptor format,
//                   producer/consumer ordering, `retired` for quiet(), drop on a dead peer) and
//                   the device producer (proxy_ring_post, proxy_ring_quiet) are in proxy_ring.h;
//                   the host consumer is the transfer package's HostProxy (csrc/proxy.h), tested
//                   on the CPU with a host thread as the producer.
//   nvshmem.cuh     NvshmemTransport: NVSHMEM's device API (IBGDA across nodes): stores where
//                   nvshmem_ptr() maps the peer, else nvshmem_putmem_nbi / nvshmem_uint64_p /
//                   nvshmemx_signal_op; waits stay wait_until on local memory. Needs the NVSHMEM
//                   headers and libnvshmem_device.a (-rdc=true): only mooncake-ep's separate
//                   NVSHMEM library includes it.
//
// Optional traits (detected by the kernels, absent = false):
//   static constexpr bool kLocalSourceOnly;     put() sources must lie in the local symmetric
//                                               buffer (the kernels stage other data there first)
//   static constexpr bool kFenceBeforeSignals;  put()s become ordered before a later signal only
//                                               through fence(): the kernels call fence() from one
//                                               thread per block, after the barrier that follows
//                                               the block's puts, before its arrival signals
#pragma once

#include "mooncake/device/primitives.cuh"
