// Host-side launchers of the EP kernels (torch-free).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ep_params.h"
#include "mooncake/device/p2p.cuh"

namespace mooncake {
namespace ep {

enum class TransportKind : int { kP2P = 0, kP2PStaged = 1 };

struct LaunchShape {
  int blocks;
  int threads;
  int tpt;  // threads per token row
  uint64_t smem_bytes;
  bool cooperative;
};

LaunchShape launch_shape(int hidden, int num_sms);
uint64_t dispatch_smem_bytes(const DispatchParams& p, const LaunchShape& s);
uint64_t combine_smem_bytes(const CombineParams& p, const LaunchShape& s);
cudaError_t prepare_kernels(int max_smem);
cudaError_t launch_dispatch(const DispatchParams& p, const mooncake::device::P2PTransport& tp, TransportKind kind,
                            const LaunchShape& shape, cudaStream_t stream);
cudaError_t launch_combine(const CombineParams& p, const mooncake::device::P2PTransport& tp, TransportKind kind,
                           const LaunchShape& shape, cudaStream_t stream);

}  // namespace ep
}  // namespace mooncake
