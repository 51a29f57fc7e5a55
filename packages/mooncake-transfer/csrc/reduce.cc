#include "reduce.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>

namespace mooncake::transfer {

namespace {

// Elements per block: the fold runs part by part over one block, so the accumulator stays in L1
// and every loop has a fixed trip count (-O2's vectorizer takes those without alias checks).
constexpr size_t kBlock = 2048;
// A helper thread only for at least this many bytes of output (thread start ~20-50 us).
constexpr size_t kMinBytesPerThread = 1 << 20;
constexpr int kMaxThreads = 16;

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// bfloat16 <-> float as c10::BFloat16 (round to nearest even; NaN -> quiet NaN).
inline float bf16_to_f(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }
inline uint16_t f_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  const uint32_t u = f2u(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// IEEE half <-> float, bit-exact as c10::Half (fp16_ieee_to/from_fp32_value; round to nearest even).
inline float f16_to_f(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = u2f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
  return u2f(sign | (two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized)));
}
inline uint16_t f_to_f16(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f2u(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = u2f((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f2u(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// o[i] = a[i] (op) b[i] for n elements (o may equal a); T the storage type, U the arithmetic
// type (unsigned for integers: wrapping without UB).
#define MC_INLINE __attribute__((always_inline)) inline
template <class T, class U, int Op>
MC_INLINE void step(T* o, const T* a, const T* b, size_t n) {
  // Element-wise (o is a, or apart from a and b): no dependence between iterations.
#pragma GCC ivdep
  for (size_t i = 0; i < n; ++i) {
    const T x = a[i], y = b[i];
    if constexpr (Op == kRSum) o[i] = static_cast<T>(static_cast<U>(x) + static_cast<U>(y));
    else if constexpr (Op == kRProd) o[i] = static_cast<T>(static_cast<U>(x) * static_cast<U>(y));
    else if constexpr (Op == kRMin) o[i] = y < x ? y : x;
    else if constexpr (Op == kRMax) o[i] = y > x ? y : x;
    else if constexpr (Op == kRBand) o[i] = static_cast<T>(x & y);
    else if constexpr (Op == kRBor) o[i] = static_cast<T>(x | y);
    else o[i] = static_cast<T>(x ^ y);
  }
}

// Block by block: out = p0 op p1, then out op= p2, ... while the block is in L1. When out is
// one of p1.. (read after the first step), the block accumulates in a local buffer instead.
template <class T, class U, int Op>
MC_INLINE void fold_plain(T* out, const std::vector<const T*>& parts, size_t begin, size_t end) {
  bool later_alias = false;
  for (size_t k = 1; k < parts.size(); ++k) later_alias |= parts[k] == out;
  T local[kBlock];
  for (size_t b = begin; b < end; b += kBlock) {
    const size_t n = std::min(kBlock, end - b);
    T* o = later_alias ? local : out + b;
    if (parts.size() == 1) {
      if (out + b != parts[0] + b) std::memmove(out + b, parts[0] + b, n * sizeof(T));
      continue;
    }
    const T* first = parts[0] + b;
    for (size_t k = 1; k < parts.size(); ++k) {
      if (n == kBlock) step<T, U, Op>(o, first, parts[k] + b, kBlock);  // fixed trip count
      else step<T, U, Op>(o, first, parts[k] + b, n);
      first = o;
    }
    if (later_alias) std::memcpy(out + b, local, n * sizeof(T));
  }
}

// 16-bit floats: computed in float, rounded back after every step (as torch's binary ops do).
template <bool BF, int Op>
void fold_half(uint16_t* out, const std::vector<const uint16_t*>& parts, size_t begin, size_t end) {
  float acc[kBlock];
  for (size_t b = begin; b < end; b += kBlock) {
    const size_t n = std::min(kBlock, end - b);
    const uint16_t* p0 = parts[0] + b;
    for (size_t i = 0; i < n; ++i) acc[i] = BF ? bf16_to_f(p0[i]) : f16_to_f(p0[i]);
    for (size_t k = 1; k < parts.size(); ++k) {
      const uint16_t* p = parts[k] + b;
      for (size_t i = 0; i < n; ++i) {
        const float v = BF ? bf16_to_f(p[i]) : f16_to_f(p[i]);
        const float r = Op == kRSum ? acc[i] + v : acc[i] * v;
        acc[i] = BF ? bf16_to_f(f_to_bf16(r)) : f16_to_f(f_to_f16(r));
      }
    }
    uint16_t* o = out + b;
    for (size_t i = 0; i < n; ++i) o[i] = BF ? f_to_bf16(acc[i]) : f_to_f16(acc[i]);
  }
}

using Range = void (*)(void* out, const std::vector<const void*>& parts, size_t begin, size_t end);

// The same fold compiled twice: for the baseline ISA and for AVX2 (picked at run time).
template <class T, class U, int Op>
__attribute__((target("avx2"))) void fold_avx2(T* out, const std::vector<const T*>& p, size_t b, size_t e) {
  fold_plain<T, U, Op>(out, p, b, e);
}
template <class T, class U, int Op>
void fold_base(T* out, const std::vector<const T*>& p, size_t b, size_t e) {
  fold_plain<T, U, Op>(out, p, b, e);
}

const bool g_avx2 = __builtin_cpu_supports("avx2");

template <class T, class U, int Op>
void range_plain(void* out, const std::vector<const void*>& parts, size_t begin, size_t end) {
  std::vector<const T*> p;
  p.reserve(parts.size());
  for (const void* q : parts) p.push_back(static_cast<const T*>(q));
  if (g_avx2) fold_avx2<T, U, Op>(static_cast<T*>(out), p, begin, end);
  else fold_base<T, U, Op>(static_cast<T*>(out), p, begin, end);
}

template <bool BF, int Op>
void range_half(void* out, const std::vector<const void*>& parts, size_t begin, size_t end) {
  std::vector<const uint16_t*> p;
  p.reserve(parts.size());
  for (const void* q : parts) p.push_back(static_cast<const uint16_t*>(q));
  fold_half<BF, Op>(static_cast<uint16_t*>(out), p, begin, end);
}

template <class T, class U>
Range pick_int(int op) {
  switch (op) {
    case kRSum: return range_plain<T, U, kRSum>;
    case kRProd: return range_plain<T, U, kRProd>;
    case kRMin: return range_plain<T, U, kRMin>;
    case kRMax: return range_plain<T, U, kRMax>;
    case kRBand: return range_plain<T, U, kRBand>;
    case kRBor: return range_plain<T, U, kRBor>;
    case kRBxor: return range_plain<T, U, kRBxor>;
    default: return nullptr;
  }
}

template <class T>
Range pick_float(int op) {
  switch (op) {
    case kRSum: return range_plain<T, T, kRSum>;
    case kRProd: return range_plain<T, T, kRProd>;
    default: return nullptr;
  }
}

Range pick(int dtype, int op) {
  switch (dtype) {
    case kRF32: return pick_float<float>(op);
    case kRF64: return pick_float<double>(op);
    case kRI32: return pick_int<int32_t, uint32_t>(op);
    case kRI64: return pick_int<int64_t, uint64_t>(op);
    case kRI16: return pick_int<int16_t, uint16_t>(op);
    case kRI8: return pick_int<int8_t, uint8_t>(op);
    case kRU8: return pick_int<uint8_t, uint8_t>(op);
    case kRBF16: return op == kRSum ? range_half<true, kRSum> : op == kRProd ? range_half<true, kRProd> : nullptr;
    case kRF16: return op == kRSum ? range_half<false, kRSum> : op == kRProd ? range_half<false, kRProd> : nullptr;
    default: return nullptr;
  }
}

// Runs fn(begin, end) over [0, count) split into at most `threads` pieces (the caller's thread
// takes the first); pieces are multiples of kBlock elements.
template <class Fn>
void split(size_t count, size_t elem, int threads, Fn fn) {
  const size_t by_size = (count * elem) / kMinBytesPerThread;
  size_t t = std::min<size_t>({static_cast<size_t>(std::clamp(threads, 1, kMaxThreads)), by_size, count / kBlock});
  if (t <= 1) {
    fn(size_t{0}, count);
    return;
  }
  const size_t per = ((count / t) / kBlock) * kBlock;
  std::vector<std::thread> helpers;
  helpers.reserve(t - 1);
  for (size_t i = 1; i < t; ++i) {
    const size_t b = i * per, e = i + 1 == t ? count : (i + 1) * per;
    helpers.emplace_back([=] { fn(b, e); });
  }
  fn(size_t{0}, per);
  for (auto& h : helpers) h.join();
}

}  // namespace

size_t reduce_elem_size(int dtype) {
  switch (dtype) {
    case kRF32: case kRI32: return 4;
    case kRF64: case kRI64: return 8;
    case kRBF16: case kRF16: case kRI16: return 2;
    case kRI8: case kRU8: return 1;
    default: return 0;
  }
}

const char* reduce_unsupported(int dtype, int op) {
  if (reduce_elem_size(dtype) == 0) return "is an unknown dtype code (1-9)";
  if (!pick(dtype, op)) return "is not supported with this op (floats: SUM, PRODUCT only)";
  return "";
}

void reduce_rows(int dtype, int op, size_t count, const std::vector<const void*>& parts, void* out,
                 int threads) {
  Range fn = pick(dtype, op);
  if (!fn || parts.empty() || count == 0) return;
  split(count, reduce_elem_size(dtype), threads, [&](size_t b, size_t e) { fn(out, parts, b, e); });
}

void copy_bytes(void* dst, const void* src, size_t n, int threads) {
  if (!n || dst == src) return;
  auto* d = static_cast<uint8_t*>(dst);
  const auto* s = static_cast<const uint8_t*>(src);
  if (d < s + n && s < d + n) {  // overlapping: one memmove keeps its semantics
    std::memmove(d, s, n);
    return;
  }
  split(n, 1, threads, [&](size_t b, size_t e) { std::memmove(d + b, s + b, e - b); });
}

}  // namespace mooncake::transfer
