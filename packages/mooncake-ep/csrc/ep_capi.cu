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

#include "ep_context.h"
#include "mooncake/device/p2p.cuh"
#ifdef MOONCAKE_EP_WITH_NVSHMEM
#include "mooncake/device/nvshmem.cuh"
#endif

namespace mooncake {
namespace ep {
namespace capi {

// 3: proxy mode (mep_ctx_create_host, mep_ctx_set_ring, kind 2); 4: mep_dispatch / mep_combine take
// a MepOpArgs block (ep_args.h, layout checked by mep_args_layout_hash) instead of an int64 vector;
// mep_bench_launch moved to _mooncake_ep_bench.so; 5: transport kind 3 (NVSHMEM; launched only by
// _mooncake_ep_nvshmem.so, the same sources built with MOONCAKE_EP_WITH_NVSHMEM), mep_has_nvshmem.
constexpr int kAbiVersion = 5;

static_assert(MEP_PHASE_SEND == kPhaseSend && MEP_PHASE_RECV == kPhaseRecv, "phase bits");
static_assert(static_cast<int>(TransportKind::kNvshmem) + 1 == kTransportKinds, "transport kinds");

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
    *out = nullptr;
    if (symbol == nullptr) return;  // a kind this library was built without
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
  (void)cudaGetLastError();
  d.ctx_set_current(previous);
  c->driver_launch = ok;
}

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

int launch(const Context& c, const void* symbol, CUfunction fn, const LaunchShape& shape, cudaStream_t stream,
           void** args) {
  const char* what = "";
  const int rc = launch_kernel(symbol, c.driver_launch ? fn : nullptr, shape, stream, args, &what);
  if (rc == 0) return 0;
  if (c.driver_launch) return check_driver(static_cast<CUresult>(rc), what);
  return check(static_cast<cudaError_t>(rc), what);
}


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

int check_transport(int kind) {
  if (kind < 0 || kind >= kTransportKinds) return fail(kInvalidArgument, "unknown transport kind");
  if (kind == MEP_TRANSPORT_NVSHMEM && !kHasNvshmem)
    return fail(kInvalidArgument,
                "transport kind 3 (NVSHMEM) runs only in _mooncake_ep_nvshmem.so; this library was built without NVSHMEM");
  return 0;
}

// Blocks per launch: the grid every rank agreed on (the smallest SM count of the group), so
// arrival counters reach tag * grid on every receiver.
int grid_for(const Context& c, int64_t requested) {
  if (requested <= 0 || requested > c.num_sms) return c.num_sms;
  return static_cast<int>(requested);
}

HalfOffsets offsets_from(const MepOpArgs& a) {
  HalfOffsets o;
  o.dispatch_send = a.off_dispatch_send;
  o.dispatch_recv = a.off_dispatch_recv;
  o.dispatch_signals = a.off_dispatch_signals;
  o.combine_send = a.off_combine_send;
  o.combine_recv = a.off_combine_recv;
  o.combine_signals = a.off_combine_signals;
  o.control = a.off_control;
  return o;
}

template <class T>
T* ptr(uint64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}


// One launch of a dispatch or combine kernel (`params` points at its parameters) with the
// transport of `kind`: P2P ones over the peer table, the proxy one over the mapped ring (its posts
// wait at most the op's timeout for room in a full ring).
int launch_op(const Context& c, TransportKind kind, const void* symbol, CUfunction fn, const LaunchShape& shape,
              cudaStream_t stream, void* params, int64_t timeout_us) {
  if (kind == TransportKind::kProxy) {
    if (c.ring_dev == nullptr || c.host_base == nullptr)
      return fail(kInvalidArgument, "transport kind 2 (proxy) needs a host buffer and a ring (mep_ctx_set_ring)");
    dev::HostProxyTransport tp{c.ring_dev, static_cast<char*>(c.buffer), timeout_us, c.rank, c.num_ranks};
    void* args[] = {params, &tp};
    return launch(c, symbol, fn, shape, stream, args);
  }
  if (kind == TransportKind::kNvshmem) {
#ifdef MOONCAKE_EP_WITH_NVSHMEM
    if (!c.nvshmem || c.nvshmem_mapped == nullptr)
      return fail(kInvalidArgument, "transport kind 3 (NVSHMEM) needs a context made by mep_ctx_create_nvshmem");
    dev::NvshmemTransport tp{c.nvshmem_mapped, static_cast<char*>(c.buffer), c.rank, c.num_ranks};
    void* args[] = {params, &tp};
    return launch(c, symbol, fn, shape, stream, args);
#else
    (void)timeout_us;
    return fail(kInvalidArgument, "transport kind 3 (NVSHMEM) is not built into this library");
#endif
  }
  dev::P2PTransport tp{c.peer_table, c.rank, c.num_ranks};
  void* args[] = {params, &tp};
  return launch(c, symbol, fn, shape, stream, args);
}

// Fills the dispatch kernel's parameters from an argument block (mep_dispatch, mep_bench_launch).
int dispatch_params(const Context& c, const MepOpArgs& a, DispatchParams* out, LaunchShape* shape) {
  const int rc = check_shape(c, a.num_tokens, a.max_tokens, a.hidden, a.topk, a.num_experts);
  if (rc != 0) return rc;
  if (check_transport(a.transport) != 0) return kInvalidArgument;
  DispatchParams& p = *out;
  p = DispatchParams{};
  p.x = ptr<const void>(a.x);
  p.topk_idx = ptr<const int64_t>(a.topk_idx);
  p.active_ranks = ptr<int>(a.active_ranks);
  p.recv_x = ptr<void>(a.recv_x);
  p.recv_scales = ptr<void>(a.recv_scales);
  p.recv_count = ptr<int>(a.recv_count);
  p.src_info = ptr<int>(a.src_info);
  p.layout_range = ptr<int64_t>(a.layout_range);
  p.cum_stats = ptr<int>(a.cum_stats);
  p.state = static_cast<EpState*>(c.state);
  p.verdicts = c.verdicts;
  p.trace = c.trace[0];
  p.half = a.half & 1;
  p.off = offsets_from(a);
  p.msg_bytes = a.msg_bytes;
  p.timeout_us = a.timeout_us;
  p.N = a.num_tokens;
  p.T = a.max_tokens;
  p.H = a.hidden;
  p.K = a.topk;
  p.R = c.num_ranks;
  p.L = a.num_experts / c.num_ranks;
  p.rank = c.rank;
  p.use_fp8 = (a.flags & MEP_FLAG_FP8) != 0;
  p.round_scale = (a.flags & MEP_FLAG_ROUND_SCALE) != 0;
  p.use_ue8m0 = (a.flags & MEP_FLAG_UE8M0) != 0;
  p.phases = a.phases;
  *shape = launch_shape(p.H, grid_for(c, a.grid));
  p.tpt = shape->tpt;
  p.grid = shape->blocks;
  shape->smem_bytes = dispatch_smem_bytes(p, *shape);
  shape->cooperative = c.cooperative;
  if (shape->smem_bytes > static_cast<uint64_t>(c.max_smem))
    return fail(kInvalidArgument, "mep_dispatch: num_experts too large for shared memory");
  return 0;
}

}  // namespace capi
}  // namespace ep
}  // namespace mooncake

