// The NVSHMEM part of _mooncake_ep_nvshmem.so's C ABI (built only with MOONCAKE_EP_WITH_NVSHMEM,
// linked with libnvshmem_host.so.3 and libnvshmem_device.a, -rdc=true): bootstrap through a
// unique id the caller broadcasts (rank 0's mep_nvshmem_get_uniqueid), the symmetric buffer
// (nvshmem_malloc) and the peer mappings (nvshmem_ptr). The kernels and the rest of the C ABI are
// ep_launch.cu / ep_capi.cu, the same sources as the production library.
//
// NVSHMEM is initialised at most once per process and never finalised here: nvshmem_finalize
// (and nvshmem_free) are collective and hang once a PE has died, and a process cannot re-join a
// finalised job (see the package README, "NVSHMEM mode and recovery").
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <vector>

#include "ep_context.h"

#ifndef MOONCAKE_EP_WITH_NVSHMEM
#error "ep_nvshmem.cu is part of the NVSHMEM library only (define MOONCAKE_EP_WITH_NVSHMEM)"
#endif

using namespace mooncake::ep;
using namespace mooncake::ep::capi;

namespace {

std::mutex g_mutex;
int g_state = 0;  // 0 never initialised, 1 initialised, -1 an initialisation failed
int g_rank = -1, g_nranks = 0, g_device = -1;

}  // namespace

extern "C" {

int mep_ctx_destroy(void* ctx);  // ep_capi.cu

// Bytes of a unique id (nvshmemx_uniqueid_t).
int mep_nvshmem_uniqueid_bytes() { return static_cast<int>(sizeof(nvshmemx_uniqueid_t)); }

// NVSHMEM's version as major * 10000 + minor * 100 + patch (of the headers this library was built
// with; the host library must match, NVSHMEM checks it at init).
int mep_nvshmem_version() {
  return NVSHMEM_VENDOR_MAJOR_VERSION * 10000 + NVSHMEM_VENDOR_MINOR_VERSION * 100 + NVSHMEM_VENDOR_PATCH_VERSION;
}

// A new unique id (rank 0; the others receive it from the caller's broadcast).
int mep_nvshmem_get_uniqueid(unsigned char* out) {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  const int rc = nvshmemx_get_uniqueid(&id);
  if (rc != 0) return fail(kInvalidArgument, "nvshmemx_get_uniqueid failed (code " + std::to_string(rc) + ")");
  std::memcpy(out, &id, sizeof(id));
  return 0;
}

// 1 when NVSHMEM is initialised in this process (with *rank / *nranks / *device), 0 when never,
// -1 after a failed initialisation (a process cannot try again).
int mep_nvshmem_state(int* rank, int* nranks, int* device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  *rank = g_rank;
  *nranks = g_nranks;
  *device = g_device;
  return g_state;
}

// Collective over the `nranks` processes that hold the same unique id: nvshmemx_init_attr with
// NVSHMEMX_INIT_WITH_UNIQUEID on `device` (made current first). Returns an error instead of the
// exit() of the header's inline nvshmemx_init_attr. Blocks until every rank joined (NVSHMEM's own
// bootstrap timeout applies).
int mep_nvshmem_init(int device, int rank, int nranks, const unsigned char* uniqueid) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_state == 1) {
    if (rank == g_rank && nranks == g_nranks && device == g_device) return 0;
    return fail(kInvalidArgument, "NVSHMEM is already initialised in this process as rank " + std::to_string(g_rank) +
                                      " of " + std::to_string(g_nranks) + " on GPU " + std::to_string(g_device) +
                                      "; it cannot be initialised again with another membership");
  }
  if (g_state == -1) return fail(kInvalidArgument, "an earlier NVSHMEM initialisation failed in this process");
  if (nranks < 1 || rank < 0 || rank >= nranks) return fail(kInvalidArgument, "mep_nvshmem_init: bad rank/nranks");
  MEP_CHECK(cudaSetDevice(device));
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, uniqueid, sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int rc = nvshmemx_set_attr_uniqueid_args(rank, nranks, &id, &attr);
  if (rc != 0) {
    g_state = -1;
    return fail(kInvalidArgument, "nvshmemx_set_attr_uniqueid_args failed (code " + std::to_string(rc) + ")");
  }
  // nvshmemx_init_attr without its exit() on failure.
  int provided = 0;
  nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                NVSHMEM_VENDOR_PATCH_VERSION};
  nvshmemx_init_init_attr_ver_only(attr);
  rc = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version);
  if (rc != 0) {
    g_state = -1;
    return fail(kInvalidArgument, "NVSHMEM initialisation (nvshmemx_init_attr, unique id) failed (code " +
                                      std::to_string(rc) + "); NVSHMEM_DEBUG=INFO says why");
  }
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != nranks) {
    g_state = -1;
    return fail(kInvalidArgument, "NVSHMEM initialised as PE " + std::to_string(nvshmem_my_pe()) + " of " +
                                      std::to_string(nvshmem_n_pes()) + ", expected " + std::to_string(rank) +
                                      " of " + std::to_string(nranks));
  }
  g_state = 1;
  g_rank = rank;
  g_nranks = nranks;
  g_device = device;
  return 0;
}

