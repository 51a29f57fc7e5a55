// The part of UCX's UCP API the ucx transport uses, declared here (no UCX headers or libraries at
// build time) and loaded with dlopen() at run time (ucx_loader.cc).
//
// UCP's parameter structs are ABI-stable by design: every struct starts with a field mask and the
// library reads only the fields whose bits are set, so declaring each struct up to the last field
// we set is enough. Offsets and constants below are those of ucp.h (checked against UCX 1.22
// headers by ucx_abi_check.cc when MOONCAKE_TRANSFER_UCX finds them at build time); they have
// not changed since UCX 1.12, the oldest version the loader accepts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

namespace mooncake::transfer::ucx {

using ucs_status_t = int;  // enum ucs_status_t (int-sized)
using ucs_status_ptr_t = void*;
using ucp_context_h = struct ucp_context*;
using ucp_config_t = struct ucp_config;
using ucp_worker_h = struct ucp_worker*;
using ucp_ep_h = struct ucp_ep*;
using ucp_mem_h = struct ucp_mem*;
using ucp_rkey_h = struct ucp_rkey*;
using ucp_address_t = struct ucp_address;

constexpr ucs_status_t UCS_OK = 0;
constexpr ucs_status_t UCS_INPROGRESS = 1;
constexpr ucs_status_t UCS_ERR_BUSY = -15;
constexpr ucs_status_t UCS_ERR_CANCELED = -16;
constexpr ucs_status_t UCS_ERR_LAST = -100;

// UCS_PTR_IS_ERR / UCS_PTR_STATUS of ucs/type/status.h.
inline bool ptr_is_err(ucs_status_ptr_t p) {
  return reinterpret_cast<uintptr_t>(p) >= static_cast<uintptr_t>(static_cast<intptr_t>(UCS_ERR_LAST));
}
inline ucs_status_t ptr_status(ucs_status_ptr_t p) {
  return static_cast<ucs_status_t>(reinterpret_cast<intptr_t>(p));
}

// ucp_params_t
constexpr uint64_t UCP_PARAM_FIELD_FEATURES = 1ull << 0;
constexpr uint64_t UCP_PARAM_FIELD_NAME = 1ull << 8;
constexpr uint64_t UCP_FEATURE_RMA = 1ull << 1;
constexpr uint64_t UCP_FEATURE_WAKEUP = 1ull << 4;
struct ucp_params_t {
  uint64_t field_mask;
  uint64_t features;
  size_t request_size;
  void* request_init;
  void* request_cleanup;
  uint64_t tag_sender_mask;
  int mt_workers_shared;
  size_t estimated_num_eps;
  size_t estimated_num_ppn;
  const char* name;
  size_t node_local_id;
  char tail[256];  // room for fields of later versions (zero, their bits never set)
};

// ucp_context_attr_t
constexpr uint64_t UCP_ATTR_FIELD_MEMORY_TYPES = 1ull << 2;
struct ucp_context_attr_t {
  uint64_t field_mask;
  size_t request_size;
  int thread_mode;
  uint64_t memory_types;  // bit i = ucs_memory_type_t i
  char tail[64];          // later fields (we never set their bits; room in case a library writes)
};

// ucp_worker_params_t
constexpr uint64_t UCP_WORKER_PARAM_FIELD_THREAD_MODE = 1ull << 0;
constexpr int UCS_THREAD_MODE_SERIALIZED = 1;
struct ucp_worker_params_t {
  uint64_t field_mask;
  int thread_mode;
  char tail[512];
};

// ucp_ep_params_t
using ucp_err_handler_cb_t = void (*)(void* arg, ucp_ep_h ep, ucs_status_t status);
constexpr uint64_t UCP_EP_PARAM_FIELD_REMOTE_ADDRESS = 1ull << 0;
constexpr uint64_t UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE = 1ull << 1;
constexpr uint64_t UCP_EP_PARAM_FIELD_ERR_HANDLER = 1ull << 2;
constexpr int UCP_ERR_HANDLING_MODE_PEER = 1;
struct ucp_ep_params_t {
  uint64_t field_mask;
  const ucp_address_t* address;
  int err_mode;
  struct {
    ucp_err_handler_cb_t cb;
    void* arg;
  } err_handler;
  void* user_data;
  unsigned flags;
  char tail[256];
};

// ucp_mem_map_params_t
constexpr uint64_t UCP_MEM_MAP_PARAM_FIELD_ADDRESS = 1ull << 0;
constexpr uint64_t UCP_MEM_MAP_PARAM_FIELD_LENGTH = 1ull << 1;
constexpr uint64_t UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE = 1ull << 4;
constexpr int UCS_MEMORY_TYPE_HOST = 0;
constexpr int UCS_MEMORY_TYPE_CUDA = 1;
struct ucp_mem_map_params_t {
  uint64_t field_mask;
  void* address;
  size_t length;
  unsigned flags;
  unsigned prot;
  int memory_type;
  char tail[256];
};

// ucp_request_param_t
using ucp_send_nbx_callback_t = void (*)(void* request, ucs_status_t status, void* user_data);
constexpr uint32_t UCP_OP_ATTR_FIELD_CALLBACK = 1u << 1;
constexpr uint32_t UCP_OP_ATTR_FIELD_USER_DATA = 1u << 2;
constexpr uint32_t UCP_OP_ATTR_FIELD_FLAGS = 1u << 4;
constexpr uint32_t UCP_OP_ATTR_FIELD_MEMORY_TYPE = 1u << 6;
constexpr uint32_t UCP_EP_CLOSE_FLAG_FORCE = 1u << 0;
struct ucp_request_param_t {
  uint32_t op_attr_mask;
  uint32_t flags;
  void* request;
  ucp_send_nbx_callback_t send_cb;  // union cb
  uint64_t datatype;
  void* user_data;
  void* reply_buffer;
  int memory_type;
  char tail[256];
};

// The loaded library: every pointer is set when load() succeeded.
struct Lib {
  void (*get_version)(unsigned*, unsigned*, unsigned*);
  ucs_status_t (*config_read)(const char*, const char*, ucp_config_t**);
  void (*config_release)(ucp_config_t*);
  ucs_status_t (*config_modify)(ucp_config_t*, const char*, const char*);
  ucs_status_t (*init_version)(unsigned, unsigned, const ucp_params_t*, const ucp_config_t*, ucp_context_h*);
  void (*cleanup)(ucp_context_h);
  ucs_status_t (*context_query)(ucp_context_h, ucp_context_attr_t*);
  void (*context_print_info)(ucp_context_h, FILE*);
  ucs_status_t (*worker_create)(ucp_context_h, const ucp_worker_params_t*, ucp_worker_h*);
  void (*worker_destroy)(ucp_worker_h);
  ucs_status_t (*worker_get_address)(ucp_worker_h, ucp_address_t**, size_t*);
  void (*worker_release_address)(ucp_worker_h, ucp_address_t*);
  unsigned (*worker_progress)(ucp_worker_h);
  ucs_status_t (*worker_get_efd)(ucp_worker_h, int*);
  ucs_status_t (*worker_arm)(ucp_worker_h);
  ucs_status_t (*ep_create)(ucp_worker_h, const ucp_ep_params_t*, ucp_ep_h*);
  ucs_status_ptr_t (*ep_close_nbx)(ucp_ep_h, const ucp_request_param_t*);
  ucs_status_ptr_t (*ep_flush_nbx)(ucp_ep_h, const ucp_request_param_t*);
  ucs_status_t (*mem_map)(ucp_context_h, const ucp_mem_map_params_t*, ucp_mem_h*);
  ucs_status_t (*mem_unmap)(ucp_context_h, ucp_mem_h);
  ucs_status_t (*rkey_pack)(ucp_context_h, ucp_mem_h, void**, size_t*);
  void (*rkey_buffer_release)(void*);
  ucs_status_t (*ep_rkey_unpack)(ucp_ep_h, const void*, ucp_rkey_h*);
  void (*rkey_destroy)(ucp_rkey_h);
  ucs_status_ptr_t (*put_nbx)(ucp_ep_h, const void*, size_t, uint64_t, ucp_rkey_h, const ucp_request_param_t*);
  ucs_status_ptr_t (*get_nbx)(ucp_ep_h, void*, size_t, uint64_t, ucp_rkey_h, const ucp_request_param_t*);
  ucs_status_t (*request_check_status)(void*);
  void (*request_free)(void*);
  const char* (*status_string)(ucs_status_t);

  std::string path;     // the libucp file that was loaded
  std::string version;  // "1.22.0"

  std::string err(ucs_status_t s) const {
    const char* t = status_string ? status_string(s) : nullptr;
    return std::string(t ? t : "?") + " (" + std::to_string(s) + ")";
  }
};

// Loads libucp once per process. Search order: `lib_dir` (the libucx wheel's lib folder or
// MOONCAKE_UCX_LIB_DIR, resolved by the Python layer), then the dynamic loader's search path
// (libucp.so.0). Returns null and sets `why` (naming what is missing) when UCX cannot be used; the
// result of the first call that got a library is kept for the process.
const Lib* load(const std::string& lib_dir, std::string& why);

}  // namespace mooncake::transfer::ucx
