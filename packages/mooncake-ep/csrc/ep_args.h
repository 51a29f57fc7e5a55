/* The argument block of one dispatch or combine launch (mep_dispatch / mep_combine, and the
 * benchmark library's mep_bench_launch): one C struct shared by the CUDA translation units, the
 * plain C++ one that exports its layout (ep_args.cc), and Python (mooncake.ep._cuda.MepOpArgs, a
 * ctypes.Structure with the same fields in the same order).
 *
 * Plain C (C89 + stdint.h) so any C or C++ compiler reads it. The field list is one X-macro:
 * the struct and its layout description (names, types, offsets, sizes, struct size and
 * alignment, plus the constants below) come from it, so they cannot drift apart. Python builds the
 * same description from its ctypes.Structure; both sides hash it (FNV-1a 64) and
 * mooncake.ep._cuda.load() refuses a library whose hash differs.
 *
 * Field order: the words Python rewrites on every call come first, contiguous and unpadded, so one
 * struct.pack_into writes them (dispatch: cum_stats .. phases; combine: stream .. layout_range);
 * then the ones fixed by a dispatch's output tensors; then the ones fixed by the shape, the buffer
 * half, the transport and the grid. A field an op does not use is ignored by it.
 *
 * Adding, removing, reordering or retyping a field changes the hash: bump MEP_ABI_VERSION too.
 */
#ifndef MOONCAKE_EP_ARGS_H
#define MOONCAKE_EP_ARGS_H

#include <stdint.h>

/* X(type, name, meaning). Pointers are device addresses as uint64_t (0 = none). */
#define MEP_OP_ARGS_FIELDS(X)                                                                     \
  /* per call: dispatch's statistics, then the fields of both ops */                             \
  X(uint64_t, cum_stats, "dispatch: int32 [L] received counts are added into (0 = none)")        \
  X(uint64_t, stream, "cudaStream_t the kernel is launched on")                                   \
  X(uint64_t, x, "dispatch: bf16 [N, H] tokens; combine: bf16 [L, R*T, H] expert outputs")        \
  X(uint64_t, topk_idx, "int64 [N, K] this rank's routing")                                      \
  X(uint64_t, active_ranks, "int32 [R], read and written (0 = failed)")                          \
  X(int64_t, timeout_us, "deadline of the op from its start; -1 = none")                         \
  X(int32_t, num_tokens, "N, tokens on this rank (<= T)")                                        \
  X(int32_t, topk, "K")                                                                          \
  X(int32_t, flags, "MEP_FLAG_* bits")                                                           \
  X(int32_t, phases, "MEP_PHASE_SEND | MEP_PHASE_RECV")                                          \
  /* per call: combine's inputs and output */                                                    \
  X(uint64_t, topk_weights, "combine: float32 [N, K]")                                           \
  X(uint64_t, out, "combine: bf16 [N, H] output")                                                \
  X(uint64_t, src_info, "int32 [L, R*T] then [L, R*T] top-k slots (dispatch writes, combine reads)") \
  X(uint64_t, layout_range, "int64 [L, R] (begin << 32) | count (dispatch writes, combine reads)")   \
  /* fixed by a dispatch's output tensors */                                                      \
  X(uint64_t, recv_x, "dispatch: bf16 or e4m3 [L, R*T, H]")                                      \
  X(uint64_t, recv_scales, "dispatch: fp32 [L, H/128, R*T] or int32 [L, ceil(H/512), R*T]; 0 for bf16") \
  X(uint64_t, recv_count, "dispatch: int32 [L]")                                                 \
  /* fixed by the shape, the buffer half, the transport and the grid */                          \
  X(int32_t, max_tokens, "T, num_max_dispatch_tokens_per_rank")                                  \
  X(int32_t, hidden, "H")                                                                        \
  X(int32_t, num_experts, "E")                                                                   \
  X(int32_t, half, "buffer half of the op (0 or 1)")                                             \
  X(int32_t, transport, "MEP_TRANSPORT_*")                                                       \
  X(int32_t, grid, "blocks per launch, the same on every rank (<= 0: the device's SM count)")     \
  X(uint64_t, off_dispatch_send, "byte offsets of the half's regions in the symmetric buffer")   \
  X(uint64_t, off_dispatch_recv, "")                                                             \
  X(uint64_t, off_dispatch_signals, "")                                                          \
  X(uint64_t, off_combine_send, "")                                                              \
  X(uint64_t, off_combine_recv, "")                                                              \
  X(uint64_t, off_combine_signals, "")                                                           \
  X(uint64_t, off_control, "arrival counters int64 [R][4]")                                      \
  X(uint64_t, msg_bytes, "dispatch: bytes of one token message in the send/recv regions")