// Collective (nvshmem_malloc): a context whose symmetric buffer is a new `buffer_bytes`
// allocation of the NVSHMEM heap. With `direct`, peers that nvshmem_ptr maps are reached by
// stores (their addresses fill both the P2P peer table and the NVSHMEM transport's table);
// without, every other rank is reached through NVSHMEM operations (tests of that path on one
// node). *mapped_out (int [nranks]) says which peers are mapped.
int mep_ctx_create_nvshmem(int device, int rank, int nranks, uint64_t buffer_bytes, int direct, int* mapped_out,
                           void** out) {
  *out = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_state != 1 || g_rank != rank || g_nranks != nranks || g_device != device)
      return fail(kInvalidArgument, "mep_ctx_create_nvshmem: NVSHMEM is not initialised as this rank (mep_nvshmem_init)");
  }
  DeviceGuard guard(device);
  void* buffer = nvshmem_malloc(buffer_bytes);
  if (buffer == nullptr)
    return fail(kInvalidArgument, "nvshmem_malloc(" + std::to_string(buffer_bytes) +
                                      ") failed: raise NVSHMEM_SYMMETRIC_SIZE (set before the first Buffer)");
  Context* c = nullptr;
  int rc = create_context(device, rank, nranks, buffer_bytes, nullptr, buffer, &c);
  if (rc != 0) return rc;  // the symmetric allocation stays (nvshmem_free is collective)
  std::vector<uint64_t> mapped(nranks, 0);
  for (int r = 0; r < nranks; ++r) {
    void* p = r == rank ? buffer : nvshmem_ptr(buffer, r);
    if (p != nullptr && (direct || r == rank)) mapped[r] = reinterpret_cast<uint64_t>(p);
    c->peers[r] = reinterpret_cast<void*>(mapped[r]);  // mep_ctx_commit: unmapped -> own buffer
    mapped_out[r] = mapped[r] != 0 ? 1 : 0;
  }
  rc = check(cudaMalloc(&c->nvshmem_mapped, sizeof(uint64_t) * nranks), "cudaMalloc(nvshmem table)");
  if (rc == 0)
    rc = check(cudaMemcpy(c->nvshmem_mapped, mapped.data(), sizeof(uint64_t) * nranks, cudaMemcpyHostToDevice),
               "cudaMemcpy(nvshmem table)");
  if (rc == 0) {
    std::vector<uint64_t> table(nranks);
    for (int r = 0; r < nranks; ++r) table[r] = mapped[r] != 0 ? mapped[r] : reinterpret_cast<uint64_t>(buffer);
    rc = check(cudaMemcpy(c->peer_table, table.data(), sizeof(uint64_t) * nranks, cudaMemcpyHostToDevice),
               "cudaMemcpy(peer table)");
  }
  if (rc != 0) {
    for (int r = 0; r < nranks; ++r) c->peers[r] = r == rank ? buffer : nullptr;
    mep_ctx_destroy(c);
    return rc;
  }
  // The peers' mappings belong to NVSHMEM: forget them so that destroy / resize close nothing.
  for (int r = 0; r < nranks; ++r) c->peers[r] = r == rank ? buffer : nullptr;
  *out = c;
  return 0;
}

}  // extern "C"
