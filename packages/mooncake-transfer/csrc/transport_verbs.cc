// RDMA verbs transport stub. libibverbs is loaded with dlopen() at run time, so neither the build
// nor the run needs rdma-core. Only device discovery is implemented: there is no RDMA device on
// any machine this package is developed on, so the data path could not be written and tested.
#include <dlfcn.h>

#include "engine.h"

namespace mooncake::transfer {

namespace {
// The three entry points we use, declared here instead of including <infiniband/verbs.h>.
struct ibv_device;
using get_device_list_fn = ibv_device** (*)(int*);
using free_device_list_fn = void (*)(ibv_device**);
using get_device_name_fn = const char* (*)(ibv_device*);
}  // namespace

std::string VerbsTransport::probe(std::string* devices) {
  void* h = dlopen("libibverbs.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* e = dlerror();
    return std::string("no RDMA device: libibverbs.so.1 cannot be loaded (") + (e ? e : "?") + ")";
  }
  auto get_list = reinterpret_cast<get_device_list_fn>(dlsym(h, "ibv_get_device_list"));
  auto free_list = reinterpret_cast<free_device_list_fn>(dlsym(h, "ibv_free_device_list"));
  auto get_name = reinterpret_cast<get_device_name_fn>(dlsym(h, "ibv_get_device_name"));
  if (!get_list || !free_list || !get_name) {
    dlclose(h);
    return "no RDMA device: libibverbs.so.1 lacks the device list API";
  }
  int n = 0;
  ibv_device** list = get_list(&n);
  std::string names;
  for (int i = 0; list && i < n; ++i) names += std::string(i ? "," : "") + get_name(list[i]);
  if (list) free_list(list);
  dlclose(h);
  if (devices) *devices = names;
  if (n <= 0) return "no RDMA device (libibverbs loaded, 0 devices)";
  return "RDMA device(s) " + names + " found, but this build has no verbs data path (use tcp)";
}

void VerbsTransport::post(const Op& op, const std::shared_ptr<Batch>& b) {
  b->complete_err(ErrorInfo{ErrKind::kGeneric, op.seg->peer->name, "rdma transport: " + probe()});
}

}  // namespace mooncake::transfer
