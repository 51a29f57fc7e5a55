// Run-time loader of UCX's libucp (see ucx_api.h): no build-time dependency on UCX.
#include <dlfcn.h>

#include <mutex>

#include "ucx_api.h"

namespace mooncake::transfer::ucx {

namespace {

std::mutex g_mu;
Lib g_lib;
bool g_loaded = false;

template <typename F>
bool sym(void* h, const char* name, F& out, std::string& missing) {
  out = reinterpret_cast<F>(dlsym(h, name));
  if (!out) missing += std::string(missing.empty() ? "" : ", ") + name;
  return out != nullptr;
}

}  // namespace

const Lib* load(const std::string& lib_dir, std::string& why) {
  std::lock_guard<std::mutex> g(g_mu);
  if (g_loaded) return &g_lib;
  std::string tried;
  void* h = nullptr;
  std::string path;
  if (!lib_dir.empty()) {
    path = lib_dir + "/libucp.so.0";
    h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      const char* e = dlerror();
      tried = std::string(e ? e : (path + ": cannot be loaded").c_str()) + "; ";
    }
  }
  if (!h) {
    path = "libucp.so.0";
    h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      const char* e = dlerror();
      tried += std::string(e ? e : "libucp.so.0: not found") + " (loader search path)";
      why = "UCX is not available: libucp cannot be loaded (" + tried +
            "); install the UCX wheel (pip install libucx-cu12) or set MOONCAKE_UCX_LIB_DIR to a folder "
            "holding libucp.so.0";
      return nullptr;
    }
  }
  Lib l{};
  std::string missing;
  sym(h, "ucp_get_version", l.get_version, missing);
  sym(h, "ucp_config_read", l.config_read, missing);
  sym(h, "ucp_config_release", l.config_release, missing);
  sym(h, "ucp_config_modify", l.config_modify, missing);
  sym(h, "ucp_init_version", l.init_version, missing);
  sym(h, "ucp_cleanup", l.cleanup, missing);
  sym(h, "ucp_context_query", l.context_query, missing);
  sym(h, "ucp_context_print_info", l.context_print_info, missing);
  sym(h, "ucp_worker_create", l.worker_create, missing);
  sym(h, "ucp_worker_destroy", l.worker_destroy, missing);
  sym(h, "ucp_worker_get_address", l.worker_get_address, missing);
  sym(h, "ucp_worker_release_address", l.worker_release_address, missing);
  sym(h, "ucp_worker_progress", l.worker_progress, missing);
  sym(h, "ucp_worker_get_efd", l.worker_get_efd, missing);
  sym(h, "ucp_worker_arm", l.worker_arm, missing);
  sym(h, "ucp_ep_create", l.ep_create, missing);
  sym(h, "ucp_ep_close_nbx", l.ep_close_nbx, missing);
  sym(h, "ucp_ep_flush_nbx", l.ep_flush_nbx, missing);
  sym(h, "ucp_mem_map", l.mem_map, missing);
  sym(h, "ucp_mem_unmap", l.mem_unmap, missing);
  sym(h, "ucp_rkey_pack", l.rkey_pack, missing);
  sym(h, "ucp_rkey_buffer_release", l.rkey_buffer_release, missing);
  sym(h, "ucp_ep_rkey_unpack", l.ep_rkey_unpack, missing);
  sym(h, "ucp_rkey_destroy", l.rkey_destroy, missing);
  sym(h, "ucp_put_nbx", l.put_nbx, missing);
  sym(h, "ucp_get_nbx", l.get_nbx, missing);
  sym(h, "ucp_request_check_status", l.request_check_status, missing);
  sym(h, "ucp_request_free", l.request_free, missing);
  sym(h, "ucs_status_string", l.status_string, missing);  // libucs, a dependency of libucp
  if (!missing.empty()) {
    dlclose(h);
    why = "UCX at " + path + " is too old or incomplete (missing " + missing + "; UCX >= 1.12 needed)";
    return nullptr;
  }
  unsigned major = 0, minor = 0, release = 0;
  l.get_version(&major, &minor, &release);
  l.version = std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(release);
  if (major < 1 || (major == 1 && minor < 12)) {
    dlclose(h);
    why = "UCX at " + path + " is version " + l.version + "; UCX >= 1.12 needed";
    return nullptr;
  }
  Dl_info info{};
  l.path = (dladdr(reinterpret_cast<void*>(l.init_version), &info) && info.dli_fname) ? info.dli_fname : path;
  g_lib = l;
  g_loaded = true;  // never dlclose()d: UCX keeps threads and handlers for the process's life
  return &g_lib;
}

}  // namespace mooncake::transfer::ucx
