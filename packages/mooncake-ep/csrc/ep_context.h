// Internal to _mooncake_ep_cuda.so: the context behind the C ABI (ep_capi.cu) and what its
// translation units share (error helpers, device guards, the launch helper). The benchmark library
// (_mooncake_ep_bench.so, ep_bench.cu) links against the production one and uses these too.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "ep_args.h"
#include "ep_launch.h"
#include "ep_params.h"
#include "mooncake/device/p2p_host.h"

namespace mooncake {
namespace ep {
namespace capi {

namespace dev = mooncake::device;

constexpr int kInvalidArgument = 100000;
// mep_dispatch / mep_combine with MEP_FLAG_CACHED_OUTPUTS on a stream that is being captured: nothing
// was launched; the caller retries with outputs of its own for the graph (cached ones would be
// shared between the graph and eager calls).
constexpr int kCapturing = 100001;

// Records `what` as the calling thread's last error (mep_last_error) and returns `code`.
int fail(int code, const std::string& what);
int check(cudaError_t err, const char* what);
int check_driver(CUresult err, const char* what);

#define MEP_CHECK(expr)                         \
  do {                                          \
    const int _rc = check((expr), #expr);       \
    if (_rc != 0) return _rc;                   \
  } while (0)

struct Context {
  int device = 0, rank = 0, num_ranks = 0, num_sms = 0, max_smem = 0;
  void* buffer = nullptr;               // device address of the symmetric buffer
  uint64_t buffer_bytes = 0;
  // Proxy mode: the buffer is host memory the transfer engine moves (registered and mapped, not
  // owned: host_base is the caller's address), and the proxy ring is mapped too.
  void* host_base = nullptr;
  void* ring_host = nullptr;
  dev::ProxyRingHeader* ring_dev = nullptr;
  void* state = nullptr;
  uint64_t* verdicts = nullptr;         // device [4][R]
  bool cooperative = true;              // cooperative launches (all blocks co-resident)
  uint64_t* trace[2] = {nullptr, nullptr};  // optional phase timestamps (dispatch, combine)
  // NVSHMEM mode (_mooncake_ep_nvshmem.so only): the buffer is an nvshmem_malloc allocation (not
  // freed here: nvshmem_free is collective), and nvshmem_mapped (device [R]) holds nvshmem_ptr of
  // each peer's buffer or 0 (reached through NVSHMEM puts), the NvshmemTransport's table.
  bool nvshmem = false;
  uint64_t* nvshmem_mapped = nullptr;
  uint64_t* peer_table = nullptr;       // device [R]
  std::vector<void*> peers;             // mapped base per rank; own rank = buffer
  std::vector<unsigned char> handles;   // [R][64] handle each mapping was opened from
  // Driver-API launches: the device's primary context and every kernel variant resolved in it
  // once (the runtime's launch looks the kernel up on every call). False: runtime launches.
  bool driver_launch = false;
  CUcontext cu_ctx = nullptr;
  CUfunction dispatch_fn[kTransportKinds][kHiddenCases] = {};
  CUfunction combine_fn[kTransportKinds][kHiddenCases] = {};
};

// Makes `device` current for the scope; restores the previous device only if it changed it.
struct DeviceGuard {
  int previous = -1;
  bool changed = false;
  explicit DeviceGuard(int device) {
    changed = cudaGetDevice(&previous) == cudaSuccess && previous != device && cudaSetDevice(device) == cudaSuccess;
  }
  ~DeviceGuard() {
    if (changed) cudaSetDevice(previous);
  }
};

// The launch path's guard: with driver launches the context's CUcontext is made current (a
// thread that never used CUDA has none, and a CUfunction launches only in its own context), else
// the device. Nothing is set or restored when it already is current, the common case.
struct LaunchScope {
  CUcontext previous_ctx = nullptr;
  bool restore_ctx = false;
  int previous_device = -1;
  bool restore_device = false;
  explicit LaunchScope(const Context& c) {
    if (c.driver_launch) {
      const DriverApi& d = driver_api();
      restore_ctx = d.ctx_get_current(&previous_ctx) == CUDA_SUCCESS && previous_ctx != c.cu_ctx &&
                    d.ctx_set_current(c.cu_ctx) == CUDA_SUCCESS;
    } else {
      restore_device = cudaGetDevice(&previous_device) == cudaSuccess && previous_device != c.device &&
                       cudaSetDevice(c.device) == cudaSuccess;
    }
  }
  ~LaunchScope() {
    if (restore_ctx) driver_api().ctx_set_current(previous_ctx);
    if (restore_device) cudaSetDevice(previous_device);
  }
};

// Creates a context (mep_ctx_create*): the symmetric buffer is `host_base` (host memory,
// registered and mapped), else `device_buffer` (device memory the caller owns, zeroed here), else
// a new cudaMalloc allocation.
int create_context(int device, int rank, int num_ranks, uint64_t buffer_bytes, void* host_base, void* device_buffer,
                   Context** out);

// Resolves every kernel variant for driver-API launches (driver_launch stays false if it cannot).
void resolve_kernels(Context* c);
// 0 when `stream` is not being captured, kCapturing when it is, else the query's error code.
int capture_state(const Context& c, cudaStream_t stream);
// One launch of a kernel variant with the context's launch API.
int launch(const Context& c, const void* symbol, CUfunction fn, const LaunchShape& shape, cudaStream_t stream,
           void** args);

// Fills the dispatch kernel's parameters and launch shape from an argument block (mep_dispatch;
// the benchmark library's mep_bench_launch).
int dispatch_params(const Context& c, const MepOpArgs& a, DispatchParams* out, LaunchShape* shape);

}  // namespace capi
}  // namespace ep
}  // namespace mooncake

extern "C" int mep_dispatch(void* ctx, const MepOpArgs* a);
