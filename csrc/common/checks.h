// User-facing argument checks. Every message starts with the op's public name and says what was
// expected and what came, e.g. "bigmodel.lstm: input must be 3-D (T, B, input_size), got [4, 7]".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define BM_CHECK(cond, op, ...) TORCH_CHECK((cond), "bigmodel.", op, ": ", __VA_ARGS__)

namespace bigmodel {

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  BM_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op, name,
           " must be float32, float64, bfloat16 or float16, got ", st);
}

inline void check_same_dtype_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                                    const char* name, const char* ref_name) {
  BM_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " has dtype ", t.scalar_type(), " but ",
           ref_name, " has dtype ", ref.scalar_type(), "; they must match");
  BM_CHECK(t.device() == ref.device(), op, name, " is on ", t.device(), " but ", ref_name, " is on ",
           ref.device(), "; they must be on the same device");
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name,
                        const char* what) {
  BM_CHECK(t.sizes() == expected, op, name, " must have shape ", expected, " ", what, ", got ", t.sizes());
}

}  // namespace bigmodel
