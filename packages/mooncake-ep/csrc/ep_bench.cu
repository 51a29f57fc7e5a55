// _mooncake_ep_bench.so: launch calibration of the fast path (benchmarks only), mep_bench_launch.
//
// A separate library, loaded only by mooncake.ep._cuda.bench (mooncake.ep._cuda.load_bench): the
// production _mooncake_ep_cuda.so carries no benchmark code. It links against the production
// library (its context, dispatch_params, the capture query, the driver entry points, mep_dispatch)
// and has its own copy of the static CUDA runtime, so the calibration kernels below are
// registered with (and launched through) this library's runtime; the production kernels are only
// reached through mep_dispatch.
#include <cuda.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>

#include "ep_args.h"
#include "ep_context.h"
#include "mooncake/device/p2p.cuh"

using namespace mooncake::ep;
using namespace mooncake::ep::capi;

namespace {

// What a launch costs with no work, and with the dispatch kernel's parameter block.
__global__ void empty_kernel() {}
__global__ void empty_params_kernel(const DispatchParams, const mooncake::device::P2PTransport) {}

// A runtime launch through this library's runtime (the one the calibration kernels live in).
int runtime_launch(const void* symbol, const LaunchShape& shape, cudaStream_t stream, void** args) {
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
  return check(cudaLaunchKernelExC(&cfg, symbol, args), "cudaLaunchKernelExC");
}

}  // namespace

extern "C" {

// Layout of MepOpArgs as this library was compiled (mooncake.ep._cuda.load_bench checks it, as
// load() checks the production library's mep_args_layout_hash).
uint64_t mep_bench_args_layout_hash(void) { return fnv1a64(args_layout_description()); }

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
int mep_bench_launch(void* ctx, int mode, int iters, const MepOpArgs* dispatch_args, double* out_us) {
  auto* c = static_cast<Context*>(ctx);
  *out_us = 0;
  if (iters < 1 || mode < 0 || mode > 9) return fail(kInvalidArgument, "mep_bench_launch: bad mode or iters");
  const bool driver = c->driver_launch;
  if ((mode == 6 || mode == 8) && !driver) return fail(kInvalidArgument, "driver-API launches are not available");
  DispatchParams p;
  LaunchShape shape;
  int rc = dispatch_params(*c, *dispatch_args, &p, &shape);
  if (rc != 0) return rc;
  mooncake::device::P2PTransport tp{c->peer_table, c->rank, c->num_ranks};
  void* args[] = {&p, &tp};
  const auto stream = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(dispatch_args->stream));
  DeviceGuard outer(c->device);
  MEP_CHECK(cudaStreamSynchronize(stream));
  // The calibration kernels, loaded and resolved before the timed loop (not timed).
  MEP_CHECK(cudaFuncSetAttribute(empty_params_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, c->max_smem));
  cudaFuncAttributes attrs;
  MEP_CHECK(cudaFuncGetAttributes(&attrs, empty_kernel));
  CUfunction empty_params_fn = nullptr;
  if (mode == 6) {
    cudaFunction_t fn = nullptr;
    MEP_CHECK(cudaGetFuncBySymbol(&fn, reinterpret_cast<const void*>(empty_params_kernel)));
    empty_params_fn = reinterpret_cast<CUfunction>(fn);
  }
  const LaunchShape tiny{1, 32, 1, 0, false};
  c->driver_launch = mode == 8 || (mode != 7 && driver);
  if (mode == 9) {
    std::chrono::duration<double, std::micro> total{0};
    for (int i = 0; i < iters && rc == 0; ++i) {
      rc = check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      const auto t0 = std::chrono::steady_clock::now();
      if (rc == 0) rc = mep_dispatch(ctx, dispatch_args);
      total += std::chrono::steady_clock::now() - t0;
    }
    c->driver_launch = driver;
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
        rc = check(cudaLaunchKernel(reinterpret_cast<const void*>(empty_kernel), dim3(tiny.blocks),
                                    dim3(tiny.threads), nullptr, 0, stream),
                   "cudaLaunchKernel");
        break;
      case 5:
        rc = runtime_launch(reinterpret_cast<const void*>(empty_params_kernel), shape, stream, args);
        break;
      case 6: {
        const char* what = "";
        const int err = launch_kernel(nullptr, empty_params_fn, shape, stream, args, &what);
        rc = err == 0 ? 0 : check_driver(static_cast<CUresult>(err), what);
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

}  // extern "C"
