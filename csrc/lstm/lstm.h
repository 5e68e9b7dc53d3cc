// The fused LSTM layer: contract shared by the CPU and CUDA kernels.
//
// One op call runs the whole time loop of one layer in one direction.
//
//   bigmodel::lstm_layer(input, h0, c0, w_ih, w_hh, b_ih?, b_hh?, w_hr?, lengths?, reverse, train)
//       -> (output, h_n, c_n, gates, cells)
//
//   input   [T, B, I]   any strides; T >= 1, B >= 1
//   h0      [B, P]      P = proj_size if w_hr is given, else H
//   c0      [B, H]
//   w_ih    [4H, I], w_hh [4H, P], b_ih/b_hh [4H] (both or neither), w_hr [P, H]
//           gate order i, f, g, o, as in nn.LSTM
//   lengths [B] integer tensor (any device), 1 <= lengths[b] <= T, or None for all T.
//           Sequence b reads steps 0..lengths[b]-1 (reverse: lengths[b]-1 down to 0). Steps past
//           its end do not touch its state and cost no work; output there is zero; h_n/c_n are
//           the state after its last valid step.
//   reverse read the sequence backward (the second direction of a bidirectional layer)
//   train   also return what backward needs
//
//   output  [T, B, P]  dtype of input
//   h_n     [B, P], c_n [B, H]
//   gates   [T*B, 4H]  train only (else [0]): activated gates i, f, g, o in the packed layout below,
//                      in the saved dtype: the compute dtype (float32 for float32/bfloat16/float16,
//                      float64 for float64), except bfloat16 for bfloat16 layers on the CPU
//   cells   [T*B, H]   train only (else [0]): c_t in the packed layout, saved dtype
//
// Packed layout: sequences sorted by length, longest first (stable); step t holds the b_t sequences
// still running at t in rows offsets[t] .. offsets[t] + b_t. Only the first N = sum(lengths) rows of
// gates/cells are meaningful. Without lengths this is the plain [T*B] time-major layout.
//
//   bigmodel::lstm_layer_backward(grad_output?, grad_h_n?, grad_c_n?, input, h0, c0, w_ih, w_hh,
//       w_hr?, lengths?, output, gates, cells, reverse, has_bias)
//       -> (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr)
//
//   grad_bias [4H] is the gradient of b_ih and of b_hh alike ([0] when has_bias is false);
//   grad_w_hr is [0] without projection. Missing grads (None) count as zeros.
//
// Nothing aliases: every output is a new tensor.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace bigmodel::lstm {

struct Dims {
  int64_t T, B, I, H, P;
  bool proj, bias;
};

// Where each step's rows live. With lengths, sequences are sorted longest first.
struct PackPlan {
  int64_t T = 0, B = 0, N = 0;
  std::vector<int64_t> batch_sizes;  // [T]: b_t = number of sequences with length > t
  std::vector<int64_t> offsets;      // [T + 1]: first row of step t
  std::vector<int64_t> order;        // [B]: original batch index of sorted row j
  bool identity = true;              // packed layout == padded [T*B] layout, no reordering

  // Rows of the step processed just before step t (in processing order) that hold sequence row j's
  // previous state, or -1 when row j starts at step t (its previous state is h0/c0).
  int64_t prev_row(int64_t t, int64_t j, bool reverse) const {
    const int64_t tp = reverse ? t + 1 : t - 1;
    if (tp < 0 || tp >= T || j >= batch_sizes[tp]) return -1;
    return offsets[tp] + j;
  }
};

PackPlan make_plan(int64_t T, int64_t B, const std::optional<at::Tensor>& lengths, const char* op);

// Validates every argument of lstm_layer / lstm_layer_backward and returns the sizes.
Dims check_layer_args(const char* op, const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                      const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                      const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr);

// dtype the recurrence is computed in.
inline at::ScalarType compute_dtype(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// dtype of the gates and cells a CPU forward saves for backward: bf16 for bf16 layers (half the
// bytes of the largest stream; seed shape training forward 16-18 -> 12 ms), else compute_dtype.
// CUDA saves compute_dtype.
inline at::ScalarType cpu_saved_dtype(at::ScalarType st) {
  return st == at::kBFloat16 ? at::kBFloat16 : compute_dtype(st);
}

}  // namespace bigmodel::lstm
