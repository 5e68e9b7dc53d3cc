// Typed dispatcher handles of the LSTM ops (schemas in bigmodel.cpp), for the kernels that call an op
// again below their own dispatch key: the autograd kernels (lstm_autograd.cpp, which defines these)
// and the autocast kernel (common/autocast.cpp).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace bigmodel::lstm {

using LayerOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;
// The schemas of bigmodel.cpp, as the dispatcher's typed calls see them.
using LayerSignature = LayerOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                    const OptTensor&, const OptTensor&, bool, bool);
using BackwardSignature = BackwardOutputs(const OptTensor&, const OptTensor&, const OptTensor&,
                                          const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, const OptTensor&,
                                          const OptTensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, bool, bool, bool);

const c10::TypedOperatorHandle<LayerSignature>& layer_op();
const c10::TypedOperatorHandle<BackwardSignature>& backward_op();

}  // namespace bigmodel::lstm
