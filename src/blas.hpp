// The BLAS of softce (the GEMMs of the fused output layer and of the softce program):
// OpenBLAS, loaded at its first use rather than linked.
//
// Why loaded: OpenBLAS picks its kernels for the CPU once, when the library is loaded, from
// its own table of CPU models, and the Debian build (0.3.21, DYNAMIC_ARCH) does not know
// recent ones: on an Intel Xeon with AVX-512 (a KVM guest, "Intel(R) Xeon(R) Processor") it
// picks "Prescott" (SSE3) kernels, 6.5x slower than its SkylakeX ones (sgemm 512 x 1024 x
// 32000 at 2 threads: 33 against 215 GFLOP/s). The only way to choose them is the
// OPENBLAS_CORETYPE environment variable, read in the library's constructor, so softce
// sets it from the CPU's features (when the user has not), loads the library, and restores
// the environment. If the process already has OpenBLAS loaded, that one is used as it is.
//
// Which OpenBLAS: the OpenMP build (Debian's libopenblas0-openmp) when installed, so its
// threads are the same OpenMP team as softce's kernels (threading.cpp) and PyTorch's; else
// the system's default libopenblas.so.0.
#pragma once

#include <string>
#include <string_view>

namespace softce::detail::blas {

// C (M, N) = alpha · op(A) · op(B) + beta · C, row-major, as cblas_?gemm. Loads the library
// at the first call (throws softce::error naming `function` if it cannot be loaded).
void sgemm(std::string_view function, bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A,
           int lda, const float* B, int ldb, float beta, float* C, int ldc);
void dgemm(std::string_view function, bool trans_a, bool trans_b, int M, int N, int K, double alpha, const double* A,
           int lda, const double* B, int ldb, double beta, double* C, int ldc);

int get_num_threads(std::string_view function);
void set_num_threads(std::string_view function, int threads);

// "OpenBLAS 0.3.21 ... SkylakeX (OpenMP, libopenblas.so.0 at ...)": what was loaded, for
// --version and the benchmarks.
std::string describe(std::string_view function);

// The kernels OpenBLAS is told to use on this CPU ("SkylakeX", "Haswell") or "" to let it
// choose; what `sgemm` sets when OPENBLAS_CORETYPE is unset.
std::string core_for_this_cpu();

}  // namespace softce::detail::blas
