// Argument checks and helpers shared by the CPU and CUDA attention kernels (contract in attention.h).
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#include "attention/attention.h"
#include "common/checks.h"

namespace bigmodel::attention {

using at::Tensor;

Dropout make_dropout(const char* op, double p, int64_t seed) {
  BM_CHECK(p >= 0.0 && p < 1.0, op, "dropout_p must be in [0, 1), got ", p);
  Dropout d;
  d.p = p;
  d.seed = static_cast<uint32_t>(seed);
  d.threshold = static_cast<uint32_t>(std::min(p * 4294967296.0, 4294967295.0));
  return d;
}

void check_key_lengths_range(const char* op, const Tensor& kl, int64_t Lk) {
  if (kl.numel() == 0) return;
  const auto [lo_t, hi_t] = at::aminmax(kl);
  const int64_t lo = lo_t.item<int64_t>(), hi = hi_t.item<int64_t>();
  BM_CHECK(lo >= 0 && hi <= Lk, op, "key_lengths must lie in [0, Lk = ", Lk, "], got values in [", lo, ", ", hi, "]");
}

Dims check_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                  const std::optional<Tensor>& attn_mask, const std::optional<Tensor>& key_lengths) {
  BM_CHECK(q.dim() == 4, op, "query must be 4-D [B, Hq, Lq, d], got ", q.sizes());
  BM_CHECK(k.dim() == 4, op, "key must be 4-D [B, Hkv, Lk, d], got ", k.sizes());
  BM_CHECK(v.dim() == 4, op, "value must be 4-D [B, Hkv, Lk, dv], got ", v.sizes());
  check_float_dtype(q, op, "query");
  check_same_dtype_device(k, q, op, "key", "query");
  check_same_dtype_device(v, q, op, "value", "query");
  const Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  BM_CHECK(k.size(0) == d.B, op, "key has batch size ", k.size(0), " but query has ", d.B);
  BM_CHECK(v.size(0) == d.B, op, "value has batch size ", v.size(0), " but query has ", d.B);
  BM_CHECK(v.size(1) == d.Hkv, op, "value has ", v.size(1), " heads but key has ", d.Hkv);
  BM_CHECK(v.size(2) == d.Lk, op, "value has ", v.size(2), " keys (dim 2) but key has ", d.Lk);
  BM_CHECK(k.size(3) == d.d, op, "key has head dim ", k.size(3), " but query has ", d.d);
  BM_CHECK(d.Hkv > 0 && d.Hq % d.Hkv == 0, op, "query heads (", d.Hq,
           ") must be a multiple of key/value heads (", d.Hkv, ")");
  if (key_lengths.has_value()) {
    const Tensor& kl = *key_lengths;
    BM_CHECK(kl.scalar_type() == at::kLong || kl.scalar_type() == at::kInt, op,
             "key_lengths must be int32 or int64, got ", kl.scalar_type());
    BM_CHECK(kl.dim() == 1 && kl.size(0) == d.B, op, "key_lengths must have shape [", d.B,
             "] (one length per batch entry), got ", kl.sizes());
    BM_CHECK(kl.device() == q.device(), op, "key_lengths is on ", kl.device(), " but query is on ", q.device());
    if (kl.is_cpu()) check_key_lengths_range(op, kl, d.Lk);
  }
  if (attn_mask.has_value()) {
    const Tensor& m = *attn_mask;
    BM_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(), op,
             "attn_mask must be bool or have query's dtype ", q.scalar_type(), ", got ", m.scalar_type());
    BM_CHECK(m.device() == q.device(), op, "attn_mask is on ", m.device(), " but query is on ", q.device());
    const int64_t full[4] = {d.B, d.Hq, d.Lq, d.Lk};
    bool ok = m.dim() <= 4;
    for (int64_t i = 0; ok && i < m.dim(); ++i) {
      const int64_t s = m.size(m.dim() - 1 - i);
      ok = s == 1 || s == full[3 - i];
    }
    BM_CHECK(ok, op, "attn_mask must be broadcastable to [B, Hq, Lq, Lk] = ", at::IntArrayRef(full, 4), ", got ",
             m.sizes());
  }
  return d;
}

void check_backward_inputs(const char* op, const Dims& d, const Tensor& grad_out, const Tensor& out,
                           const Tensor& logsumexp, at::ScalarType compute, const at::Device& query_device) {
  check_shape(grad_out, {d.B, d.Hq, d.Lq, d.dv}, op, "grad_out", "[B, Hq, Lq, dv]");
  check_shape(out, {d.B, d.Hq, d.Lq, d.dv}, op, "out", "[B, Hq, Lq, dv]");
  check_shape(logsumexp, {d.B, d.Hq, d.Lq}, op, "logsumexp", "[B, Hq, Lq]");
  BM_CHECK(logsumexp.scalar_type() == compute, op, "logsumexp must be ", compute, ", got ", logsumexp.scalar_type());
  const Tensor* same_device[3] = {&grad_out, &out, &logsumexp};
  const char* names[3] = {"grad_out", "out", "logsumexp"};
  for (int i = 0; i < 3; ++i)
    BM_CHECK(same_device[i]->device() == query_device, op, names[i], " is on ", same_device[i]->device(),
             " but query is on ", query_device);
}

void check_mask_grad(const char* op, const std::optional<Tensor>& attn_mask, bool mask_grad) {
  BM_CHECK(!mask_grad || (attn_mask.has_value() && at::isFloatingType(attn_mask->scalar_type())), op,
           "mask_grad=True needs a floating-point attn_mask, got ",
           attn_mask.has_value() ? c10::toString(attn_mask->scalar_type()) : "none");
}

Tensor additive_mask(const std::optional<Tensor>& attn_mask, const Dims& d, at::ScalarType ct) {
  if (!attn_mask.has_value()) return Tensor();
  Tensor m = *attn_mask;
  if (m.scalar_type() == at::kBool)
    m = at::zeros(m.sizes(), m.options().dtype(ct)).masked_fill_(m.logical_not(), -std::numeric_limits<double>::infinity());
  else
    m = m.to(ct);
  return m.expand({d.B, d.Hq, d.Lq, d.Lk});
}

Tensor lengths_int64(const std::optional<Tensor>& key_lengths) {
  return key_lengths.has_value() ? key_lengths->to(at::kLong).contiguous() : Tensor();
}

}  // namespace bigmodel::attention
