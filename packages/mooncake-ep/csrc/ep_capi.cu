// The C ABI of _mooncake_ep_cuda.so, loaded from Python with ctypes (no torch, no pybind11).
//
// Every function returns 0 on success or a non-zero code (a cudaError_t, a CUresult from a
// driver-API launch, kInvalidArgument, or kCapturing); mep_last_error() describes the last
// failure of the calling thread.
#include <cuda.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "ep_launch.h"
#include "ep_params.h"
#include "mooncake/device/p2p.cuh"
#include "mooncake/device/p2p_host.h"

namespace {

using namespace mooncake::ep;
namespace dev = mooncake::device;

constexpr int kAbiVersion = 2;
constexpr int kInvalidArgument = 100000;
// mep_dispatch / mep_combine with kFlagCachedOutputs on a stream that is being captured: nothing
// was launched; the caller retries with outputs of its own for the graph (cached ones would be
// shared between the graph and eager calls).
constexpr int kCapturing = 100001;
constexpr int64_t kFlagCachedOutputs = 8;

thread_local std::string g_last_error;

int fail(int code, const std::string& what) {
  g_last_error = what;
  return code;
}

int check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return 0;
  return fail(static_cast<int>(err), std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

int check_driver(CUresult err, const char* what) {
  if (err == CUDA_SUCCESS) return 0;
  const char* name = nullptr;
  if (driver_api().get_error_name == nullptr || driver_api().get_error_name(err, &name) != CUDA_SUCCESS) name = "?";
  return fail(static_cast<int>(err), std::string(what) + ": " + name);
}

#define MEP_CHECK(expr)                         \
  do {                                          \
    const int _rc = check((expr), #expr);       \
    if (_rc != 0) return _rc;                   \
  } while (0)

struct Context {
  int device = 0, rank = 0, num_ranks = 0, num_sms = 0, max_smem = 0;
  void* buffer = nullptr;
  uint64_t buffer_bytes = 0;
  void* state = nullptr;
  uint64_t* verdicts = nullptr;         // device [4][R]
  bool cooperative = true;              // cooperative launches (all blocks co-resident)
  uint64_t* trace[2] = {nullptr, nullptr};  // optional phase timestamps (dispatch, combine)
  uint64_t* peer_table = nullptr;       // device [R]
  std::vector<void*> peers;             // mapped base per rank; own rank = buffer
  std::vector<unsigned char> handles;   // [R][64] handle each mapping was opened from
  // Driver-API launches: the device's primary context and every kernel variant resolved in it
  // once (the runtime's launch looks the kernel up on every call). False: runtime launches.
  bool driver_launch = false;
  CUcontext cu_ctx = nullptr;
  CUfunction dispatch_fn[kTransportKinds][kHiddenCases] = {};
  CUfunction combine_fn[kTransportKinds][kHiddenCases] = {};
  CUfunction empty_fn[2] = {};  // calibration kernels (mep_bench_launch)
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

// Resolves every kernel variant to a CUfunction of the device's primary context (the one the
// runtime and torch use; cudaSetDevice makes it current). Leaves driver_launch false (runtime
// launches) when the driver entry points or a lookup fail. Restores the caller's context.
void resolve_kernels(Context* c) {
  c->driver_launch = false;
  const DriverApi& d = driver_api();
  CUcontext previous = nullptr;
  if (!d.ok || d.ctx_get_current(&previous) != CUDA_SUCCESS) return;
  bool ok = cudaSetDevice(c->device) == cudaSuccess && d.ctx_get_current(&c->cu_ctx) == CUDA_SUCCESS &&
            c->cu_ctx != nullptr;
  auto resolve = [&ok](const void* symbol, CUfunction* out) {
    cudaFunction_t fn = nullptr;
    ok = ok && cudaGetFuncBySymbol(&fn, symbol) == cudaSuccess && fn != nullptr;
    *out = reinterpret_cast<CUfunction>(fn);
  };
  for (int k = 0; k < kTransportKinds; ++k) {
    for (int h = 0; h < kHiddenCases; ++h) {
      resolve(dispatch_symbol(static_cast<TransportKind>(k), h), &c->dispatch_fn[k][h]);
      resolve(combine_symbol(static_cast<TransportKind>(k), h), &c->combine_fn[k][h]);
    }
  }
  resolve(empty_symbol(false), &c->empty_fn[0]);
  resolve(empty_symbol(true), &c->empty_fn[1]);
  (void)cudaGetLastError();
  d.ctx_set_current(previous);
  c->driver_launch = ok;
}

// 0 when `stream` is not being captured, kCapturing when it is, else the query's error code.
int capture_state(const Context& c, cudaStream_t stream) {
  if (c.driver_launch) {
    CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
    const int rc = check_driver(driver_api().stream_is_capturing(reinterpret_cast<CUstream>(stream), &status),
                                "cuStreamIsCapturing");
    if (rc != 0) return rc;
    return status == CU_STREAM_CAPTURE_STATUS_NONE ? 0 : kCapturing;
  }
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  MEP_CHECK(cudaStreamIsCapturing(stream, &status));
  return status == cudaStreamCaptureStatusNone ? 0 : kCapturing;
}

// One launch of a kernel variant with the context's launch API.
int launch(const Context& c, const void* symbol, CUfunction fn, const LaunchShape& shape, cudaStream_t stream,
           void** args) {
  const char* what = "";
  const int rc = launch_kernel(symbol, c.driver_launch ? fn : nullptr, shape, stream, args, &what);
  if (rc == 0) return 0;
  if (c.driver_launch) return check_driver(static_cast<CUresult>(rc), what);
  return check(static_cast<cudaError_t>(rc), what);
}

// Argument vectors (int64 words) of mep_dispatch / mep_combine; Python (fast_path.py) fills the
// same order: the words that change with every call first (one struct.pack_into), then the ones
// fixed by the outputs, the buffer half and the shape. Flags: bit 0 use_fp8, 1 round_scale,
// 2 use_ue8m0 (dispatch only), 3 kFlagCachedOutputs.
enum DispatchArg {
  kDX, kDTopk, kDActive, kDCumStats, kDN, kDK, kDFlags, kDPhases, kDTimeout, kDStream,
  kDRecvX, kDRecvScales, kDRecvCount, kDSrcInfo, kDLayoutRange,
  kDT, kDH, kDE, kDHalf,
  kDOffDispatchSend, kDOffDispatchRecv, kDOffDispatchSignals, kDOffCombineSend, kDOffCombineRecv,
  kDOffCombineSignals, kDOffControl, kDMsgBytes, kDTransport, kDGrid, kDispatchArgs
};
enum CombineArg {
  kCX, kCSrcInfo, kCLayoutRange, kCTopk, kCWeights, kCActive, kCOut, kCN, kCK, kCFlags, kCPhases, kCTimeout,
  kCStream,
  kCT, kCH, kCE, kCHalf,
  kCOffDispatchSend, kCOffDispatchRecv, kCOffDispatchSignals, kCOffCombineSend, kCOffCombineRecv,
  kCOffCombineSignals, kCOffControl, kCTransport, kCGrid, kCombineArgs
};

int check_shape(const Context& c, int64_t N, int64_t T, int64_t H, int64_t K, int64_t E) {
  char msg[256];
  if (H <= 0 || H % 128 != 0) {
    std::snprintf(msg, sizeof(msg), "hidden=%lld must be a positive multiple of 128", static_cast<long long>(H));
    return fail(kInvalidArgument, msg);
  }
  if (K < 1 || K > kMaxTopk) {
    std::snprintf(msg, sizeof(msg), "topk=%lld must be in [1, %d]", static_cast<long long>(K), kMaxTopk);
    return fail(kInvalidArgument, msg);
  }
  if (T < 1 || N < 0 || N > T) {
    std::snprintf(msg, sizeof(msg), "num_tokens=%lld must be in [0, T=%lld]", static_cast<long long>(N),
                  static_cast<long long>(T));
    return fail(kInvalidArgument, msg);
  }
  if (E < c.num_ranks || E % c.num_ranks != 0 || E > kMaxExperts) {
    std::snprintf(msg, sizeof(msg), "num_experts=%lld must be a multiple of num_ranks=%d and <= %d",
                  static_cast<long long>(E), c.num_ranks, kMaxExperts);
    return fail(kInvalidArgument, msg);
  }
  return 0;
}

int check_transport(int64_t kind) {
  if (kind < 0 || kind >= kTransportKinds) return fail(kInvalidArgument, "unknown transport kind");
  return 0;
}

// Blocks per launch: the grid every rank agreed on (the smallest SM count of the group), so
// arrival counters reach tag * grid on every receiver.
int grid_for(const Context& c, int64_t requested) {
  if (requested <= 0 || requested > c.num_sms) return c.num_sms;
  return static_cast<int>(requested);
}

HalfOffsets offsets_from(const int64_t* a, int first) {
  HalfOffsets o;
  o.dispatch_send = static_cast<uint64_t>(a[first]);
  o.dispatch_recv = static_cast<uint64_t>(a[first + 1]);
  o.dispatch_signals = static_cast<uint64_t>(a[first + 2]);
  o.combine_send = static_cast<uint64_t>(a[first + 3]);
  o.combine_recv = static_cast<uint64_t>(a[first + 4]);
  o.combine_signals = static_cast<uint64_t>(a[first + 5]);
  o.control = static_cast<uint64_t>(a[first + 6]);
  return o;
}


}  // namespace

extern "C" {

int mep_abi_version() { return kAbiVersion; }

const char* mep_last_error() { return g_last_error.c_str(); }

// PCI bus id, compute capability and SM count of `device`.
int mep_device_info(int device, char* bus_id, int bus_id_len, int* cc_major, int* cc_minor, int* num_sms) {
  MEP_CHECK(dev::p2p_device_bus_id(device, bus_id, bus_id_len));
  MEP_CHECK(cudaDeviceGetAttribute(cc_major, cudaDevAttrComputeCapabilityMajor, device));
  MEP_CHECK(cudaDeviceGetAttribute(cc_minor, cudaDevAttrComputeCapabilityMinor, device));
  MEP_CHECK(cudaDeviceGetAttribute(num_sms, cudaDevAttrMultiProcessorCount, device));
  return 0;
}

int mep_can_reach(int device, const char* bus_id, int* out) {
  DeviceGuard guard(device);
  MEP_CHECK(dev::p2p_can_reach(device, bus_id, out));
  return 0;
}

// Allocates the symmetric buffer (zeroed), the local state and the peer table on `device`.
int mep_ctx_create(int device, int rank, int num_ranks, uint64_t buffer_bytes, void** out) {
  *out = nullptr;
  if (num_ranks < 1 || rank < 0 || rank >= num_ranks || buffer_bytes == 0)
    return fail(kInvalidArgument, "mep_ctx_create: bad rank/num_ranks/buffer_bytes");
  DeviceGuard guard(device);
  auto* c = new Context();
  c->device = device;
  c->rank = rank;
  c->num_ranks = num_ranks;
  c->buffer_bytes = buffer_bytes;
  c->peers.assign(num_ranks, nullptr);
  c->handles.assign(static_cast<size_t>(num_ranks) * dev::kIpcHandleBytes, 0);
  int rc = check(cudaDeviceGetAttribute(&c->num_sms, cudaDevAttrMultiProcessorCount, device), "sm count");
  if (rc == 0) rc = check(cudaDeviceGetAttribute(&c->max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "smem");
  if (rc == 0) rc = check(prepare_kernels(c->max_smem), "prepare kernels");
  if (rc == 0) rc = check(cudaMalloc(&c->buffer, buffer_bytes), "cudaMalloc(buffer)");
  if (rc == 0) rc = check(cudaMalloc(&c->state, kStateBytes), "cudaMalloc(state)");
  if (rc == 0) rc = check(cudaMalloc(&c->peer_table, sizeof(uint64_t) * num_ranks), "cudaMalloc(peer table)");
  if (rc == 0) rc = check(cudaMalloc(&c->verdicts, sizeof(uint64_t) * 4 * num_ranks), "cudaMalloc(verdicts)");
  if (rc == 0) rc = check(cudaMemset(c->verdicts, 0, sizeof(uint64_t) * 4 * num_ranks), "cudaMemset(verdicts)");
  if (rc == 0) rc = check(cudaMemset(c->buffer, 0, buffer_bytes), "cudaMemset(buffer)");
  if (rc == 0) rc = check(cudaMemset(c->state, 0, kStateBytes), "cudaMemset(state)");
  if (rc == 0) rc = check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  if (rc == 0) resolve_kernels(c);
  if (rc != 0) {
    if (c->buffer) cudaFree(c->buffer);
    if (c->state) cudaFree(c->state);
    if (c->peer_table) cudaFree(c->peer_table);
    if (c->verdicts) cudaFree(c->verdicts);
    delete c;
    return rc;
  }
  c->peers[rank] = c->buffer;
  *out = c;
  return 0;
}

uint64_t mep_ctx_buffer(void* ctx) { return reinterpret_cast<uint64_t>(static_cast<Context*>(ctx)->buffer); }
uint64_t mep_ctx_state(void* ctx) { return reinterpret_cast<uint64_t>(static_cast<Context*>(ctx)->state); }
int mep_ctx_num_sms(void* ctx) { return static_cast<Context*>(ctx)->num_sms; }

int mep_ctx_export(void* ctx, unsigned char* out) {
  auto* c = static_cast<Context*>(ctx);
  DeviceGuard guard(c->device);
  MEP_CHECK(dev::p2p_export(c->buffer, out));
  return 0;
}

// Maps `peer`'s buffer from its handle; a handle equal to the one already mapped is a no-op,
// a different one replaces the mapping (a replacement process), NULL unmaps.
int mep_ctx_set_peer(void* ctx, int peer, const unsigned char* handle) {
  auto* c = static_cast<Context*>(ctx);
  if (peer < 0 || peer >= c->num_ranks) return fail(kInvalidArgument, "mep_ctx_set_peer: bad peer");
  if (peer == c->rank) return 0;
  DeviceGuard guard(c->device);
  unsigned char* known = c->handles.data() + static_cast<size_t>(peer) * dev::kIpcHandleBytes;
  if (handle != nullptr && c->peers[peer] != nullptr && std::memcmp(known, handle, dev::kIpcHandleBytes) == 0) return 0;
  if (c->peers[peer] != nullptr) {
    dev::p2p_close(c->peers[peer]);  // the peer may be gone: nothing to do about an error here
    (void)cudaGetLastError();
    c->peers[peer] = nullptr;
    std::memset(known, 0, dev::kIpcHandleBytes);
  }
  if (handle == nullptr) return 0;
  void* base = nullptr;
  MEP_CHECK(dev::p2p_import(handle, &base));
  c->peers[peer] = base;
  std::memcpy(known, handle, dev::kIpcHandleBytes);
  return 0;
}

// Changes this rank's index or the number of ranks (the backend extended or shrank the group):
// every peer mapping is closed; set_peer + commit rebuild them.
int mep_ctx_resize(void* ctx, int rank, int num_ranks) {
  auto* c = static_cast<Context*>(ctx);
  if (num_ranks < 1 || rank < 0 || rank >= num_ranks) return fail(kInvalidArgument, "mep_ctx_resize: bad rank/num_ranks");
  if (rank == c->rank && num_ranks == c->num_ranks) return 0;
  DeviceGuard guard(c->device);
  MEP_CHECK(cudaDeviceSynchronize());
  for (int r = 0; r < c->num_ranks; ++r)
    if (r != c->rank && c->peers[r] != nullptr) dev::p2p_close(c->peers[r]);
  (void)cudaGetLastError();
  uint64_t* table = nullptr;
  MEP_CHECK(cudaMalloc(&table, sizeof(uint64_t) * num_ranks));
  cudaFree(c->peer_table);
  c->peer_table = table;
  uint64_t* verdicts = nullptr;
  MEP_CHECK(cudaMalloc(&verdicts, sizeof(uint64_t) * 4 * num_ranks));
  MEP_CHECK(cudaMemset(verdicts, 0, sizeof(uint64_t) * 4 * num_ranks));
  cudaFree(c->verdicts);
  c->verdicts = verdicts;
  c->rank = rank;
  c->num_ranks = num_ranks;
  c->peers.assign(num_ranks, nullptr);
  c->handles.assign(static_cast<size_t>(num_ranks) * dev::kIpcHandleBytes, 0);
  c->peers[rank] = c->buffer;
  return 0;
}

// Uploads the peer table (unmapped peers point at this rank's own buffer, never dereferenced
// while they are marked failed) and waits for it.
int mep_ctx_commit(void* ctx) {
  auto* c = static_cast<Context*>(ctx);
  DeviceGuard guard(c->device);
  std::vector<uint64_t> table(c->num_ranks);
  for (int r = 0; r < c->num_ranks; ++r)
    table[r] = reinterpret_cast<uint64_t>(c->peers[r] != nullptr ? c->peers[r] : c->buffer);
  MEP_CHECK(cudaMemcpy(c->peer_table, table.data(), sizeof(uint64_t) * c->num_ranks, cudaMemcpyHostToDevice));
  return 0;
}

// Zeroes the signal words (the whole buffer) and the local state: op sequence numbers restart
// on every rank. Collective use only (setup, update_ep_member), with a barrier after it.
int mep_ctx_reset(void* ctx) {
  auto* c = static_cast<Context*>(ctx);
  DeviceGuard guard(c->device);
  MEP_CHECK(cudaDeviceSynchronize());
  MEP_CHECK(cudaMemset(c->buffer, 0, c->buffer_bytes));
  MEP_CHECK(cudaMemset(c->state, 0, kStateBytes));
  MEP_CHECK(cudaMemset(c->verdicts, 0, sizeof(uint64_t) * 4 * c->num_ranks));
  MEP_CHECK(cudaDeviceSynchronize());
  return 0;
}

// Cooperative launches (default) guarantee that all blocks of a kernel are resident together,
// which the receive phase needs when another of this context's kernels could run beside it.
// Benchmarks: device buffers of [grid][8] uint64 that the kernels fill with %globaltimer at their
// phase boundaries (0 = off).
int mep_ctx_set_trace(void* ctx, uint64_t dispatch_trace, uint64_t combine_trace) {
  auto* c = static_cast<Context*>(ctx);
  c->trace[0] = reinterpret_cast<uint64_t*>(dispatch_trace);
  c->trace[1] = reinterpret_cast<uint64_t*>(combine_trace);
  return 0;
}

int mep_ctx_set_cooperative(void* ctx, int cooperative) {
  static_cast<Context*>(ctx)->cooperative = cooperative != 0;
  return 0;
}

// Launch API of the kernels (benchmarks): 1 driver (cuLaunchKernelEx on resolved functions, the
// default where the driver's entry points resolve), 0 runtime (cudaLaunchKernelExC).
int mep_ctx_set_launch_api(void* ctx, int driver) {
  auto* c = static_cast<Context*>(ctx);
  if (!driver) {
    c->driver_launch = false;
    return 0;
  }
  resolve_kernels(c);
  return c->driver_launch ? 0 : fail(kInvalidArgument, "driver-API launches are not available");
}

int mep_ctx_launch_api(void* ctx) { return static_cast<Context*>(ctx)->driver_launch ? 1 : 0; }

int mep_ctx_error_flags(void* ctx, uint32_t* out) {
  auto* c = static_cast<Context*>(ctx);
  DeviceGuard guard(c->device);
  MEP_CHECK(cudaMemcpy(out, static_cast<char*>(c->state) + offsetof(EpState, error), sizeof(uint32_t),
                       cudaMemcpyDeviceToHost));
  return 0;
}

int mep_ctx_destroy(void* ctx) {
  auto* c = static_cast<Context*>(ctx);
  if (c == nullptr) return 0;
  DeviceGuard guard(c->device);
  cudaDeviceSynchronize();
  for (int r = 0; r < c->num_ranks; ++r)
    if (r != c->rank && c->peers[r] != nullptr) dev::p2p_close(c->peers[r]);
  cudaFree(c->peer_table);
  cudaFree(c->verdicts);
  cudaFree(c->state);
  cudaFree(c->buffer);
  (void)cudaGetLastError();
  delete c;
  return 0;
}

// Fills the dispatch kernel's parameters from an argument vector (mep_dispatch, mep_bench_launch).
int dispatch_params(const Context& c, const int64_t* a, DispatchParams* out, LaunchShape* shape) {
  const int rc = check_shape(c, a[kDN], a[kDT], a[kDH], a[kDK], a[kDE]);
  if (rc != 0) return rc;
  if (check_transport(a[kDTransport]) != 0) return kInvalidArgument;
  DispatchParams& p = *out;
  p = DispatchParams{};
  p.x = reinterpret_cast<const void*>(a[kDX]);
  p.topk_idx = reinterpret_cast<const int64_t*>(a[kDTopk]);
  p.active_ranks = reinterpret_cast<int*>(a[kDActive]);
  p.recv_x = reinterpret_cast<void*>(a[kDRecvX]);
  p.recv_scales = reinterpret_cast<void*>(a[kDRecvScales]);
  p.recv_count = reinterpret_cast<int*>(a[kDRecvCount]);
  p.src_info = reinterpret_cast<int*>(a[kDSrcInfo]);
  p.layout_range = reinterpret_cast<int64_t*>(a[kDLayoutRange]);
  p.cum_stats = reinterpret_cast<int*>(a[kDCumStats]);
  p.state = static_cast<EpState*>(c.state);
  p.verdicts = c.verdicts;
  p.trace = c.trace[0];
  p.half = static_cast<int>(a[kDHalf]) & 1;
  p.off = offsets_from(a, kDOffDispatchSend);
  p.msg_bytes = static_cast<uint64_t>(a[kDMsgBytes]);
  p.timeout_us = a[kDTimeout];
  p.N = static_cast<int>(a[kDN]);
  p.T = static_cast<int>(a[kDT]);
  p.H = static_cast<int>(a[kDH]);
  p.K = static_cast<int>(a[kDK]);
  p.R = c.num_ranks;
  p.L = static_cast<int>(a[kDE] / c.num_ranks);
  p.rank = c.rank;
  p.use_fp8 = (a[kDFlags] & 1) != 0;
  p.round_scale = (a[kDFlags] & 2) != 0;
  p.use_ue8m0 = (a[kDFlags] & 4) != 0;
  p.phases = static_cast<int>(a[kDPhases]);
  *shape = launch_shape(p.H, grid_for(c, a[kDGrid]));
  p.tpt = shape->tpt;
  p.grid = shape->blocks;
  shape->smem_bytes = dispatch_smem_bytes(p, *shape);
  shape->cooperative = c.cooperative;
  if (shape->smem_bytes > static_cast<uint64_t>(c.max_smem))
    return fail(kInvalidArgument, "mep_dispatch: num_experts too large for shared memory");
  return 0;
}

int mep_dispatch(void* ctx, const int64_t* a) {
  auto* c = static_cast<Context*>(ctx);
  DispatchParams p;
  LaunchShape shape;
  const int rc = dispatch_params(*c, a, &p, &shape);
  if (rc != 0) return rc;
  dev::P2PTransport tp{c->peer_table, c->rank, c->num_ranks};
  const auto stream = reinterpret_cast<cudaStream_t>(a[kDStream]);
  LaunchScope scope(*c);
  if ((a[kDFlags] & kFlagCachedOutputs) != 0) {
    const int state = capture_state(*c, stream);
    if (state != 0) return state;
  }
  const auto kind = static_cast<TransportKind>(a[kDTransport]);
  const int hcase = hidden_case(p.H);
  void* args[] = {&p, &tp};
  return launch(*c, dispatch_symbol(kind, hcase), c->dispatch_fn[a[kDTransport]][hcase], shape, stream, args);
}

int mep_combine(void* ctx, const int64_t* a) {
  auto* c = static_cast<Context*>(ctx);
  const int rc = check_shape(*c, a[kCN], a[kCT], a[kCH], a[kCK], a[kCE]);
  if (rc != 0) return rc;
  if (check_transport(a[kCTransport]) != 0) return kInvalidArgument;
  CombineParams p = {};
  p.x = reinterpret_cast<const void*>(a[kCX]);
  p.src_info = reinterpret_cast<const int*>(a[kCSrcInfo]);
  p.layout_range = reinterpret_cast<const int64_t*>(a[kCLayoutRange]);
  p.topk_idx = reinterpret_cast<const int64_t*>(a[kCTopk]);
  p.topk_weights = reinterpret_cast<const float*>(a[kCWeights]);
  p.active_ranks = reinterpret_cast<int*>(a[kCActive]);
  p.out = reinterpret_cast<void*>(a[kCOut]);
  p.state = static_cast<EpState*>(c->state);
  p.verdicts = c->verdicts;
  p.trace = c->trace[1];
  p.half = static_cast<int>(a[kCHalf]) & 1;
  p.off = offsets_from(a, kCOffDispatchSend);
  p.timeout_us = a[kCTimeout];
  p.N = static_cast<int>(a[kCN]);
  p.T = static_cast<int>(a[kCT]);
  p.H = static_cast<int>(a[kCH]);
  p.K = static_cast<int>(a[kCK]);
  p.R = c->num_ranks;
  p.L = static_cast<int>(a[kCE] / c->num_ranks);
  p.rank = c->rank;
  p.phases = static_cast<int>(a[kCPhases]);
  LaunchShape shape = launch_shape(p.H, grid_for(*c, a[kCGrid]));
  p.tpt = shape.tpt;
  p.grid = shape.blocks;
  shape.smem_bytes = combine_smem_bytes(p, shape);
  shape.cooperative = c->cooperative;
  if (shape.smem_bytes > static_cast<uint64_t>(c->max_smem))
    return fail(kInvalidArgument, "mep_combine: num_experts too large for shared memory");
  dev::P2PTransport tp{c->peer_table, c->rank, c->num_ranks};
  const auto stream = reinterpret_cast<cudaStream_t>(a[kCStream]);
  LaunchScope scope(*c);
  if ((a[kCFlags] & kFlagCachedOutputs) != 0) {
    const int state = capture_state(*c, stream);
    if (state != 0) return state;
  }
  const auto kind = static_cast<TransportKind>(a[kCTransport]);
  const int hcase = hidden_case(p.H);
  void* args[] = {&p, &tp};
  return launch(*c, combine_symbol(kind, hcase), c->combine_fn[a[kCTransport]][hcase], shape, stream, args);
}

// Calibration (benchmarks): mean host microseconds per iteration over `iters` iterations of
// `mode`, the stream of `dispatch_args` synchronised before and after (not timed).
//   0 nothing (the timer), 1 the guard of v1 (cudaGetDevice + an unconditional cudaSetDevice),
//   2 the launch path's guard (LaunchScope), 3 the capture-state query of the stream,
//   4 an empty kernel, 1 block of 32 threads, no parameters (cudaLaunchKernel),
//   5 / 6 an empty kernel with the dispatch kernel's parameters, grid, block and shared memory,
//     through the runtime (cudaLaunchKernelExC) / the driver (cuLaunchKernelEx),
//   7 / 8 mep_dispatch(dispatch_args) with runtime / driver launches (the full C side),
//   9 mep_dispatch with the context's launch API, each one after the stream went idle (only
//     the launches timed).
int mep_bench_launch(void* ctx, int mode, int iters, const int64_t* dispatch_args, double* out_us) {
  auto* c = static_cast<Context*>(ctx);
  *out_us = 0;
  if (iters < 1 || mode < 0 || mode > 9) return fail(kInvalidArgument, "mep_bench_launch: bad mode or iters");
  const bool driver = c->driver_launch;
  if ((mode == 6 || mode == 8) && !driver) return fail(kInvalidArgument, "driver-API launches are not available");
  DispatchParams p;
  LaunchShape shape;
  int rc = dispatch_params(*c, dispatch_args, &p, &shape);
  if (rc != 0) return rc;
  dev::P2PTransport tp{c->peer_table, c->rank, c->num_ranks};
  void* args[] = {&p, &tp};
  const auto stream = reinterpret_cast<cudaStream_t>(dispatch_args[kDStream]);
  DeviceGuard outer(c->device);
  MEP_CHECK(cudaStreamSynchronize(stream));
  const LaunchShape tiny{1, 32, 1, 0, false};
  const void* empty = empty_symbol(false);
  c->driver_launch = mode == 8 || (mode != 7 && driver);
  if (mode == 9) {
    std::chrono::duration<double, std::micro> total{0};
    for (int i = 0; i < iters && rc == 0; ++i) {
      rc = check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      const auto t0 = std::chrono::steady_clock::now();
      if (rc == 0) rc = mep_dispatch(ctx, dispatch_args);
      total += std::chrono::steady_clock::now() - t0;
    }
    if (rc != 0) return rc;
    MEP_CHECK(cudaStreamSynchronize(stream));
    *out_us = total.count() / iters;
    return 0;
  }
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < iters && rc == 0; ++i) {
    switch (mode) {
      case 1: {
        int previous = -1;
        if (cudaGetDevice(&previous) == cudaSuccess) cudaSetDevice(previous);
        break;
      }
      case 2: {
        LaunchScope scope(*c);
        break;
      }
      case 3:
        rc = capture_state(*c, stream);
        break;
      case 4:
        rc = check(cudaLaunchKernel(empty, dim3(tiny.blocks), dim3(tiny.threads), nullptr, 0, stream), "cudaLaunchKernel");
        break;
      case 5:
      case 6: {
        const char* what = "";
        const int err = launch_kernel(empty_symbol(true), mode == 6 ? c->empty_fn[1] : nullptr, shape, stream, args, &what);
        rc = err == 0 ? 0 : fail(err, what);
        break;
      }
      case 7:
      case 8:
        rc = mep_dispatch(ctx, dispatch_args);
        break;
      default:
        break;
    }
  }
  const auto end = std::chrono::steady_clock::now();
  c->driver_launch = driver;
  if (rc != 0) return rc;
  MEP_CHECK(cudaStreamSynchronize(stream));
  *out_us = std::chrono::duration<double, std::micro>(end - start).count() / iters;
  return 0;
}

int mep_dispatch_num_args() { return kDispatchArgs; }
int mep_combine_num_args() { return kCombineArgs; }

}  // extern "C"
