// OpenBLAS, loaded at first use with the kernels chosen for the CPU (blas.hpp says why).
#include "blas.hpp"

#include <softce/softce.hpp>

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <string>

namespace softce::detail::blas {
namespace {

// cblas.h's values (the header is not needed for six enum constants)
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

using sgemm_fn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                          int);
using dgemm_fn = void (*)(int, int, int, int, int, int, double, const double*, int, const double*, int, double,
                          double*, int);

struct library {
  void* handle = nullptr;
  sgemm_fn sgemm = nullptr;
  dgemm_fn dgemm = nullptr;
  void (*set_threads)(int) = nullptr;
  int (*get_threads)() = nullptr;
  char* (*corename)() = nullptr;
  char* (*config)() = nullptr;
  std::string path, error;
};

// The OpenMP build first (its threads are the OpenMP team), then the default one.
#ifndef SOFTCE_OPENBLAS_OPENMP
#define SOFTCE_OPENBLAS_OPENMP "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0"
#endif
constexpr const char* kCandidates[] = {SOFTCE_OPENBLAS_OPENMP, "libopenblas.so.0"};

template <class F>
F symbol(void* handle, const char* name) {
  return reinterpret_cast<F>(dlsym(handle, name));
}

library load() {
  library lib;
  // already in the process (the application linked it): use it as it is
  lib.handle = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  if (lib.handle) {
    lib.path = "libopenblas.so.0 (loaded by the application)";
  } else {
    const std::string core = core_for_this_cpu();
    const bool set_core = !core.empty() && std::getenv("OPENBLAS_CORETYPE") == nullptr;
    if (set_core) setenv("OPENBLAS_CORETYPE", core.c_str(), 0);
    for (const char* candidate : kCandidates) {
      lib.handle = dlopen(candidate, RTLD_NOW | RTLD_LOCAL);
      if (lib.handle) {
        lib.path = candidate;
        break;
      }
      const char* why = dlerror();
      lib.error += std::string(lib.error.empty() ? "" : "; ") + (why ? why : candidate);
    }
    if (set_core) unsetenv("OPENBLAS_CORETYPE");
  }
  if (!lib.handle) return lib;
  lib.sgemm = symbol<sgemm_fn>(lib.handle, "cblas_sgemm");
  lib.dgemm = symbol<dgemm_fn>(lib.handle, "cblas_dgemm");
  lib.set_threads = symbol<void (*)(int)>(lib.handle, "openblas_set_num_threads");
  lib.get_threads = symbol<int (*)()>(lib.handle, "openblas_get_num_threads");
  lib.corename = symbol<char* (*)()>(lib.handle, "openblas_get_corename");
  lib.config = symbol<char* (*)()>(lib.handle, "openblas_get_config");
  if (!lib.sgemm || !lib.dgemm || !lib.set_threads || !lib.get_threads) {
    lib.error = lib.path + " lacks cblas_sgemm / cblas_dgemm / openblas_set_num_threads";
    lib.handle = nullptr;
  }
  return lib;
}

const library& get(std::string_view function) {
  static std::once_flag once;
  static library lib;
  std::call_once(once, [] { lib = load(); });
  if (!lib.handle)
    throw error(std::string(function) + ": the BLAS could not be loaded (OpenBLAS, libopenblas.so.0: " + lib.error +
                "); install OpenBLAS (Debian: libopenblas0)");
  return lib;
}

int trans(bool t) { return t ? kTrans : kNoTrans; }

}  // namespace

std::string core_for_this_cpu() {
  __builtin_cpu_init();
  // The AVX-512 kernels need F, VL, BW and DQ (Skylake-SP and later, Zen 4).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return "SkylakeX";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
  return "";
}

void sgemm(std::string_view function, bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A,
           int lda, const float* B, int ldb, float beta, float* C, int ldc) {
  get(function).sgemm(kRowMajor, trans(trans_a), trans(trans_b), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void dgemm(std::string_view function, bool trans_a, bool trans_b, int M, int N, int K, double alpha, const double* A,
           int lda, const double* B, int ldb, double beta, double* C, int ldc) {
  get(function).dgemm(kRowMajor, trans(trans_a), trans(trans_b), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

int get_num_threads(std::string_view function) { return get(function).get_threads(); }

void set_num_threads(std::string_view function, int threads) { get(function).set_threads(threads); }

std::string describe(std::string_view function) {
  const library& lib = get(function);
  std::string text = lib.config ? lib.config() : "OpenBLAS";
  if (lib.corename && text.find(lib.corename()) == std::string::npos) text += std::string(" ") + lib.corename();
  return text + " from " + lib.path;
}

}  // namespace softce::detail::blas
