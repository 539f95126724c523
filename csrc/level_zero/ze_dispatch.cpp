#include "level_zero/ze_dispatch.h"

#include <dlfcn.h>

#include <cstdio>

namespace ccl {
namespace ze {

std::string load_api(const std::string& library, Api& out) {
  // RTLD_LOCAL: the loader's symbols stay out of the global namespace. If the process already
  // loaded the same soname (SYCL's Level Zero adapter did, inside PyTorch), dlopen returns that
  // very instance, so handles from PyTorch's context are valid in our calls.
  void* lib = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* err = dlerror();
    return "no driver: " + library + " not found (" + (err ? err : "dlopen failed") + ")";
  }
  Api api;
  std::string missing;
#define CCL_ZE_RESOLVE(name, required, params)                                    \
  api.name = reinterpret_cast<name##_fn>(dlsym(lib, #name));                       \
  if (api.name == nullptr && (required)) missing += (missing.empty() ? "" : ", ") + std::string(#name);
  CCL_ZE_FUNCTIONS(CCL_ZE_RESOLVE)
#undef CCL_ZE_RESOLVE
  if (!missing.empty()) {
    // Keep the library loaded (dlclose of a loader other code may use is not worth the risk).
    return library + " lacks required Level Zero functions: " + missing +
           " (a loader older than API 1.0?)";
  }
  Dl_info info;
  api.source = library;
  if (dladdr(reinterpret_cast<void*>(api.zeInit), &info) != 0 && info.dli_fname != nullptr)
    api.source = info.dli_fname;
  out = api;
  return "";
}

std::string result_name(uint32_t code) {
  switch (code) {
#define CCL_ZE_RESULT_CASE(name, value) \
  case value:                           \
    return #name;
    CCL_ZE_RESULTS(CCL_ZE_RESULT_CASE)
    CCL_ZE_RESULTS_AFTER_1_4(CCL_ZE_RESULT_CASE)
#undef CCL_ZE_RESULT_CASE
    default:
      break;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "ZE_RESULT_0x%08x", code);
  return buf;
}

}  // namespace ze
}  // namespace ccl
