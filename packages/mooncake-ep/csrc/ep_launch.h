// Host-side launchers of the EP kernels (torch-free).
//
// A launch goes through the driver API (cuLaunchKernelEx on a CUfunction resolved once per
// context and kernel variant) when the driver's entry points resolve, else through the runtime
// (cudaLaunchKernelExC, which looks the kernel up on every call). The library links the CUDA
// runtime statically and reaches the driver only through cudaGetDriverEntryPointByVersion, so it
// needs no libcuda at link time.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ep_args.h"
#include "ep_params.h"
#include "mooncake/device/host_proxy.cuh"
#include "mooncake/device/p2p.cuh"

namespace mooncake {
namespace ep {

// kProxy: HostProxyTransport (the symmetric buffer is mapped host memory the transfer engine
// moves; puts to other ranks go through the proxy ring). kNvshmem: NvshmemTransport
// (mooncake/device/nvshmem.cuh), compiled only into _mooncake_ep_nvshmem.so (built with
// MOONCAKE_EP_WITH_NVSHMEM); the production library has no kernel of that kind (its symbols are
// null and a launch of it is refused).
// The values are MepOpArgs::transport's (MEP_TRANSPORT_*).
enum class TransportKind : int {
  kP2P = MEP_TRANSPORT_P2P,
  kP2PStaged = MEP_TRANSPORT_P2P_STAGED,
  kProxy = MEP_TRANSPORT_PROXY,
  kNvshmem = MEP_TRANSPORT_NVSHMEM
};
constexpr int kTransportKinds = 4;
#ifdef MOONCAKE_EP_WITH_NVSHMEM
constexpr bool kHasNvshmem = true;
#else
constexpr bool kHasNvshmem = false;
#endif
// Compiled hidden sizes (DeepEP's) plus the generic variant (case 0, H read at run time).
constexpr int kHiddenCases = 9;

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

// Kernel variants: hidden_case(H) in [0, kHiddenCases) picks the compiled variant of H (0: the
// generic one); the symbols are the host stubs the runtime knows the kernels by (null for a kind
// this library was built without: kNvshmem outside the NVSHMEM library).
int hidden_case(int hidden);
const void* dispatch_symbol(TransportKind kind, int hcase);
const void* combine_symbol(TransportKind kind, int hcase);

// Driver entry points used on the launch path (all null when they do not resolve).
struct DriverApi {
  CUresult (*launch_kernel_ex)(const CUlaunchConfig*, CUfunction, void**, void**) = nullptr;
  CUresult (*ctx_get_current)(CUcontext*) = nullptr;
  CUresult (*ctx_set_current)(CUcontext) = nullptr;
  CUresult (*stream_is_capturing)(CUstream, CUstreamCaptureStatus*) = nullptr;
  CUresult (*get_error_name)(CUresult, const char**) = nullptr;
  bool ok = false;
};
const DriverApi& driver_api();  // resolved once (thread-safe)

// One launch of `symbol` (runtime) or `fn` (driver, when non-null) with the kernel's arguments.
// Returns 0 or an error code (a cudaError_t for runtime launches, a CUresult for driver ones);
// `*what` names the API that failed.
int launch_kernel(const void* symbol, CUfunction fn, const LaunchShape& shape, cudaStream_t stream, void** args,
                  const char** what);

}  // namespace ep
}  // namespace mooncake
