// Compiles the CPU kernel header named by FUSEDRES_CPU_KERNELS twice, for the baseline ISA and
// for AVX2+FMA+F16C, into namespaces `baseline` and `avx2`, and picks one per call at run time:
// one binary is fast on current x86 CPUs and still runs on old ones (and on other architectures).
// Include once per .cpp, after the types the kernels use are declared. Each build first gets the
// block conversions of cpu/vec_convert.h (FUSEDRES_CPU_AVX2 says which intrinsics it may use).
#ifndef FUSEDRES_CPU_KERNELS
#error "define FUSEDRES_CPU_KERNELS before including cpu/isa_dispatch.h"
#endif

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define FUSEDRES_CPU_ISA baseline
#define FUSEDRES_CPU_AVX2 0
#include "cpu/vec_convert.h"
#include FUSEDRES_CPU_KERNELS
#undef FUSEDRES_CPU_AVX2
#undef FUSEDRES_CPU_ISA

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FUSEDRES_CPU_ISA avx2
#define FUSEDRES_CPU_AVX2 1
#include "cpu/vec_convert.h"
#include FUSEDRES_CPU_KERNELS
#undef FUSEDRES_CPU_AVX2
#undef FUSEDRES_CPU_ISA
#pragma GCC pop_options

#include <cstdlib>

namespace fusedres::cpu {
// FUSEDRES_CPU_ISA=baseline in the environment picks the baseline build on any CPU (read once per
// process): the tests run the baseline kernels that way on AVX2 machines.
inline bool cpu_has_avx2() {
  static const bool has = [] {
    const char* forced = std::getenv("FUSEDRES_CPU_ISA");
    return !(forced != nullptr && std::strcmp(forced, "baseline") == 0) && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return has;
}
}  // namespace fusedres::cpu

// FUSEDRES_ISA_CALL(kernel<T>(args...)) calls the AVX2 build of `kernel` when the CPU has it.
#define FUSEDRES_ISA_CALL(...) (::fusedres::cpu::cpu_has_avx2() ? avx2::__VA_ARGS__ : baseline::__VA_ARGS__)
#else
#define FUSEDRES_ISA_CALL(...) (baseline::__VA_ARGS__)
#endif
