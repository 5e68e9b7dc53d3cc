// Autograd of bigmodel::lstm_layer, in C++ for every device (the Autograd alias key).
//
// A step-by-step loop (nn.LSTMCell, decoding) calls the op once per step, so autograd's per-call cost
// counts: the Python formula (torch.library.register_autograd) cost ~210 µs per step of forward and
// backward bookkeeping at B = 64, H = 200, about as much as the step's own math (benchmarks/NOTES.md,
// v13). This node does the same work (save the inputs and the workspace, call lstm_layer_backward)
// without entering Python. torch.compile traces through it like any C++ autograd kernel; the fake
// kernels stay in Python (bigmodel/ops/lstm.py). lstm_layer_backward has an autograd kernel too, only
// so that a double backward fails with a clear error.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/optional_tensor.h"
#include "lstm/lstm_ops.h"

namespace bigmodel::lstm {

const c10::TypedOperatorHandle<LayerSignature>& layer_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bigmodel::lstm_layer", "").typed<LayerSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bigmodel::lstm_layer_backward", "")
                             .typed<BackwardSignature>();
  return op;
}

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LstmLayerFunction : public torch::autograd::Function<LstmLayerFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& h0, const Tensor& c0,
                               const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                               const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
                               const std::optional<Tensor>& lengths, bool reverse, bool train) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, h_n, c_n, gates, cells] =
        layer_op().call(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, train);
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["train"] = train;
    ctx->saved_data["has_bias"] = b_ih.has_value();
    ctx->save_for_backward(
        {input, h0, c0, w_ih, w_hh, w_hr.value_or(Tensor()), lengths.value_or(Tensor()), out, gates, cells});
    // gates/cells are workspace: never differentiated, and their zero gradients (52 MB at the seed
    // shape) must not be materialized; nor those of outputs the loss does not use.
    ctx->mark_non_differentiable({gates, cells});
    ctx->set_materialize_grads(false);
    return {out, h_n, c_n, gates, cells};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(ctx->saved_data["train"].toBool(),
                "bigmodel.lstm: backward through a call made with train=False; call it with train=True "
                "(the default when inputs require grad) to keep what backward needs");
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::optional<Tensor> w_hr = defined_or_none(saved[5]);
    // Through the dispatcher's Autograd key: with create_graph=True the result records a
    // LstmLayerBackwardFunction node, whose own backward raises.
    // A first layer fed raw features or a frozen embedding needs no input gradient: the kernels then
    // skip dx (its share of the [dh, dx] tiles).
    const bool input_grad = ctx->needs_input_grad(0);
    auto [d_in, d_h0, d_c0, d_wih, d_whh, d_b, d_whr] =
        backward_op().call(defined_or_none(grads[0]), defined_or_none(grads[1]), defined_or_none(grads[2]),
                           saved[0], saved[1], saved[2], saved[3], saved[4], w_hr, defined_or_none(saved[6]),
                           saved[7], saved[8], saved[9], ctx->saved_data["reverse"].toBool(), has_bias, input_grad);
    const Tensor d_bias = has_bias ? d_b : Tensor();
    // One gradient per forward argument: b_ih and b_hh get the same one; lengths, reverse, train none.
    const Tensor d_w_hr = w_hr.has_value() ? d_whr : Tensor(), none;
    return {input_grad ? d_in : none, d_h0, d_c0, d_wih, d_whh, d_bias, d_bias, d_w_hr, none, none, none};
  }
};

// The gradient op is differentiable once: its own backward (reached only through a double backward,
// e.g. a gradient penalty) raises instead of PyTorch's fallback, which warns and then treats the op
// as constant, a silently wrong second derivative.
class LstmLayerBackwardFunction : public torch::autograd::Function<LstmLayerBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const std::optional<Tensor>& grad_output,
                               const std::optional<Tensor>& grad_h_n, const std::optional<Tensor>& grad_c_n,
                               const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                               const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                               const std::optional<Tensor>& lengths, const Tensor& output,
                               const Tensor& gates, const Tensor& cells, bool reverse, bool has_bias,
                               bool input_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [d_in, d_h0, d_c0, d_wih, d_whh, d_b, d_whr] =
        backward_op().call(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, lengths, output,
                           gates, cells, reverse, has_bias, input_grad);
    return {d_in, d_h0, d_c0, d_wih, d_whh, d_b, d_whr};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grads*/) {
    TORCH_CHECK(
        false,
        "bigmodel.lstm: the LSTM's gradient is not differentiable: double backward (create_graph=True "
        "and a second backward through it, e.g. a gradient penalty) is not supported; use torch.nn.LSTM "
        "for that");
    return {};
  }
};

BackwardOutputs lstm_layer_backward_autograd(const std::optional<Tensor>& grad_output,
                                             const std::optional<Tensor>& grad_h_n,
                                             const std::optional<Tensor>& grad_c_n, const Tensor& input,
                                             const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                                             const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                                             const std::optional<Tensor>& lengths, const Tensor& output,
                                             const Tensor& gates, const Tensor& cells, bool reverse,
                                             bool has_bias, bool input_grad) {
  variable_list r =
      LstmLayerBackwardFunction::apply(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr,
                                       lengths, output, gates, cells, reverse, has_bias, input_grad);
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6]};
}

LayerOutputs lstm_layer_autograd(const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                                 const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                 const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
                                 const std::optional<Tensor>& lengths, bool reverse, bool train) {
  // Nothing to record (inference, or no input requires grad): straight to the kernel. The autograd
  // node's bookkeeping costs a few us, which counts in a decoding loop of LSTMCell steps.
  const auto needs_grad = [](const Tensor& t) { return t.requires_grad(); };
  const auto opt_needs_grad = [](const std::optional<Tensor>& t) { return t.has_value() && t->requires_grad(); };
  if (!at::GradMode::is_enabled() || !(needs_grad(input) || needs_grad(h0) || needs_grad(c0) || needs_grad(w_ih) ||
                                       needs_grad(w_hh) || opt_needs_grad(b_ih) || opt_needs_grad(b_hh) ||
                                       opt_needs_grad(w_hr))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return layer_op().call(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, train);
  }
  variable_list r =
      LstmLayerFunction::apply(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, train);
  return {r[0], r[1], r[2], r[3], r[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigmodel, Autograd, m) {
  m.impl("lstm_layer", &lstm_layer_autograd);
  m.impl("lstm_layer_backward", &lstm_layer_backward_autograd);
}

}  // namespace bigmodel::lstm
