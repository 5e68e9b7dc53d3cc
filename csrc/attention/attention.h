// Contract of bigmodel's attention ops (schemas in csrc/bigmodel.cpp, CPU kernels in
// attention_cpu.cpp, Python wrapper and autograd in bigmodel/ops/attention.py).
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
//                    dropout_p, seed) -> (grad_q, grad_k, grad_v)
//   grad_out [B, Hq, Lq, dv]; out and logsumexp are the forward's outputs; the other arguments
//   are the forward's. grad_k / grad_v of a kv
//   head shared by several query heads (GQA) are the sums over those heads. No gradient flows to
//   attn_mask or key_lengths.
#pragma once
