// Device-independent parts of the LSTM ops: argument checks and the variable-length plan.
#include <ATen/ATen.h>

#include <algorithm>
#include <numeric>

#include "common/checks.h"
#include "lstm/lstm.h"

namespace bigmodel::lstm {

PackPlan make_plan(int64_t T, int64_t B, const std::optional<at::Tensor>& lengths, const char* op) {
  PackPlan plan;
  plan.T = T;
  plan.B = B;
  plan.order.resize(B);
  std::iota(plan.order.begin(), plan.order.end(), 0);
  if (!lengths.has_value()) {
    plan.batch_sizes.assign(T, B);
    plan.offsets.resize(T + 1);
    for (int64_t t = 0; t <= T; ++t) plan.offsets[t] = t * B;
    plan.N = T * B;
    plan.identity = true;
    return plan;
  }
  const at::Tensor& len = *lengths;
  BM_CHECK(!at::isFloatingType(len.scalar_type()) && !at::isComplexType(len.scalar_type()) &&
               len.scalar_type() != at::kBool,
           op, "lengths must be an integer tensor, got dtype ", len.scalar_type());
  BM_CHECK(len.dim() == 1, op, "lengths must be 1-D with one entry per sequence (", B, "), got shape ",
           len.sizes());
  BM_CHECK(len.size(0) == B, op, "lengths must have one entry per sequence: expected ", B, ", got ",
           len.size(0));
  at::Tensor l = len.to(at::kCPU, at::kLong).contiguous();
  const int64_t* lp = l.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    BM_CHECK(lp[b] >= 1 && lp[b] <= T, op, "lengths must lie in [1, T=", T, "], got lengths[", b,
             "] = ", lp[b]);
  }
  std::stable_sort(plan.order.begin(), plan.order.end(), [&](int64_t a, int64_t b) { return lp[a] > lp[b]; });
  plan.batch_sizes.assign(T, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < lp[b]; ++t) plan.batch_sizes[t] += 1;
  }
  plan.offsets.resize(T + 1);
  plan.offsets[0] = 0;
  for (int64_t t = 0; t < T; ++t) plan.offsets[t + 1] = plan.offsets[t] + plan.batch_sizes[t];
  plan.N = plan.offsets[T];
  bool sorted = true;
  for (int64_t j = 0; j < B; ++j) sorted = sorted && plan.order[j] == j;
  plan.identity = sorted && plan.N == T * B;
  return plan;
}

Dims check_layer_args(const char* op, const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                      const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                      const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr) {
  check_float_dtype(input, op, "input");
  BM_CHECK(input.dim() == 3, op, "input must be 3-D (T, B, input_size), got shape ", input.sizes());
  Dims d{};
  d.T = input.size(0);
  d.B = input.size(1);
  d.I = input.size(2);
  BM_CHECK(d.T >= 1, op, "input must have at least one time step, got shape ", input.sizes());
  BM_CHECK(d.B >= 1, op, "input has an empty batch (B = 0), shape ", input.sizes());
  BM_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0 && w_ih.size(0) > 0, op,
           "w_ih must be 2-D (4*hidden_size, input_size), got shape ", w_ih.sizes());
  d.H = w_ih.size(0) / 4;
  BM_CHECK(w_ih.size(1) == d.I, op, "input feature size ", d.I, " does not match w_ih's input_size ",
           w_ih.size(1), " (w_ih shape ", w_ih.sizes(), ")");
  d.proj = w_hr.has_value();
  if (d.proj) {
    BM_CHECK(w_hr->dim() == 2, op, "w_hr must be 2-D (proj_size, hidden_size=", d.H, "), got shape ",
             w_hr->sizes());
  }
  d.P = d.proj ? w_hr->size(0) : d.H;
  check_same_dtype_device(w_ih, input, op, "w_ih", "input");
  check_same_dtype_device(w_hh, input, op, "w_hh", "input");
  check_same_dtype_device(h0, input, op, "h0", "input");
  check_same_dtype_device(c0, input, op, "c0", "input");
  if (d.proj) {
    check_same_dtype_device(*w_hr, input, op, "w_hr", "input");
    BM_CHECK(w_hr->size(1) == d.H && d.P >= 1, op,
             "w_hr must be (proj_size, hidden_size=", d.H, "), got shape ", w_hr->sizes());
  }
  check_shape(w_hh, {4 * d.H, d.P}, op, "w_hh", "(4*hidden_size, proj_size or hidden_size)");
  check_shape(h0, {d.B, d.P}, op, "h0", "(batch, proj_size or hidden_size)");
  check_shape(c0, {d.B, d.H}, op, "c0", "(batch, hidden_size)");
  BM_CHECK(b_ih.has_value() == b_hh.has_value(), op, "b_ih and b_hh must be given together");
  d.bias = b_ih.has_value();
  if (d.bias) {
    check_same_dtype_device(*b_ih, input, op, "b_ih", "input");
    check_same_dtype_device(*b_hh, input, op, "b_hh", "input");
    check_shape(*b_ih, {4 * d.H}, op, "b_ih", "(4*hidden_size)");
    check_shape(*b_hh, {4 * d.H}, op, "b_hh", "(4*hidden_size)");
  }
  return d;
}

}  // namespace bigmodel::lstm
