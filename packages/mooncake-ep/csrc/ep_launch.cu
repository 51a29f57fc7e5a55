// Kernel instantiations and launchers: which compiled variant serves a call, the launch shape
// and the cooperative launch (every block resident: blocks spin on arrival counters that every block
// of the same grid, this rank's own included, must bump), through the driver API where it resolves.
#include <cuda_runtime.h>

#include "combine.cuh"
#include "dispatch.cuh"
#include "ep_launch.h"
#include "mooncake/device/p2p.cuh"
#ifdef MOONCAKE_EP_WITH_NVSHMEM
#include "mooncake/device/nvshmem.cuh"
#endif

namespace mooncake {
namespace ep {

using mooncake::device::HostProxyTransport;
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

// hidden_case() numbering: 0 generic, then the compiled sizes in order.
enum HiddenCase { kCaseGeneric, kCase2048, kCase2560, kCase3072, kCase4096, kCase5120, kCase6144, kCase7168, kCase8192 };
constexpr int kCaseHidden[kHiddenCases] = {0, 2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192};

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

// The proxy transport is bound by the host proxy and PCIe, not by the hidden size: the generic
// variant serves every H (one instantiation per kernel).
template <>
DispatchFn<HostProxyTransport> pick_dispatch<HostProxyTransport>(int) {
  return dispatch_kernel<HostProxyTransport, 0>;
}
template <>
CombineFn<HostProxyTransport> pick_combine<HostProxyTransport>(int) {
  return combine_kernel<HostProxyTransport, 0>;
}

#ifdef MOONCAKE_EP_WITH_NVSHMEM
using mooncake::device::NvshmemTransport;
// NVSHMEM mode: the staged path to other nodes is bound by the NIC; one generic instantiation
// (a node whose peers are all mapped launches the P2P kind over nvshmem_ptr addresses instead).
template <>
DispatchFn<NvshmemTransport> pick_dispatch<NvshmemTransport>(int) {
  return dispatch_kernel<NvshmemTransport, 0>;
}
template <>
CombineFn<NvshmemTransport> pick_combine<NvshmemTransport>(int) {
  return combine_kernel<NvshmemTransport, 0>;
}
#endif

// Launches pass the transport by address: the staged transport adds no member.
static_assert(sizeof(P2PStagedTransport) == sizeof(P2PTransport), "transports must share one layout");

template <class T>
T entry_point(const char* name) {
#if CUDART_VERSION < 12050
  (void)name;
  return nullptr;  // no versioned entry-point query in this toolkit: runtime launches
#else
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &status) != cudaSuccess ||
      status != cudaDriverEntryPointSuccess) {
    (void)cudaGetLastError();
    return nullptr;
  }
  return reinterpret_cast<T>(fn);
#endif
}

DriverApi load_driver_api() {
  DriverApi d;
  d.launch_kernel_ex = entry_point<decltype(d.launch_kernel_ex)>("cuLaunchKernelEx");
  d.ctx_get_current = entry_point<decltype(d.ctx_get_current)>("cuCtxGetCurrent");
  d.ctx_set_current = entry_point<decltype(d.ctx_set_current)>("cuCtxSetCurrent");
  d.stream_is_capturing = entry_point<decltype(d.stream_is_capturing)>("cuStreamIsCapturing");
  d.get_error_name = entry_point<decltype(d.get_error_name)>("cuGetErrorName");
  d.ok = d.launch_kernel_ex && d.ctx_get_current && d.ctx_set_current && d.stream_is_capturing && d.get_error_name;
  return d;
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
  for (int h : kCaseHidden) {
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
  err = prepare_transport<P2PStagedTransport>(max_smem);
  if (err != cudaSuccess) return err;
#ifdef MOONCAKE_EP_WITH_NVSHMEM
  err = prepare_transport<NvshmemTransport>(max_smem);
  if (err != cudaSuccess) return err;
#endif
  return prepare_transport<HostProxyTransport>(max_smem);
}

int hidden_case(int hidden) {
  switch (hidden) {
#define X(h) \
  case h:    \
    return kCase##h;
    MOONCAKE_EP_HIDDEN_CASES(X)
#undef X
    default:
      return 0;
  }
}

const void* dispatch_symbol(TransportKind kind, int hcase) {
  const int h = kCaseHidden[hcase];
  if (kind == TransportKind::kP2PStaged) return reinterpret_cast<const void*>(pick_dispatch<P2PStagedTransport>(h));
  if (kind == TransportKind::kProxy) return reinterpret_cast<const void*>(pick_dispatch<HostProxyTransport>(h));
#ifdef MOONCAKE_EP_WITH_NVSHMEM
  if (kind == TransportKind::kNvshmem) return reinterpret_cast<const void*>(pick_dispatch<NvshmemTransport>(h));
#else
  if (kind == TransportKind::kNvshmem) return nullptr;
#endif
  return reinterpret_cast<const void*>(pick_dispatch<P2PTransport>(h));
}

const void* combine_symbol(TransportKind kind, int hcase) {
  const int h = kCaseHidden[hcase];
  if (kind == TransportKind::kP2PStaged) return reinterpret_cast<const void*>(pick_combine<P2PStagedTransport>(h));
  if (kind == TransportKind::kProxy) return reinterpret_cast<const void*>(pick_combine<HostProxyTransport>(h));
#ifdef MOONCAKE_EP_WITH_NVSHMEM
  if (kind == TransportKind::kNvshmem) return reinterpret_cast<const void*>(pick_combine<NvshmemTransport>(h));
#else
  if (kind == TransportKind::kNvshmem) return nullptr;
#endif
  return reinterpret_cast<const void*>(pick_combine<P2PTransport>(h));
}

const DriverApi& driver_api() {
  static const DriverApi api = load_driver_api();
  return api;
}

int launch_kernel(const void* symbol, CUfunction fn, const LaunchShape& shape, cudaStream_t stream, void** args,
                  const char** what) {
  if (fn != nullptr) {
    CUlaunchAttribute attr[1] = {};
    attr[0].id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
    attr[0].value.cooperative = 1;
    CUlaunchConfig cfg = {};
    cfg.gridDimX = shape.blocks;
    cfg.gridDimY = cfg.gridDimZ = 1;
    cfg.blockDimX = shape.threads;
    cfg.blockDimY = cfg.blockDimZ = 1;
    cfg.sharedMemBytes = static_cast<unsigned>(shape.smem_bytes);
    cfg.hStream = reinterpret_cast<CUstream>(stream);
    cfg.attrs = attr;
    cfg.numAttrs = shape.cooperative ? 1 : 0;
    *what = "cuLaunchKernelEx";
    return static_cast<int>(driver_api().launch_kernel_ex(&cfg, fn, args, nullptr));
  }
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
  *what = "cudaLaunchKernelExC";
  return static_cast<int>(cudaLaunchKernelExC(&cfg, symbol, args));
}

}  // namespace ep
}  // namespace mooncake