using namespace mooncake::ep;
using namespace mooncake::ep::capi;

extern "C" {

int mep_abi_version() { return kAbiVersion; }

// 1 in _mooncake_ep_nvshmem.so (transport kind 3 and the mep_nvshmem_* calls), 0 otherwise.
int mep_has_nvshmem() { return kHasNvshmem ? 1 : 0; }

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

// Allocates the symmetric buffer (zeroed), the local state and the peer table on `device`. With
// `host_base` (proxy mode) the buffer is that host memory instead: registered, mapped into the
// device (kernels use its device address), not owned.
}  // extern "C"

namespace mooncake {
namespace ep {
namespace capi {
int create_context(int device, int rank, int num_ranks, uint64_t buffer_bytes, void* host_base, void* device_buffer,
                   Context** out) {
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
  if (host_base == nullptr && device_buffer != nullptr) {
    c->buffer = device_buffer;
    c->nvshmem = true;  // the only caller with a buffer of its own (mep_ctx_create_nvshmem)
    if (rc == 0) rc = check(cudaMemset(c->buffer, 0, buffer_bytes), "cudaMemset(buffer)");
  } else if (host_base == nullptr) {
    if (rc == 0) rc = check(cudaMalloc(&c->buffer, buffer_bytes), "cudaMalloc(buffer)");
    if (rc == 0) rc = check(cudaMemset(c->buffer, 0, buffer_bytes), "cudaMemset(buffer)");
  } else {
    if (rc == 0)
      rc = check(cudaHostRegister(host_base, buffer_bytes, cudaHostRegisterMapped | cudaHostRegisterPortable),
                 "cudaHostRegister(buffer)");
    if (rc == 0) c->host_base = host_base;
    if (rc == 0) rc = check(cudaHostGetDevicePointer(&c->buffer, host_base, 0), "cudaHostGetDevicePointer(buffer)");
    if (rc == 0) std::memset(host_base, 0, buffer_bytes);
  }
  if (rc == 0) rc = check(cudaMalloc(&c->state, kStateBytes), "cudaMalloc(state)");
  if (rc == 0) rc = check(cudaMalloc(&c->peer_table, sizeof(uint64_t) * num_ranks), "cudaMalloc(peer table)");
  if (rc == 0) rc = check(cudaMalloc(&c->verdicts, sizeof(uint64_t) * 4 * num_ranks), "cudaMalloc(verdicts)");
  if (rc == 0) rc = check(cudaMemset(c->verdicts, 0, sizeof(uint64_t) * 4 * num_ranks), "cudaMemset(verdicts)");
  if (rc == 0) rc = check(cudaMemset(c->state, 0, kStateBytes), "cudaMemset(state)");
  if (rc == 0) rc = check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  if (rc == 0) resolve_kernels(c);
  if (rc != 0) {
    if (c->host_base) cudaHostUnregister(c->host_base);
    else if (c->buffer && !c->nvshmem) cudaFree(c->buffer);
    if (c->state) cudaFree(c->state);
    if (c->peer_table) cudaFree(c->peer_table);
    if (c->verdicts) cudaFree(c->verdicts);
    (void)cudaGetLastError();
    delete c;
    return rc;
  }
  c->peers[rank] = c->buffer;
  *out = c;
  return 0;
}
}  // namespace capi
}  // namespace ep
}  // namespace mooncake

