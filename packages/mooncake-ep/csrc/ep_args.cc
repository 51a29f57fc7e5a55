// The layout of MepOpArgs as this build compiled it (plain C++, no CUDA): Python's loader
// (mooncake.ep._cuda.load) compares mep_args_layout_hash() with the hash of its ctypes mirror and
// refuses the library when they differ; mep_args_layout() is the description hashed, for the error.
#include "ep_args.h"

#include <string>
#include <type_traits>

static_assert(std::is_standard_layout<MepOpArgs>::value && std::is_trivially_copyable<MepOpArgs>::value,
              "MepOpArgs crosses a C ABI: plain data only");

namespace {

const std::string& description() {
  static const std::string text = mooncake::ep::args_layout_description();
  return text;
}

}  // namespace

extern "C" {

uint64_t mep_args_layout_hash(void) {
  static const uint64_t hash = mooncake::ep::fnv1a64(description());
  return hash;
}

const char* mep_args_layout(void) { return description().c_str(); }

}  // extern "C"
