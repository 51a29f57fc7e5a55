// Element-wise reductions and copies over raw pointers, on threads this library controls (the
// caller's thread, plus at most `threads - 1` short-lived helpers for large buffers). Used by
// exchange_round's fold and by the module-level reduce()/copy() the collectives call, so a
// backend's speed never depends on the caller's torch/OpenMP thread settings.
//
// Results are bit-identical to torch's CPU binary ops applied as a left fold in part order
// (torch.add / mul / bitwise_* with out=, then add_/mul_ ...): no reassociation, no FMA,
// integers wrap as two's complement, bf16/f16 round to nearest even after every step (torch
// computes them in float and rounds each result). Float MIN/MAX and AVG are not offered (torch's
// NaN and signed-zero rules, and its scalar division, differ between its code paths).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace mooncake::transfer {

enum ReduceDtype : int {
  kRF32 = 1,
  kRF64 = 2,
  kRI32 = 3,
  kRI64 = 4,
  kRBF16 = 5,
  kRF16 = 6,
  kRI8 = 7,
  kRU8 = 8,
  kRI16 = 9,
};
enum ReduceOp : int { kRSum = 1, kRProd = 2, kRMin = 3, kRMax = 4, kRBand = 5, kRBor = 6, kRBxor = 7 };

// Bytes per element of a dtype code; 0 for an unknown code.
size_t reduce_elem_size(int dtype);
// Empty when (dtype, op) is supported, else a phrase saying why not.
const char* reduce_unsupported(int dtype, int op);
// out[i] = parts[0][i] (op) parts[1][i] (op) ... for i < count, in part order. `out` may be one
// of the parts, exactly (never a shifted overlap). Splits across `threads` (>= 1, capped at 16,
// at least 1 MiB of output each) when the buffer is large.
void reduce_rows(int dtype, int op, size_t count, const std::vector<const void*>& parts, void* out,
                 int threads = 1);
// memmove; non-overlapping buffers of at least 2 MiB are split across up to `threads` threads.
void copy_bytes(void* dst, const void* src, size_t n, int threads = 1);

}  // namespace mooncake::transfer
