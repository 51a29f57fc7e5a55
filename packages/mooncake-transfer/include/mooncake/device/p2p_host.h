// Host setup of the P2P device transport: export/import CUDA IPC handles of a symmetric buffer.
//
// Torch-free and header-only (CUDA runtime API). The handle bytes travel through whatever group
// the caller has (mooncake-ep: the backend group, all_gather of CPU bytes); the caller rebuilds
// the peer table when membership changes (update_ep_member): close mappings of peers that left
// or were replaced, open the new handles, upload the table.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace mooncake {
namespace device {

constexpr int kIpcHandleBytes = static_cast<int>(sizeof(cudaIpcMemHandle_t));  // 64

// Identity of this process's device, so peers can tell whether they can map it: PCI bus id.
inline cudaError_t p2p_device_bus_id(int device, char* out, int len) {
  return cudaDeviceGetPCIBusId(out, len, device);
}

// Whether `device` (this process's) can load/store the memory of the GPU with PCI id `bus_id`.
// Same GPU: yes. Another GPU: it must be visible to this process and peer-accessible.
inline cudaError_t p2p_can_reach(int device, const char* bus_id, int* out) {
  *out = 0;
  int peer_device = -1;
  cudaError_t err = cudaDeviceGetByPCIBusId(&peer_device, bus_id);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return cudaSuccess;  // not visible here: unreachable, not an error
  }
  if (peer_device == device) {
    *out = 1;
    return cudaSuccess;
  }
  return cudaDeviceCanAccessPeer(out, device, peer_device);
}

// Handle of `base`, which must be the start of a cudaMalloc allocation.
inline cudaError_t p2p_export(void* base, unsigned char out[kIpcHandleBytes]) {
  cudaIpcMemHandle_t h;
  cudaError_t err = cudaIpcGetMemHandle(&h, base);
  if (err == cudaSuccess) std::memcpy(out, &h, sizeof(h));
  return err;
}

// Maps a peer's buffer into this process. A mapping stays valid after the exporting process
// died (measured, docs/MACHINE_FACTS.md), so kernels can keep writing into it until it is closed.
inline cudaError_t p2p_import(const unsigned char in[kIpcHandleBytes], void** base) {
  cudaIpcMemHandle_t h;
  std::memcpy(&h, in, sizeof(h));
  return cudaIpcOpenMemHandle(base, h, cudaIpcMemLazyEnablePeerAccess);
}

inline cudaError_t p2p_close(void* base) { return cudaIpcCloseMemHandle(base); }

}  // namespace device
}  // namespace mooncake
