// Checks bigmodel::lstm_layer and bigmodel::lstm_layer_backward, called through the dispatcher,
// against an LSTM written with plain ATen ops (gate order i, f, g, o) and against its autograd
// gradients. Every case runs on the CPU and, where a GPU is present and the CUDA kernels were built,
// on CUDA too. Exits nonzero on any mismatch.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using LayerFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                   const Tensor&, const Tensor&, const OptTensor&,
                                                                   const OptTensor&, const OptTensor&,
                                                                   const OptTensor&, bool, bool);
using BackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, bool, bool, bool);

struct Case {
  int64_t T, B, I, H, P;         // P == 0: no projection
  std::vector<int64_t> lengths;  // empty: every sequence has all T steps
  bool bias, reverse, contiguous_input, grad_c_n;
  at::ScalarType dtype;
};

// The layer's tensors; undefined ones are absent.
struct Params {
  Tensor x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr;
};

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

std::string describe(const Case& c, const at::Device& device) {
  std::string s = std::string(c10::toString(c.dtype)) + " " + device.str() + " T=" + std::to_string(c.T) +
                  " B=" + std::to_string(c.B) + " I=" + std::to_string(c.I) + " H=" + std::to_string(c.H) +
                  " P=" + std::to_string(c.P) + (c.bias ? " bias" : "") + (c.reverse ? " reverse" : "") +
                  (c.contiguous_input ? "" : " strided-input");
  if (!c.lengths.empty()) {
    s += " lengths=[";
    for (size_t b = 0; b < c.lengths.size(); ++b) s += (b ? "," : "") + std::to_string(c.lengths[b]);
    s += "]";
  }
  return s;
}

// One sequence at a time, straight from the definition. Steps past a sequence's end give zero output.
std::tuple<Tensor, Tensor, Tensor> reference(const Params& p, const std::vector<int64_t>& lengths, bool reverse) {
  const int64_t T = p.x.size(0), B = p.x.size(1), P = p.h0.size(1);
  std::vector<Tensor> outputs, hs, cs;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = lengths.empty() ? T : lengths[b];
    Tensor h = p.h0.narrow(0, b, 1), c = p.c0.narrow(0, b, 1);
    std::vector<Tensor> rows(T, at::zeros({1, P}, p.x.options()));
    for (int64_t s = 0; s < L; ++s) {
      const int64_t t = reverse ? L - 1 - s : s;
      Tensor g = at::matmul(p.x.select(0, t).narrow(0, b, 1), p.w_ih.t()) + at::matmul(h, p.w_hh.t());
      if (p.b_ih.defined()) g = g + p.b_ih + p.b_hh;
      const auto q = g.chunk(4, 1);
      const Tensor i = q[0].sigmoid(), f = q[1].sigmoid(), gg = q[2].tanh(), o = q[3].sigmoid();
      c = f * c + i * gg;
      h = o * c.tanh();
      if (p.w_hr.defined()) h = at::matmul(h, p.w_hr.t());
      rows[t] = h;
    }
    outputs.push_back(at::cat(rows, 0));
    hs.push_back(h);
    cs.push_back(c);
  }
  return {at::stack(outputs, 1), at::cat(hs, 0), at::cat(cs, 0)};
}

struct Checker {
  std::string name;
  double rtol, atol;
  int failures = 0;

  void expect(const char* what, const Tensor& got, const Tensor& want) {
    if (!got.defined() || got.sizes() != want.sizes()) {
      std::printf("FAIL %s: %s has shape %s, expected %s\n", name.c_str(), what,
                  got.defined() ? c10::str(got.sizes()).c_str() : "(undefined)", c10::str(want.sizes()).c_str());
      ++failures;
      return;
    }
    const Tensor g = got.detach().to(at::kCPU, at::kDouble), w = want.detach().to(at::kCPU, at::kDouble);
    if (g.numel() == 0 || at::allclose(g, w, rtol, atol)) return;
    const double err = (g - w).abs().max().item<double>();
    std::printf("FAIL %s: %s differs by up to %.3g (rtol %.1g, atol %.1g)\n", name.c_str(), what, err, rtol, atol);
    ++failures;
  }

  void expect_dtype(const char* what, const Tensor& got, at::ScalarType want) {
    if (got.scalar_type() == want) return;
    std::printf("FAIL %s: %s has dtype %s, expected %s\n", name.c_str(), what, c10::toString(got.scalar_type()),
                c10::toString(want));
    ++failures;
  }
};

