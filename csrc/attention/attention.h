// Contract of bigmodel's attention ops (schemas in csrc/bigmodel.cpp, CPU kernels in
// attention_cpu.cpp, CUDA kernels in attention_cuda.cu, shared checks in attention_common.cpp, Python wrapper and autograd in bigmodel/ops/attention.py).
//
// attention(q, k, v, attn_mask?, key_lengths?, is_causal, scale?, dropout_p, seed) -> (out, logsumexp)
//   q            [B, Hq, Lq, d]
//   k            [B, Hkv, Lk, d]      Hq % Hkv == 0; query head h reads kv head h / (Hq / Hkv)
//   v            [B, Hkv, Lk, dv]     dv may differ from d
//   attn_mask    optional, broadcastable to [B, Hq, Lq, Lk]: bool (True = attend) or a floating
//                tensor added to the scaled scores. Slower path (read per score).
//   key_lengths  optional [B] int32/int64 with values in [0, Lk]: keys j >= key_lengths[b] are
//                masked, and their blocks are never read. 0 masks every key of batch b.
//   is_causal    query i sees keys j <= i (top-left aligned, as F.scaled_dot_product_attention).
//   scale        multiplies q k^T; default 1 / sqrt(d).
//   dropout_p    in [0, 1): each probability p_ij is zeroed, or kept and scaled by 1 / (1 - dropout_p),
//                by a hash of (seed, b, h, i, j) (h = query head); logsumexp does not see dropout.
//                Backward regenerates the same mask from the same seed (bigmodel.reference.dropout_keep
//                computes the same bits).
//   out          [B, Hq, Lq, dv] in q's dtype.
//   logsumexp    [B, Hq, Lq] float32 (float64 for float64 inputs): log sum_j exp(s_ij) over the
//                valid keys of row i; -inf for a row with no valid key. Such a row's output is 0
//                (not NaN) and its gradient is 0.
//   q, k, v, attn_mask must share dtype (mask: or bool) and device. bfloat16/float16 inputs are
//   computed in float32 and rounded once at the end. Nothing is cached: backward recomputes the
//   probabilities from logsumexp. No output aliases an input.
//
// attention_backward(grad_out, q, k, v, out, logsumexp, attn_mask?, key_lengths?, is_causal, scale?,
//                    dropout_p, seed, mask_grad) -> (grad_q, grad_k, grad_v, grad_attn_mask)
//   grad_out [B, Hq, Lq, dv]; out and logsumexp are the forward's outputs; the other arguments
//   are the forward's. grad_k / grad_v of a kv
//   head shared by several query heads (GQA) are the sums over those heads. With mask_grad (a float
//   attn_mask; CPU only), grad_attn_mask is the mask's gradient in its shape and dtype: the scores'
//   gradient dS = P (Z dP - delta) (dP = grad_out V^T; 0 where a key is masked or unseen) summed over
//   the dimensions the mask broadcasts. Without it grad_attn_mask is empty ([0]). No gradient flows
//   to key_lengths.
//
// attention_weights(q, k, logsumexp, attn_mask?, key_lengths?, is_causal, scale?, dropout_p, seed, average)
//   -> weights
//   The probabilities the forward multiplied the values by (what nn.MultiheadAttention returns with
//   need_weights=True): exp(s_ij - logsumexp_i) for the valid keys, 0 for masked ones and for rows
//   with no valid key, times the dropout factor (0, or 1 / (1 - dropout_p)) of the same hash.
//   logsumexp must be the forward's for the same q, k and arguments. [B, Hq, Lq, Lk] in q's dtype,
//   or with average its mean over the query heads, [B, Lq, Lk]. The gradient (Python) treats
//   logsumexp as what it is, a function of q and k: it is the softmax's (a float attn_mask that
//   requires grad gets dS summed to its shape).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

// Host and device (the dropout hash is computed by both kernels).
#if defined(__CUDACC__)
#define BM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BM_HOST_DEVICE inline
#endif

namespace bigmodel::attention {

// Dropout's keep/drop decision for score (b, h, i, j) is a pure function of (seed, b, h, i, j), so
// backward regenerates forward's mask without storing it, and the CPU and CUDA kernels draw the same
// mask. mix32 is a 32-bit integer finalizer (xorshift-multiply, "lowbias32");
// bigmodel.reference.dropout_keep computes the same bits.
BM_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct Dropout {
  double p = 0.0;
  uint32_t seed = 0;
  uint32_t threshold = 0;  // keep iff hash >= threshold, i.e. with probability 1 - p

  BM_HOST_DEVICE bool active() const { return p > 0.0; }
  BM_HOST_DEVICE double keep_scale() const { return 1.0 / (1.0 - p); }  // a kept probability's factor
  BM_HOST_DEVICE uint32_t row_key(int64_t b, int64_t h, int64_t i) const {
    uint32_t x = mix32(seed + 0x9e3779b9U);
    x = mix32(x ^ static_cast<uint32_t>(b));
    x = mix32(x ^ static_cast<uint32_t>(h));
    return mix32(x ^ static_cast<uint32_t>(i));
  }
  BM_HOST_DEVICE bool keep(uint32_t row, int64_t j) const { return mix32(row ^ static_cast<uint32_t>(j)) >= threshold; }
};

// Checks dropout_p (in [0, 1)) and derives the threshold.
Dropout make_dropout(const char* op, double p, int64_t seed);

struct Dims {
  int64_t B, Hq, Hkv, Lq, Lk, d, dv;
};

inline at::ScalarType compute_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// Validates q, k, v, attn_mask and key_lengths (shapes, dtypes, devices) and returns the sizes. The
// range of key_lengths is checked here for CPU tensors; a CUDA caller checks it with
// check_key_lengths_range when it may synchronize.
Dims check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_lengths);
void check_key_lengths_range(const char* op, const at::Tensor& key_lengths, int64_t Lk);

// Backward's extra arguments: grad_out and out [B, Hq, Lq, dv], logsumexp [B, Hq, Lq] in the compute
// dtype, all on query's device.
void check_backward_inputs(const char* op, const Dims& d, const at::Tensor& grad_out, const at::Tensor& out,
                           const at::Tensor& logsumexp, at::ScalarType compute, const at::Device& query_device);

// attention_backward's mask_grad needs a floating-point attn_mask (a bool mask has no gradient).
void check_mask_grad(const char* op, const std::optional<at::Tensor>& attn_mask, bool mask_grad);

// The additive mask in compute dtype ct, broadcast (by strides, not copies) to [B, Hq, Lq, Lk];
// undefined without attn_mask. A bool mask becomes 0 / -inf.
at::Tensor additive_mask(const std::optional<at::Tensor>& attn_mask, const Dims& d, at::ScalarType ct);

// key_lengths as a contiguous int64 tensor on its device; undefined without.
at::Tensor lengths_int64(const std::optional<at::Tensor>& key_lengths);

}  // namespace bigmodel::attention