extern "C" {

static int create_ctx(int device, int rank, int num_ranks, uint64_t buffer_bytes, void* host_base, void** out) {
  Context* c = nullptr;
  const int rc = create_context(device, rank, num_ranks, buffer_bytes, host_base, nullptr, &c);
  *out = c;
  return rc;
}

int mep_ctx_create(int device, int rank, int num_ranks, uint64_t buffer_bytes, void** out) {
  return create_ctx(device, rank, num_ranks, buffer_bytes, nullptr, out);
}

// Proxy mode: the symmetric buffer is `host_base` (page-aligned host memory of `buffer_bytes`,
// e.g. a transfer-engine segment), registered and mapped; the caller keeps it alive until
// mep_ctx_destroy.
int mep_ctx_create_host(int device, int rank, int num_ranks, uint64_t host_base, uint64_t buffer_bytes, void** out) {
  *out = nullptr;
  if (host_base == 0 || host_base % 4096 != 0)
    return fail(kInvalidArgument, "mep_ctx_create_host: host_base must be a non-null page-aligned address");
  return create_ctx(device, rank, num_ranks, buffer_bytes, reinterpret_cast<void*>(host_base), out);
}

// Proxy mode: maps the proxy ring (host memory, `ring_bytes` from proxy_ring_bytes) into the
// device; the kernels of transport kind 2 post into it. 0 unmaps the current ring. The caller
// keeps the ring alive until it is replaced, unmapped, or the context destroyed.
int mep_ctx_set_ring(void* ctx, uint64_t ring_host, uint64_t ring_bytes) {
  auto* c = static_cast<Context*>(ctx);
  DeviceGuard guard(c->device);
  if (c->ring_host != nullptr) {
    MEP_CHECK(cudaDeviceSynchronize());
    cudaHostUnregister(c->ring_host);
    (void)cudaGetLastError();
    c->ring_host = nullptr;
    c->ring_dev = nullptr;
  }
  if (ring_host == 0) return 0;
  auto* hdr = reinterpret_cast<dev::ProxyRingHeader*>(ring_host);
  if (ring_bytes < sizeof(dev::ProxyRingHeader) || hdr->magic != dev::kProxyRingMagic ||
      hdr->total_bytes != ring_bytes || static_cast<int>(hdr->num_peers) != c->num_ranks)
    return fail(kInvalidArgument, "mep_ctx_set_ring: not an initialized proxy ring with one peer slot per rank");
  void* host = reinterpret_cast<void*>(ring_host);
  MEP_CHECK(cudaHostRegister(host, ring_bytes, cudaHostRegisterMapped | cudaHostRegisterPortable));
  void* mapped = nullptr;
  const int rc = check(cudaHostGetDevicePointer(&mapped, host, 0), "cudaHostGetDevicePointer(ring)");
  if (rc != 0) {
    cudaHostUnregister(host);
    return rc;
  }
  c->ring_host = host;
  c->ring_dev = static_cast<dev::ProxyRingHeader*>(mapped);
  return 0;
}

uint64_t mep_ctx_buffer(void* ctx) { return reinterpret_cast<uint64_t>(static_cast<Context*>(ctx)->buffer); }
uint64_t mep_ctx_state(void* ctx) { return reinterpret_cast<uint64_t>(static_cast<Context*>(ctx)->state); }
int mep_ctx_num_sms(void* ctx) { return static_cast<Context*>(ctx)->num_sms; }

int mep_ctx_export(void* ctx, unsigned char* out) {
  auto* c = static_cast<Context*>(ctx);
  if (c->host_base != nullptr) return fail(kInvalidArgument, "mep_ctx_export: a host buffer has no IPC handle");
  if (c->nvshmem) return fail(kInvalidArgument, "mep_ctx_export: an NVSHMEM buffer is shared through NVSHMEM, not IPC");
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
  if (c->host_base != nullptr) std::memset(c->host_base, 0, c->buffer_bytes);
  else MEP_CHECK(cudaMemset(c->buffer, 0, c->buffer_bytes));
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
  if (c->ring_host != nullptr) cudaHostUnregister(c->ring_host);
  if (c->nvshmem_mapped != nullptr) cudaFree(c->nvshmem_mapped);
  // An NVSHMEM buffer stays allocated: nvshmem_free is collective (a barrier), and destroy is local
  // and must not block on a dead PE; it is released with the process.
  if (c->host_base != nullptr) cudaHostUnregister(c->host_base);
  else if (!c->nvshmem) cudaFree(c->buffer);
  (void)cudaGetLastError();
  delete c;
  return 0;
}


// One dispatch (`a`: ep_args.h; the fields of the combine only are ignored).
int mep_dispatch(void* ctx, const MepOpArgs* a) {
  auto* c = static_cast<Context*>(ctx);
  DispatchParams p;
  LaunchShape shape;
  const int rc = dispatch_params(*c, *a, &p, &shape);
  if (rc != 0) return rc;
  const auto stream = ptr<CUstream_st>(a->stream);
  LaunchScope scope(*c);
  if ((a->flags & MEP_FLAG_CACHED_OUTPUTS) != 0) {
    const int state = capture_state(*c, stream);
    if (state != 0) return state;
  }
  const auto kind = static_cast<TransportKind>(a->transport);
  const int hcase = hidden_case(p.H);
  return launch_op(*c, kind, dispatch_symbol(kind, hcase), c->dispatch_fn[a->transport][hcase], shape, stream, &p,
                   p.timeout_us);
}

// One combine (`a`: ep_args.h; the fields of the dispatch only are ignored).
int mep_combine(void* ctx, const MepOpArgs* a) {
  auto* c = static_cast<Context*>(ctx);
  const int rc = check_shape(*c, a->num_tokens, a->max_tokens, a->hidden, a->topk, a->num_experts);
  if (rc != 0) return rc;
  if (check_transport(a->transport) != 0) return kInvalidArgument;
  CombineParams p = {};
  p.x = ptr<const void>(a->x);
  p.src_info = ptr<const int>(a->src_info);
  p.layout_range = ptr<const int64_t>(a->layout_range);
  p.topk_idx = ptr<const int64_t>(a->topk_idx);
  p.topk_weights = ptr<const float>(a->topk_weights);
  p.active_ranks = ptr<int>(a->active_ranks);
  p.out = ptr<void>(a->out);
  p.state = static_cast<EpState*>(c->state);
  p.verdicts = c->verdicts;
  p.trace = c->trace[1];
  p.half = a->half & 1;
  p.off = offsets_from(*a);
  p.timeout_us = a->timeout_us;
  p.N = a->num_tokens;
  p.T = a->max_tokens;
  p.H = a->hidden;
  p.K = a->topk;
  p.R = c->num_ranks;
  p.L = a->num_experts / c->num_ranks;
  p.rank = c->rank;
  p.phases = a->phases;
  LaunchShape shape = launch_shape(p.H, grid_for(*c, a->grid));
  p.tpt = shape.tpt;
  p.grid = shape.blocks;
  shape.smem_bytes = combine_smem_bytes(p, shape);
  shape.cooperative = c->cooperative;
  if (shape.smem_bytes > static_cast<uint64_t>(c->max_smem))
    return fail(kInvalidArgument, "mep_combine: num_experts too large for shared memory");
  const auto stream = ptr<CUstream_st>(a->stream);
  LaunchScope scope(*c);
  if ((a->flags & MEP_FLAG_CACHED_OUTPUTS) != 0) {
    const int state = capture_state(*c, stream);
    if (state != 0) return state;
  }
  const auto kind = static_cast<TransportKind>(a->transport);
  const int hcase = hidden_case(p.H);
  return launch_op(*c, kind, combine_symbol(kind, hcase), c->combine_fn[a->transport][hcase], shape, stream, &p,
                   p.timeout_us);
}

}  // extern "C"