// `gpu`: a GPU is present and the CUDA kernels were built.
int run_case(const Case& c, const at::Device& device, bool gpu, const c10::TypedOperatorHandle<LayerFn>& layer,
             const c10::TypedOperatorHandle<BackwardFn>& layer_backward) {
  const int64_t P = c.P > 0 ? c.P : c.H;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const double k = 1.0 / std::sqrt(double(c.H));
  // Values drawn in float64, rounded to the case's dtype: the reference sees exactly the op's inputs.
  const auto draw = [&](at::IntArrayRef sizes, double scale) {
    return (scale > 0 ? (at::rand(sizes, f64) * 2 - 1) * scale : at::randn(sizes, f64)).to(c.dtype).to(at::kDouble);
  };
  Params ref;
  ref.x = draw({c.T, c.B, c.I}, 0);
  ref.h0 = draw({c.B, P}, 0);
  ref.c0 = draw({c.B, c.H}, 0);
  ref.w_ih = draw({4 * c.H, c.I}, k);
  ref.w_hh = draw({4 * c.H, P}, k);
  if (c.bias) {
    ref.b_ih = draw({4 * c.H}, k);
    ref.b_hh = draw({4 * c.H}, k);
  }
  if (c.P > 0) ref.w_hr = draw({c.P, c.H}, k);

  const auto on_device = [&](const Tensor& t) {
    return t.defined() ? t.to(device, c.dtype, /*non_blocking=*/false, /*copy=*/true) : Tensor();
  };
  Params in{on_device(ref.x),    on_device(ref.h0),   on_device(ref.c0),   on_device(ref.w_ih),
            on_device(ref.w_hh), on_device(ref.b_ih), on_device(ref.b_hh), on_device(ref.w_hr)};
  if (!c.contiguous_input) in.x = in.x.transpose(0, 1).contiguous().transpose(0, 1);
  // lengths may live on any device: on a GPU machine the strided-input CPU cases pass them on the GPU.
  const at::Device lengths_device = device.is_cpu() && !c.contiguous_input && gpu ? at::kCUDA : device;
  const OptTensor lengths =
      c.lengths.empty() ? std::nullopt : OptTensor(at::tensor(c.lengths, at::kLong).to(lengths_device));

  const bool low_precision = c.dtype == at::kBFloat16 || c.dtype == at::kHalf;
  Checker check{describe(c, device), c.dtype == at::kDouble ? 1e-9 : low_precision ? 2e-2 : 1e-4,
                c.dtype == at::kDouble ? 1e-10 : low_precision ? 2e-2 : 2e-5};

  std::vector<Tensor> leaves{ref.x, ref.h0, ref.c0, ref.w_ih, ref.w_hh};
  if (c.bias) leaves.insert(leaves.end(), {ref.b_ih, ref.b_hh});
  if (c.P > 0) leaves.push_back(ref.w_hr);
  for (Tensor& t : leaves) t.requires_grad_(true);
  const auto [want_out, want_h, want_c] = reference(ref, c.lengths, c.reverse);

  const auto [out, h_n, c_n, gates, cells] =
      layer.call(in.x, in.h0, in.c0, in.w_ih, in.w_hh, opt(in.b_ih), opt(in.b_hh), opt(in.w_hr), lengths, c.reverse,
                 /*train=*/true);
  check.expect("output", out, want_out);
  check.expect("h_n", h_n, want_h);
  check.expect("c_n", c_n, want_c);
  check.expect_dtype("output", out, c.dtype);
  // The saved dtype (lstm.h): the compute dtype, except bf16 for a bf16 layer on the CPU.
  const auto saved = c.dtype == at::kDouble                        ? at::kDouble
                     : c.dtype == at::kBFloat16 && device.is_cpu() ? at::kBFloat16
                                                                   : at::kFloat;
  check.expect_dtype("gates", gates, saved);
  check.expect_dtype("cells", cells, saved);

  const auto [out_eval, h_eval, c_eval, gates_eval, cells_eval] =
      layer.call(in.x, in.h0, in.c0, in.w_ih, in.w_hh, opt(in.b_ih), opt(in.b_hh), opt(in.w_hr), lengths, c.reverse,
                 /*train=*/false);
  check.expect("output (train=false)", out_eval, want_out);
  check.expect("h_n (train=false)", h_eval, want_h);
  check.expect("c_n (train=false)", c_eval, want_c);

  if (!low_precision) {
    const Tensor go = draw({c.T, c.B, P}, 0), gh = draw({c.B, P}, 0), gc = draw({c.B, c.H}, 0);
    Tensor loss = (want_out * go).sum() + (want_h * gh).sum();
    if (c.grad_c_n) loss = loss + (want_c * gc).sum();
    const auto want = torch::autograd::grad({loss}, leaves);
    const auto backward = [&](bool input_grad) {
      return layer_backward.call(on_device(go), on_device(gh), c.grad_c_n ? OptTensor(on_device(gc)) : std::nullopt,
                                 in.x, in.h0, in.c0, in.w_ih, in.w_hh, opt(in.w_hr), lengths, out, gates, cells,
                                 c.reverse, c.bias, input_grad);
    };
    const auto [dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr] = backward(true);
    // Without the input's gradient: none returned, the rest as before.
    const auto [no_dx, dh0_b, dc0_b, dw_ih_b, dw_hh_b, db_b, dw_hr_b] = backward(false);
    if (no_dx.numel() != 0) {
      std::printf("FAIL %s: grad_input with input_grad=false has shape %s, expected (0)\n", check.name.c_str(),
                  c10::str(no_dx.sizes()).c_str());
      ++check.failures;
    }
    check.expect("grad_h0 (input_grad=false)", dh0_b, want[1]);
    check.expect("grad_w_ih (input_grad=false)", dw_ih_b, want[3]);
    check.expect("grad_w_hh (input_grad=false)", dw_hh_b, want[4]);
    check.expect("grad_input", dx, want[0]);
    check.expect("grad_h0", dh0, want[1]);
    check.expect("grad_c0", dc0, want[2]);
    check.expect("grad_w_ih", dw_ih, want[3]);
    check.expect("grad_w_hh", dw_hh, want[4]);
    size_t next = 5;
    if (c.bias) {
      check.expect("grad_bias (b_ih)", db, want[next++]);
      check.expect("grad_bias (b_hh)", db, want[next++]);
    }
    if (c.P > 0) check.expect("grad_w_hr", dw_hr, want[next]);
  }
  return check.failures;
}

