// Autograd of bigmodel::attention, in C++ for every device (the Autograd alias key).
//
// The formula was Python (torch.library.register_autograd), which ran on every call, grad or not: at
// decoding shapes (one query row against a KV cache) the call is a few microseconds of arithmetic, and
// the Python kernel's frames and objects (and the garbage collector they wake) made the op slower than
// F.scaled_dot_product_attention (NOTES v22). This node saves the same tensors and calls
// attention_backward; a call that needs no gradient goes straight to the kernel. attention_backward
// has an autograd kernel only so that a double backward fails with a clear error.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/optional_tensor.h"

namespace bigmodel::attention {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

using ForwardSignature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                    const OptTensor&, bool, std::optional<double>, double, int64_t);
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                     const Tensor&, const Tensor&, const Tensor&,
                                                                     const OptTensor&, const OptTensor&, bool,
                                                                     std::optional<double>, double, int64_t, bool);

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bigmodel::attention", "").typed<ForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bigmodel::attention_backward", "").typed<BackwardSignature>();
  return op;
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& query, const Tensor& key, const Tensor& value,
                               const OptTensor& attn_mask, const OptTensor& key_lengths, bool is_causal,
                               std::optional<double> scale, double dropout_p, int64_t seed) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = forward_op().call(query, key, value, attn_mask, key_lengths, is_causal, scale, dropout_p, seed);
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale.has_value() ? c10::IValue(*scale) : c10::IValue();
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->save_for_backward({query, key, value, out, lse, attn_mask.value_or(Tensor()), key_lengths.value_or(Tensor())});
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor none;
    if (!grads[0].defined()) return {none, none, none, none, none, none, none, none, none};
    const variable_list s = ctx->get_saved_variables();
    const c10::IValue scale = ctx->saved_data["scale"];
    // Through the dispatcher's Autograd key: with create_graph=True the result records an
    // AttentionBackwardFunction node, whose own backward raises.
    // needs_input_grad counts the tensor arguments that were given: the mask is edge 3 when present.
    const bool mask_grad = s[5].defined() && ctx->needs_input_grad(3);
    auto [dq, dk, dv, dmask] = backward_op().call(
        grads[0], s[0], s[1], s[2], s[3], s[4], defined_or_none(s[5]), defined_or_none(s[6]),
        ctx->saved_data["is_causal"].toBool(), scale.isNone() ? std::nullopt : std::optional<double>(scale.toDouble()),
        ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["seed"].toInt(), mask_grad);
    return {ctx->needs_input_grad(0) ? dq : none,
            ctx->needs_input_grad(1) ? dk : none,
            ctx->needs_input_grad(2) ? dv : none,
            mask_grad ? dmask : none,
            none,
            none,
            none,
            none,
            none};
  }
};

// Reached only through a double backward: raises instead of PyTorch's fallback, which warns and then
// treats the op as constant (a silently wrong second derivative).
class AttentionBackwardFunction : public torch::autograd::Function<AttentionBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const Tensor& grad_out, const Tensor& query,
                               const Tensor& key, const Tensor& value, const Tensor& out, const Tensor& lse,
                               const OptTensor& attn_mask, const OptTensor& key_lengths, bool is_causal,
                               std::optional<double> scale, double dropout_p, int64_t seed, bool mask_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dq, dk, dv, dmask] = backward_op().call(grad_out, query, key, value, out, lse, attn_mask, key_lengths,
                                                  is_causal, scale, dropout_p, seed, mask_grad);
    return {dq, dk, dv, dmask};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grads*/) {
    TORCH_CHECK(false,
                "bigmodel.attention: the attention's gradient is not differentiable: double backward "
                "(create_graph=True and a second backward through it, e.g. a gradient penalty) is not supported; "
                "use torch.nn.functional.scaled_dot_product_attention for that");
    return {};
  }
};

std::tuple<Tensor, Tensor> attention_autograd(const Tensor& query, const Tensor& key, const Tensor& value,
                                              const OptTensor& attn_mask, const OptTensor& key_lengths,
                                              bool is_causal, std::optional<double> scale, double dropout_p,
                                              int64_t seed) {
  const bool mask_requires_grad = attn_mask.has_value() && attn_mask->requires_grad();
  TORCH_CHECK(!mask_requires_grad || !at::GradMode::is_enabled() || attn_mask->is_cpu(),
              "bigmodel.attention: the gradient of attn_mask is computed on the CPU only (no CUDA kernel for it "
              "yet); pass attn_mask.detach() or use torch.nn.functional.scaled_dot_product_attention");
  if (!at::GradMode::is_enabled() ||
      !(query.requires_grad() || key.requires_grad() || value.requires_grad() || mask_requires_grad)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(query, key, value, attn_mask, key_lengths, is_causal, scale, dropout_p, seed);
  }
  variable_list r =
      AttentionFunction::apply(query, key, value, attn_mask, key_lengths, is_causal, scale, dropout_p, seed);
  return {r[0], r[1]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_backward_autograd(
    const Tensor& grad_out, const Tensor& query, const Tensor& key, const Tensor& value, const Tensor& out,
    const Tensor& lse, const OptTensor& attn_mask, const OptTensor& key_lengths, bool is_causal,
    std::optional<double> scale, double dropout_p, int64_t seed, bool mask_grad) {
  variable_list r = AttentionBackwardFunction::apply(grad_out, query, key, value, out, lse, attn_mask, key_lengths,
                                                     is_causal, scale, dropout_p, seed, mask_grad);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigmodel, Autograd, m) {
  m.impl("attention", &attention_autograd);
  m.impl("attention_backward", &attention_backward_autograd);
}

}  // namespace bigmodel::attention
