// Compiles the CPU kernel header named by FUSEDRES_CPU_KERNELS twice, for the baseline ISA and
// for AVX2+FMA+F16C, into namespaces `baseline` and `avx2`, and picks one per call at run time:
// one binary is fast on current x86 CPUs and still runs on old ones (and on other architectures).
// Include once per .cpp, after the types the kernels use are declared.
#ifndef FUSEDRES_CPU_KERNELS
#error "define FUSEDRES_CPU_KERNELS before including cpu/isa_dispatch.h"
#endif

#define FUSEDRES_CPU_ISA baseline
#include FUSEDRES_CPU_KERNELS
#undef FUSEDRES_CPU_ISA

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FUSEDRES_CPU_ISA avx2
#include FUSEDRES_CPU_KERNELS
#undef FUSEDRES_CPU_ISA
#pragma GCC pop_options

namespace fusedres::cpu {
inline bool cpu_has_avx2() {
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
}
} // namespace fusedres::cpu

// FUSEDRES_ISA_CALL(kernel<T>(args...)) calls the AVX2 build of `kernel` when the CPU has it.
#define FUSEDRES_ISA_CALL(...) (::fusedres::cpu::cpu_has_avx2() ? avx2::__VA_ARGS__ : baseline::__VA_ARGS__)
#else
#define FUSEDRES_ISA_CALL(...) (baseline::__VA_ARGS__)
#endif
