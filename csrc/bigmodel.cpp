// Every op schema of the bigmodel library. Kernels register themselves per device at the end of
// their own files (TORCH_LIBRARY_IMPL), as do the autograd kernels (lstm/lstm_autograd.cpp,
// attention/attention_autograd.cpp); every fake kernel is registered from Python.
#include <torch/library.h>

#include <string>

#include "common/gemm/pack.h"
#include "common/pool.h"

#ifndef BIGMODEL_CPU_ARCH
#define BIGMODEL_CPU_ARCH "unknown"
#endif
#ifndef BIGMODEL_CPU_CAPABILITY
#define BIGMODEL_CPU_CAPABILITY "DEFAULT"
#endif
#ifndef BIGMODEL_CUDA_ARCHS
#define BIGMODEL_CUDA_ARCHS ""
#endif

namespace {

// "key=value" lines describing how this binary was compiled; `python -m bigmodel info` prints them.
std::string build_info() {
  std::string s;
  s += "cpu_arch=" BIGMODEL_CPU_ARCH "\n";
  s += "cpu_capability=" BIGMODEL_CPU_CAPABILITY "\n";
#ifdef BIGMODEL_WITH_CUDA
  s += "cuda=1\n";
#else
  s += "cuda=0\n";
#endif
  s += "cuda_archs=" BIGMODEL_CUDA_ARCHS "\n";
  // What this CPU runs: AMX tiles (bf16), the AVX-512 micro-kernels (and their bf16 variant), the
  // AVX2 ones, or the generic path (BIGMODEL_CPU_KERNEL).
  namespace cpu = bigmodel::gemm::cpu;
  s += std::string("cpu_avx512=") + (cpu::has_avx512() ? "1" : "0") + "\n";
  s += std::string("cpu_avx512_bf16=") + (cpu::has_avx512_bf16() ? "1" : "0") + "\n";
  s += std::string("cpu_amx_bf16=") + (cpu::has_amx_bf16() ? "1" : "0") + "\n";
  s += std::string("cpu_avx2=") + (cpu::has_avx2() ? "1" : "0") + "\n";
  if (cpu::has_avx512_bf16()) {  // which bf16 LSTM tiles 'auto' picks without AMX, and why
    const auto [fma, dot] = cpu::fma_and_bf16_dot_rates();
    s += "cpu_fma_gflops=" + std::to_string(fma) + "\n";
    s += "cpu_bf16_dot_gflops=" + std::to_string(dot) + "\n";
    s += std::string("cpu_bf16_dot_pays=") + (cpu::bf16_dot_pays() ? "1" : "0") + "\n";
  }
  try {
    s += std::string("cpu_kernel=") + cpu::kernel_choice_name(cpu::kernel_choice()) + "\n";
  } catch (const c10::Error& e) {  // an invalid BIGMODEL_CPU_KERNEL: report it, the ops will refuse it
    s += std::string("cpu_kernel=invalid (") + e.msg() + ")\n";
  }
  return s;
}

int64_t empty_cache() { return bigmodel::empty_cache(); }

}  // namespace

TORCH_LIBRARY(bigmodel, m) {
  m.def(
      "lstm_layer(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, bool train) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  m.def(
      "lstm_layer_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? lengths, Tensor output, "
      "Tensor gates, Tensor cells, bool reverse, bool has_bias, bool input_grad=True) "
      "-> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias, Tensor grad_w_hr)");
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, Tensor? key_lengths=None, "
      "bool is_causal=False, float? scale=None, float dropout_p=0.0, int seed=0) "
      "-> (Tensor out, Tensor logsumexp)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor logsumexp, Tensor? attn_mask, Tensor? key_lengths, bool is_causal, float? scale, "
      "float dropout_p, int seed, bool mask_grad=False) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_attn_mask)");
  m.def(
      "attention_weights(Tensor query, Tensor key, Tensor logsumexp, Tensor? attn_mask=None, "
      "Tensor? key_lengths=None, bool is_causal=False, float? scale=None, float dropout_p=0.0, int seed=0, "
      "bool average=False) -> Tensor");
  m.def("build_info() -> str", &build_info);
  m.def("empty_cache() -> int", &empty_cache);
}
