// Kernel instantiations and launchers: which compiled variant serves a call, the launch shape
// and the cooperative launch (every block resident: blocks spin on arrival counters that every block
// of the same grid, this rank's own included, must bump).
#include <cuda_runtime.h>

#include "combine.cuh"
#include "dispatch.cuh"
#include "ep_launch.h"
#include "mooncake/device/p2p.cuh"

namespace mooncake {
namespace ep {

using mooncake::device::P2PStagedTransport;
using mooncake::device::P2PTransport;

namespace {

template <class Tp>
using DispatchFn = void (*)(DispatchParams, Tp);
template <class Tp>
using CombineFn = void (*)(CombineParams, Tp);

// DeepEP's hidden sizes get a variant with H known at compile time; any other H % 128 == 0
// runs the generic one (same code, H read at run time).
#define MOONCAKE_EP_HIDDEN_CASES(X) X(2048) X(2560) X(3072) X(4096) X(5120) X(6144) X(7168) X(8192)

template <class Tp>
DispatchFn<Tp> pick_dispatch(int hidden) {
  switch (hidden) {
#define X(h) \
  case h:    \
    return dispatch_kernel<Tp, h>;
    MOONCAKE_EP_HIDDEN_CASES(X)
#undef X
    default:
      return dispatch_kernel<Tp, 0>;
  }
}

template <class Tp>
CombineFn<Tp> pick_combine(int hidden) {
  switch (hidden) {
#define X(h) \
  case h:    \
    return combine_kernel<Tp, h>;
    MOONCAKE_EP_HIDDEN_CASES(X)
#undef X
    default:
      return combine_kernel<Tp, 0>;
  }
}

template <>
DispatchFn<P2PStagedTransport> pick_dispatch<P2PStagedTransport>(int) {
  return dispatch_kernel<P2PStagedTransport, 0>;
}
template <>
CombineFn<P2PStagedTransport> pick_combine<P2PStagedTransport>(int) {
  return combine_kernel<P2PStagedTransport, 0>;
}

template <class Fn, class... Args>
cudaError_t launch_cooperative(Fn fn, const LaunchShape& shape, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(shape.blocks);
  cfg.blockDim = dim3(shape.threads);
  cfg.dynamicSmemBytes = shape.smem_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = shape.cooperative ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, fn, args...);
}

template <class Fn>
cudaError_t prepare(Fn fn, int max_smem) {
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem);
  if (err != cudaSuccess) return err;
  cudaFuncAttributes attrs;
  return cudaFuncGetAttributes(&attrs, fn);  // also loads the module now, not inside a capture
}

template <class Tp>
cudaError_t prepare_transport(int max_smem) {
  const int hiddens[] = {0, 2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192};
  for (int h : hiddens) {
    cudaError_t err = prepare(pick_dispatch<Tp>(h), max_smem);
    if (err != cudaSuccess) return err;
    err = prepare(pick_combine<Tp>(h), max_smem);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

LaunchShape launch_shape(int hidden, int num_sms) {
  const int chunks = hidden / 8;
  const int tpt = chunks <= 1024 ? chunks : 1024;
  const int tpp = tpt >= 1024 ? 1 : 1024 / tpt;
  LaunchShape s;
  s.tpt = tpt;
  s.threads = (tpp * tpt + 31) / 32 * 32;
  s.blocks = num_sms;
  s.smem_bytes = 0;
  s.cooperative = true;
  return s;
}

uint64_t dispatch_smem_bytes(const DispatchParams& p, const LaunchShape& s) {
  const uint64_t E = static_cast<uint64_t>(p.L) * p.R;
  const uint64_t per_block = (static_cast<uint64_t>(p.N) + s.blocks - 1) / s.blocks;
  const uint64_t m = per_block * p.K;
  const uint64_t send = (2 * E + 2 * m + 2) * sizeof(int) + m * sizeof(void*);
  const uint64_t recv = (E + 1 + 32) * sizeof(int);
  // peer table (uint64 [R]), tag + active + alive, then the phases' arrays
  return 8ull * p.R + (4 + 2ull * p.R) * sizeof(int) + (send > recv ? send : recv) + 64;
}

uint64_t combine_smem_bytes(const CombineParams& p, const LaunchShape&) {
  const uint64_t E = static_cast<uint64_t>(p.L) * p.R;
  return 8ull * p.R + (4 + 2ull * p.R + E + 1 + 32) * sizeof(int) + 64;
}

cudaError_t prepare_kernels(int max_smem) {
  cudaError_t err = prepare_transport<P2PTransport>(max_smem);
  if (err != cudaSuccess) return err;
  return prepare_transport<P2PStagedTransport>(max_smem);
}

cudaError_t launch_dispatch(const DispatchParams& p, const P2PTransport& tp, TransportKind kind,
                            const LaunchShape& shape, cudaStream_t stream) {
  if (kind == TransportKind::kP2PStaged) {
    const P2PStagedTransport staged{{tp.peer_base, tp.rank, tp.num_ranks}};
    return launch_cooperative(pick_dispatch<P2PStagedTransport>(p.H), shape, stream, p, staged);
  }
  return launch_cooperative(pick_dispatch<P2PTransport>(p.H), shape, stream, p, tp);
}

cudaError_t launch_combine(const CombineParams& p, const P2PTransport& tp, TransportKind kind,
                           const LaunchShape& shape, cudaStream_t stream) {
  if (kind == TransportKind::kP2PStaged) {
    const P2PStagedTransport staged{{tp.peer_base, tp.rank, tp.num_ranks}};
    return launch_cooperative(pick_combine<P2PStagedTransport>(p.H), shape, stream, p, staged);
  }
  return launch_cooperative(pick_combine<P2PTransport>(p.H), shape, stream, p, tp);
}

}  // namespace ep
}  // namespace mooncake
