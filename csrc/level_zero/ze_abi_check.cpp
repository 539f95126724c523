// Consistency of our Level Zero declarations (ze_types.h, ze_dispatch.h) with the real ze_api.h.
//
// Compiled into ccl._C on every build: when <level_zero/ze_api.h> is on the include path (Debian
// and Ubuntu: `apt-get install libze-dev`; oneAPI), every enum value, flag bit, struct size and
// alignment, field offset and function prototype we declared is static_assert'ed against it, so
// a mismatch fails the build. Without the header this file only records that nothing was checked
// (ccl._C.level_zero.header_check() says which). tests/test_level_zero.py also compiles this file
// alone with -DCCL_ZE_REQUIRE_HEADER where the header exists, so CI on a machine with libze-dev
// checks it even if the extension was built elsewhere.
//
// -DCCL_ZE_NO_SYSTEM_HEADER skips the header (to test the header-less build on a machine that
// has it).
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "level_zero/ze_dispatch.h"

#if defined(__has_include) && !defined(CCL_ZE_NO_SYSTEM_HEADER)
#if __has_include(<level_zero/ze_api.h>)
#include <level_zero/ze_api.h>
#endif
#endif

// The checks need API 1.4 (ZE_experimental_fabric is its marker macro); older headers lack
// result codes and extensions declared here.
#if defined(_ZE_API_H) && defined(ZE_FABRIC_EXP_NAME)
#define CCL_ZE_HEADER_CHECKED 1
#endif

#if defined(CCL_ZE_REQUIRE_HEADER) && !defined(CCL_ZE_HEADER_CHECKED)
#error "CCL_ZE_REQUIRE_HEADER: <level_zero/ze_api.h> (API >= 1.4) was not found or is too old"
#endif

#ifdef CCL_ZE_HEADER_CHECKED
namespace {
namespace ours = ccl::ze;

// Enum values and flag bits.
#define CCL_CHECK_VALUE(name, value)                                                     \
  static_assert(static_cast<uint32_t>(ours::name) == static_cast<uint32_t>(::name) &&   \
                    static_cast<uint32_t>(ours::name) == static_cast<uint32_t>(value), \
                #name " differs from ze_api.h");
CCL_ZE_RESULTS(CCL_CHECK_VALUE)
CCL_ZE_STYPES(CCL_CHECK_VALUE)
#ifdef ZE_RTAS_BUILDER_EXP_NAME
CCL_CHECK_VALUE(ZE_RESULT_EXP_RTAS_BUILD_RETRY, 0x7ff00005)
CCL_CHECK_VALUE(ZE_RESULT_EXP_RTAS_BUILD_DEFERRED, 0x7ff00006)
#endif
#undef CCL_CHECK_VALUE

#define CCL_CHECK_FLAG(name, bit)                                                          \
  static_assert(ours::name == static_cast<uint32_t>(::name), #name " differs from ze_api.h");
CCL_ZE_FLAGS(CCL_CHECK_FLAG)
#undef CCL_CHECK_FLAG

static_assert(static_cast<uint32_t>(ours::ZE_DEVICE_TYPE_GPU) == ::ZE_DEVICE_TYPE_GPU, "device type");
static_assert(static_cast<uint32_t>(ours::ZE_MEMORY_TYPE_DEVICE) == ::ZE_MEMORY_TYPE_DEVICE, "memory type");
static_assert(static_cast<uint32_t>(ours::ZE_COMMAND_QUEUE_MODE_ASYNCHRONOUS) ==
                  ::ZE_COMMAND_QUEUE_MODE_ASYNCHRONOUS,
              "queue mode");
static_assert(static_cast<uint32_t>(ours::ZE_COMMAND_QUEUE_PRIORITY_NORMAL) ==
                  ::ZE_COMMAND_QUEUE_PRIORITY_NORMAL,
              "queue priority");
static_assert(sizeof(ours::ze_result_t) == sizeof(::ze_result_t), "ze_result_t size");
static_assert(sizeof(ours::ze_structure_type_t) == sizeof(::ze_structure_type_t), "stype size");
static_assert(sizeof(ours::ze_bool_t) == sizeof(::ze_bool_t), "ze_bool_t size");

// Struct layouts: size, alignment, the offset of every field we touch.
#define CCL_CHECK_STRUCT(name, st)                                                        \
  static_assert(sizeof(ours::name) == sizeof(::name), #name ": size differs from ze_api.h"); \
  static_assert(alignof(ours::name) == alignof(::name), #name ": alignment differs");       \
  static_assert(offsetof(ours::name, stype) == offsetof(::name, stype), #name ".stype");    \
  static_assert(offsetof(ours::name, pNext) == offsetof(::name, pNext), #name ".pNext");
CCL_ZE_STRUCTS(CCL_CHECK_STRUCT)
#undef CCL_CHECK_STRUCT
#define CCL_CHECK_FIELD(name, field)                                              \
  static_assert(offsetof(ours::name, field) == offsetof(::name, field) &&         \
                    sizeof(ours::name::field) == sizeof(::name::field),           \
                #name "." #field ": offset or size differs from ze_api.h");
CCL_ZE_FIELDS(CCL_CHECK_FIELD)
#undef CCL_CHECK_FIELD

// Function prototypes: map each of our types to the header's and compare the pointer types.
template <class T>
struct Real {
  using type = T;
};
template <class T>
struct Real<T*> {
  using type = typename Real<T>::type*;
};
template <class T>
struct Real<const T> {
  using type = const typename Real<T>::type;
};
template <class R, class... A>
struct Real<R (*)(A...)> {
  using type = typename Real<R>::type (*)(typename Real<A>::type...);
};
#define CCL_REAL(name)       \
  template <>                \
  struct Real<ours::name> {  \
    using type = ::name;     \
  };
#define CCL_REAL_STRUCT(name, st) CCL_REAL(name)
CCL_ZE_STRUCTS(CCL_REAL_STRUCT)
CCL_REAL(ze_result_t)
CCL_REAL(ze_structure_type_t)
CCL_REAL(ze_api_version_t)
#undef CCL_REAL_STRUCT
#undef CCL_REAL

#define CCL_CHECK_FN(name, required, params)                                                \
  static_assert(std::is_same<Real<ours::name##_fn>::type, decltype(&::name)>::value,        \
                #name ": our prototype differs from ze_api.h");
CCL_ZE_FUNCTIONS(CCL_CHECK_FN)
#undef CCL_CHECK_FN

}  // namespace
#endif  // CCL_ZE_HEADER_CHECKED

namespace ccl {
namespace ze {

// Whether this build checked our declarations against a real ze_api.h, and its API version.
std::string header_check() {
#ifdef CCL_ZE_HEADER_CHECKED
  return std::to_string(ZE_MAJOR_VERSION(ZE_API_VERSION_CURRENT)) + "." +
         std::to_string(ZE_MINOR_VERSION(ZE_API_VERSION_CURRENT));
#else
  return "";
#endif
}

}  // namespace ze
}  // namespace ccl
