// OpenMP plumbing shared by the CPU kernels.
//
// - LOCOPROP_CLONES: compile a hot loop three times (AVX-512, AVX2+FMA, baseline x86-64) and
//   pick the best at load time (GCC/Clang function multiversioning), so one build is fast on
//   this machine and still runs on an older one. Elsewhere it expands to nothing.
// - kParallelMin: below this many elements a kernel runs on the calling thread; forking the
//   OpenMP team costs a few microseconds, more than the work on a small layer.
#pragma once

#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define LOCOPROP_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LOCOPROP_CLONES
#endif

namespace locoprop::cpu {

constexpr int64_t kParallelMin = 1 << 15;

inline bool built_with_openmp() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace locoprop::cpu
