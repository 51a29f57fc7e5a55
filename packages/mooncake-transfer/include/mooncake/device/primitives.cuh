// Memory-model primitives shared by every device transport (CUDA, sm_70+; tuned for sm_90).
//
// Scopes: ".sys" everywhere a value crosses a process or a GPU (CUDA IPC peers, host-visible
// flags). Signals are 64-bit words; a wait polls with acquire loads and gives up at a deadline
// measured with %globaltimer (nanoseconds of wall-clock time, independent of the SM clock rate).
#pragma once

#include <cstdint>

namespace mooncake {
namespace device {

// "Wait forever" (timeout_us == -1 in the APIs above this layer).
constexpr uint64_t kNoDeadline = ~0ull;

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Deadline `timeout_us` microseconds after `start_ns`; negative timeout means none.
__device__ __forceinline__ uint64_t deadline_after(uint64_t start_ns, int64_t timeout_us) {
  return timeout_us < 0 ? kNoDeadline : start_ns + static_cast<uint64_t>(timeout_us) * 1000ull;
}

__device__ __forceinline__ bool deadline_passed(uint64_t deadline_ns) {
  return deadline_ns != kNoDeadline && globaltimer_ns() > deadline_ns;
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ int ld_acquire_sys(const int* p) {
  int v;
  asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ int ld_relaxed_sys(const int* p) {
  int v;
  asm volatile("ld.relaxed.sys.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint32_t ld_acquire_gpu(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void st_relaxed_sys(int* p, int v) {
  asm volatile("st.relaxed.sys.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void red_release_sys_add(uint64_t* p, uint64_t v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Orders this thread's earlier memory operations (and, through a preceding barrier, those of
// its block) before its later ones, as seen from any thread of the system.
__device__ __forceinline__ void fence_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

// 16-byte load that skips L1: data written by peers is read once, after an acquire.
__device__ __forceinline__ int4 ld_cg_int4(const int4* p) {
  int4 v;
  asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Streaming 16-byte load of local, read-only input (no L1 allocation).
__device__ __forceinline__ int4 ld_stream_int4(const int4* p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Polls `*addr` until `pred(value)` holds (returns true, value in *out) or the deadline passes
// (returns false). The flag is always read at least once, so a value that arrived before the
// deadline of a late caller (a receive hook called long after the send) is still seen.
template <class Pred>
__device__ __forceinline__ bool wait_until(const uint64_t* addr, Pred pred, uint64_t deadline_ns,
                                           uint64_t* out = nullptr) {
  for (uint32_t spin = 0;; ++spin) {
    const uint64_t v = ld_acquire_sys(addr);
    if (pred(v)) {
      if (out != nullptr) *out = v;
      return true;
    }
    // Reading %globaltimer costs more than a load; check it every few polls.
    if ((spin & 15u) == 15u && deadline_passed(deadline_ns)) {
      const uint64_t last = ld_acquire_sys(addr);
      if (pred(last)) {
        if (out != nullptr) *out = last;
        return true;
      }
      return false;
    }
  }
}

// Copies `bytes` (a multiple of 16, both pointers 16-byte aligned) with `group_size` cooperating
// threads; `rank_in_group` in [0, group_size). Four loads are in flight before the first store.
__device__ __forceinline__ void group_copy16(void* dst, const void* src, uint64_t bytes, int rank_in_group,
                                             int group_size) {
  const int4* s = static_cast<const int4*>(src);
  int4* d = static_cast<int4*>(dst);
  const uint64_t n = bytes / 16;
  uint64_t i = rank_in_group;
  for (; i + 3ull * group_size < n; i += 4ull * group_size) {
    int4 v0 = s[i], v1 = s[i + group_size], v2 = s[i + 2ull * group_size], v3 = s[i + 3ull * group_size];
    d[i] = v0;
    d[i + group_size] = v1;
    d[i + 2ull * group_size] = v2;
    d[i + 3ull * group_size] = v3;
  }
  for (; i < n; i += group_size) d[i] = s[i];
}

}  // namespace device
}  // namespace mooncake
