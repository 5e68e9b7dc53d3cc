// Row-major GEMM entry point for the CPU kernels: C = alpha * op(A) @ op(B) + beta * C.
//
// All matrices are row-major with leading dimensions lda/ldb/ldc. trans_a means A is stored as
// [K, M] (so op(A) = A^T); trans_b means B is stored as [N, K]. This is the one place the CPU
// kernels reach a BLAS, so a faster micro-kernel replaces it without touching the kernels.
//
// Today it wraps the buffers as strided tensors and calls ATen's mm/addmm (MKL or oneDNN, whatever
// this torch build uses): ATen's raw cpublas entry points are not exported from libtorch.
#pragma once

#include <ATen/ATen.h>

namespace bigmodel::gemm {

template <typename T>
inline at::Tensor view(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, c10::CppTypeToScalarType<T>::value);
}

template <typename T>
inline void rowmajor(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                     int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  at::Tensor c = view(C, M, N, ldc);
  if (K == 0) {  // define the empty product: C = beta * C
    if (beta == T(0)) c.zero_(); else c.mul_(beta);
    return;
  }
  at::Tensor a = trans_a ? view(A, K, M, lda).t() : view(A, M, K, lda);
  at::Tensor b = trans_b ? view(B, N, K, ldb).t() : view(B, K, N, ldb);
  if (beta == T(0) && alpha == T(1))
    at::mm_out(c, a, b);
  else
    c.addmm_(a, b, beta, alpha);
}

}  // namespace bigmodel::gemm
