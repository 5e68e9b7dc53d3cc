// Optional tensors through an autograd context: save_for_backward takes tensors only, so an absent one
// is saved as an undefined tensor (value_or(Tensor())) and restored with defined_or_none. The LSTM's and
// the attention's autograd kernels both do this.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace bigmodel {

inline std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

}  // namespace bigmodel