std::vector<Case> cases() {
  std::vector<Case> all;
  int n = 0;
  for (const auto dtype : {at::kDouble, at::kFloat}) {
    for (const int64_t proj : {0, 3}) {
      for (const bool bias : {false, true}) {
        for (const bool ragged : {false, true}) {
          for (const bool reverse : {false, true}) {
            // Unsorted lengths, so the packed order differs from the batch order.
            all.push_back({5, 3, 4, 5, proj, ragged ? std::vector<int64_t>{2, 5, 4} : std::vector<int64_t>{}, bias,
                           reverse, n % 2 == 0, n % 3 != 0, dtype});
            ++n;
          }
        }
      }
    }
  }
  for (const bool reverse : {false, true}) {
    all.push_back({1, 1, 2, 3, 0, {1}, true, reverse, true, true, at::kDouble});
    all.push_back({4, 7, 3, 1, 0, {4, 1, 3, 3, 2, 4, 1}, true, reverse, true, true, at::kDouble});
    all.push_back({3, 2, 3, 4, 2, {3, 3}, false, reverse, false, true, at::kFloat});  // lengths given, all T
    all.push_back({6, 4, 8, 8, 5, {6, 2, 5, 1}, true, reverse, true, true, at::kBFloat16});
  }
  return all;
}

}  // namespace

int main() {
  at::manual_seed(0);
  auto& dispatcher = c10::Dispatcher::singleton();
  const auto layer_handle = dispatcher.findSchemaOrThrow("bigmodel::lstm_layer", "");
  const auto layer = layer_handle.typed<LayerFn>();
  const auto layer_backward = dispatcher.findSchemaOrThrow("bigmodel::lstm_layer_backward", "").typed<BackwardFn>();

  const bool gpu = at::hasCUDA() && layer_handle.hasKernelForDispatchKey(c10::DispatchKey::CUDA);
  std::vector<at::Device> devices{at::kCPU};
  if (gpu) devices.emplace_back(at::kCUDA, 0);

  int runs = 0, failures = 0;
  for (const auto& device : devices) {
    for (const Case& c : cases()) {
      failures += run_case(c, device, gpu, layer, layer_backward);
      ++runs;
    }
  }
  std::printf("test_lstm: %d cases on %s%s, %d failed checks\n", runs, devices.size() > 1 ? "cpu and " : "cpu",
              devices.size() > 1 ? "cuda" : "", failures);
  return failures == 0 ? 0 : 1;
}
