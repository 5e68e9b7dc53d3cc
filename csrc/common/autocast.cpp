// Autocast kernels of the forward ops: inside torch.autocast, bigmodel::lstm_layer and
// bigmodel::attention run in the autocast dtype, as nn.LSTM and F.scaled_dot_product_attention do
// (both are on ATen's lower-precision lists, CPU and CUDA). Floating inputs other than float64 are
// cast through ATen's own cast cache (a weight is cast once per autocast region), then the op is
// called again below the autocast key; the casts are recorded by autograd, so gradients reach the
// float32 parameters in float32. The backward ops need no rule: they see the forward's dtypes.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "lstm/lstm_ops.h"

namespace bigmodel {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

template <c10::DeviceType kDevice>
struct Autocast {
  // The autocast key off for the casts and the nested call, as ATen's own autocast wrappers do.
  c10::impl::ExcludeDispatchKeyGuard no_autocast{at::autocast::get_autocast_dispatch_key_from_device_type(kDevice)};
  at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);

  Tensor operator()(const Tensor& t) const { return at::autocast::cached_cast(dtype, t, kDevice); }
  OptTensor operator()(const OptTensor& t) const { return at::autocast::cached_cast(dtype, t, kDevice); }
};

using AttentionSignature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                      const OptTensor&, const OptTensor&, bool,
                                                      std::optional<double>, double, int64_t);

template <c10::DeviceType kDevice>
lstm::LayerOutputs lstm_layer_autocast(const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                                 const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                 const OptTensor& w_hr, const OptTensor& lengths, bool reverse, bool train) {
  const Autocast<kDevice> cast;
  // lengths is an integer tensor: left alone
  return lstm::layer_op().call(cast(input), cast(h0), cast(c0), cast(w_ih), cast(w_hh), cast(b_ih), cast(b_hh), cast(w_hr),
                 lengths, reverse, train);
}

template <c10::DeviceType kDevice>
std::tuple<Tensor, Tensor> attention_autocast(const Tensor& query, const Tensor& key, const Tensor& value,
                                              const OptTensor& attn_mask, const OptTensor& key_lengths,
                                              bool is_causal, std::optional<double> scale, double dropout_p,
                                              int64_t seed) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bigmodel::attention", "").typed<AttentionSignature>();
  const Autocast<kDevice> cast;
  // a boolean attn_mask and the integer key_lengths are not floating: cached_cast leaves them alone
  return op.call(cast(query), cast(key), cast(value), cast(attn_mask), key_lengths, is_causal, scale, dropout_p,
                 seed);
}

}  // namespace
}  // namespace bigmodel

TORCH_LIBRARY_IMPL(bigmodel, AutocastCPU, m) {
  m.impl("lstm_layer", &bigmodel::lstm_layer_autocast<c10::DeviceType::CPU>);
  m.impl("attention", &bigmodel::attention_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(bigmodel, AutocastCUDA, m) {
  m.impl("lstm_layer", &bigmodel::lstm_layer_autocast<c10::DeviceType::CUDA>);
  m.impl("attention", &bigmodel::attention_autocast<c10::DeviceType::CUDA>);
}
