// Build-time check (compiled only when UCX's headers are found, see CMakeLists.txt): the
// declarations of ucx_api.h match ucp.h. Produces no code.
#include <ucp/api/ucp.h>

#include <cstddef>

#include "ucx_api.h"

namespace ux = mooncake::transfer::ucx;

#define MC_SAME_FIELD(ours, theirs, field)                                                   \
  static_assert(offsetof(ux::ours, field) == offsetof(theirs, field), #ours "." #field " offset"); \
  static_assert(sizeof(ux::ours::field) == sizeof(theirs::field), #ours "." #field " size")
#define MC_SAME_VALUE(name) static_assert(static_cast<long long>(ux::name) == static_cast<long long>(::name), #name)

MC_SAME_FIELD(ucp_params_t, ucp_params_t, field_mask);
MC_SAME_FIELD(ucp_params_t, ucp_params_t, features);
MC_SAME_FIELD(ucp_params_t, ucp_params_t, name);
MC_SAME_FIELD(ucp_context_attr_t, ucp_context_attr_t, field_mask);
MC_SAME_FIELD(ucp_context_attr_t, ucp_context_attr_t, memory_types);
MC_SAME_FIELD(ucp_worker_params_t, ucp_worker_params_t, field_mask);
MC_SAME_FIELD(ucp_worker_params_t, ucp_worker_params_t, thread_mode);
MC_SAME_FIELD(ucp_ep_params_t, ucp_ep_params_t, field_mask);
MC_SAME_FIELD(ucp_ep_params_t, ucp_ep_params_t, address);
MC_SAME_FIELD(ucp_ep_params_t, ucp_ep_params_t, err_mode);
MC_SAME_FIELD(ucp_ep_params_t, ucp_ep_params_t, err_handler);
MC_SAME_FIELD(ucp_mem_map_params_t, ucp_mem_map_params_t, field_mask);
MC_SAME_FIELD(ucp_mem_map_params_t, ucp_mem_map_params_t, address);
MC_SAME_FIELD(ucp_mem_map_params_t, ucp_mem_map_params_t, length);
MC_SAME_FIELD(ucp_mem_map_params_t, ucp_mem_map_params_t, memory_type);
MC_SAME_FIELD(ucp_request_param_t, ucp_request_param_t, op_attr_mask);
MC_SAME_FIELD(ucp_request_param_t, ucp_request_param_t, flags);
MC_SAME_FIELD(ucp_request_param_t, ucp_request_param_t, user_data);
MC_SAME_FIELD(ucp_request_param_t, ucp_request_param_t, memory_type);
static_assert(offsetof(ux::ucp_request_param_t, send_cb) == offsetof(::ucp_request_param_t, cb), "cb offset");
static_assert(offsetof(ux::ucp_ep_params_t, err_handler.arg) == offsetof(::ucp_ep_params_t, err_handler.arg), "arg");
static_assert(sizeof(ux::ucp_params_t) >= sizeof(::ucp_params_t), "ucp_params_t size");
static_assert(sizeof(ux::ucp_context_attr_t) >= sizeof(::ucp_context_attr_t), "ucp_context_attr_t size");
static_assert(sizeof(ux::ucp_worker_params_t) >= sizeof(::ucp_worker_params_t), "ucp_worker_params_t size");
static_assert(sizeof(ux::ucp_ep_params_t) >= sizeof(::ucp_ep_params_t), "ucp_ep_params_t size");
static_assert(sizeof(ux::ucp_mem_map_params_t) >= sizeof(::ucp_mem_map_params_t), "ucp_mem_map_params_t size");
static_assert(sizeof(ux::ucp_request_param_t) >= sizeof(::ucp_request_param_t), "ucp_request_param_t size");

MC_SAME_VALUE(UCS_OK);
MC_SAME_VALUE(UCS_INPROGRESS);
MC_SAME_VALUE(UCS_ERR_BUSY);
MC_SAME_VALUE(UCS_ERR_CANCELED);
MC_SAME_VALUE(UCS_ERR_LAST);
MC_SAME_VALUE(UCP_PARAM_FIELD_FEATURES);
MC_SAME_VALUE(UCP_PARAM_FIELD_NAME);
MC_SAME_VALUE(UCP_FEATURE_RMA);
MC_SAME_VALUE(UCP_FEATURE_WAKEUP);
MC_SAME_VALUE(UCP_ATTR_FIELD_MEMORY_TYPES);
MC_SAME_VALUE(UCP_WORKER_PARAM_FIELD_THREAD_MODE);
MC_SAME_VALUE(UCS_THREAD_MODE_SERIALIZED);
MC_SAME_VALUE(UCP_EP_PARAM_FIELD_REMOTE_ADDRESS);
MC_SAME_VALUE(UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE);
MC_SAME_VALUE(UCP_EP_PARAM_FIELD_ERR_HANDLER);
MC_SAME_VALUE(UCP_ERR_HANDLING_MODE_PEER);
MC_SAME_VALUE(UCP_MEM_MAP_PARAM_FIELD_ADDRESS);
MC_SAME_VALUE(UCP_MEM_MAP_PARAM_FIELD_LENGTH);
MC_SAME_VALUE(UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE);
MC_SAME_VALUE(UCS_MEMORY_TYPE_HOST);
MC_SAME_VALUE(UCS_MEMORY_TYPE_CUDA);
MC_SAME_VALUE(UCP_OP_ATTR_FIELD_CALLBACK);
MC_SAME_VALUE(UCP_OP_ATTR_FIELD_USER_DATA);
MC_SAME_VALUE(UCP_OP_ATTR_FIELD_FLAGS);
MC_SAME_VALUE(UCP_OP_ATTR_FIELD_MEMORY_TYPE);
MC_SAME_VALUE(UCP_EP_CLOSE_FLAG_FORCE);