/* X(name, value): the values Python mirrors (part of the layout description and its hash). */
#define MEP_OP_ARGS_CONSTANTS(X)                                                                  \
  X(MEP_FLAG_FP8, 1)                                                                             \
  X(MEP_FLAG_ROUND_SCALE, 2)                                                                     \
  X(MEP_FLAG_UE8M0, 4)                                                                           \
  X(MEP_FLAG_CACHED_OUTPUTS, 8) /* cached outputs: nothing is launched under graph capture */   \
  X(MEP_PHASE_SEND, 1)                                                                           \
  X(MEP_PHASE_RECV, 2)                                                                           \
  X(MEP_TRANSPORT_P2P, 0)                                                                        \
  X(MEP_TRANSPORT_P2P_STAGED, 1)                                                                 \
  X(MEP_TRANSPORT_PROXY, 2)                                                                      \
  X(MEP_TRANSPORT_NVSHMEM, 3) /* only in _mooncake_ep_nvshmem.so */

#define MEP_DECLARE_FIELD(type, name, doc) type name;
typedef struct MepOpArgs {
  MEP_OP_ARGS_FIELDS(MEP_DECLARE_FIELD)
} MepOpArgs;
#undef MEP_DECLARE_FIELD

#define MEP_DECLARE_CONSTANT(name, value) name = value,
enum MepOpConstants { MEP_OP_ARGS_CONSTANTS(MEP_DECLARE_CONSTANT) MEP_CONSTANTS_END_ };
#undef MEP_DECLARE_CONSTANT

#ifdef __cplusplus
#include <cstddef>
#include <cstdio>
#include <string>

namespace mooncake {
namespace ep {

/* "MepOpArgs/<size>/<align>" then ";<name>:<type>:<offset>:<size>" per field, then
 * ";#<constant>=<value>" per constant: what both sides hash (mooncake.ep._cuda.layout_description
 * builds the same string). */
inline std::string args_layout_description() {
  std::string s;
  char item[160];
  std::snprintf(item, sizeof(item), "MepOpArgs/%zu/%zu", sizeof(MepOpArgs), alignof(MepOpArgs));
  s += item;
#define MEP_DESCRIBE_FIELD(type, name, doc)                                                  \
  std::snprintf(item, sizeof(item), ";%s:%s:%zu:%zu", #name, #type, offsetof(MepOpArgs, name), \
                sizeof(static_cast<MepOpArgs*>(nullptr)->name));                             \
  s += item;
  MEP_OP_ARGS_FIELDS(MEP_DESCRIBE_FIELD)
#undef MEP_DESCRIBE_FIELD
#define MEP_DESCRIBE_CONSTANT(name, value)                                 \
  std::snprintf(item, sizeof(item), ";#%s=%d", #name, static_cast<int>(value)); \
  s += item;
  MEP_OP_ARGS_CONSTANTS(MEP_DESCRIBE_CONSTANT)
#undef MEP_DESCRIBE_CONSTANT
  return s;
}

/* FNV-1a, 64 bit, over the bytes of `s`. */
inline uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 14695981039346656037ull;
  for (unsigned char ch : s) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace ep
}  // namespace mooncake

extern "C" {
#endif

/* Exported by _mooncake_ep_cuda.so (ep_args.cc). */
uint64_t mep_args_layout_hash(void);
const char* mep_args_layout(void);

#ifdef __cplusplus
}
#endif

#endif /* MOONCAKE_EP_ARGS_H */
