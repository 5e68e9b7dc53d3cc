#include "common/gemm/pack.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cstdlib>
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <mutex>
#include <type_traits>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "common/gemm/microkernel.h"
#include "common/gemm/microkernel_avx2.h"

namespace bigmodel::gemm {

ColumnMap contiguous_columns(int64_t N) {
  const int64_t np = (N + kPanel - 1) / kPanel;
  ColumnMap cols(np * kPanel, -1);
  for (int64_t n = 0; n < N; ++n) cols[n] = n;
  return cols;
}

int64_t half_width_panel(int64_t H) {
  constexpr int64_t U = kPanel / 4;
  return H % U != 0 && H % U <= U / 2 ? H / U : -1;
}

ColumnMap gate_grouped_columns(int64_t H, bool half_last) {
  constexpr int64_t U = kPanel / 4;
  const int64_t np = (H + U - 1) / U;
  const int64_t half = half_last ? half_width_panel(H) : -1;
  ColumnMap cols(np * kPanel, -1);
  for (int64_t p = 0; p < np; ++p) {
    const int64_t stride = p == half ? U / 2 : U;  // columns between a unit's gates
    for (int64_t g = 0; g < 4; ++g)
      for (int64_t u = 0; u < U && p * U + u < H; ++u) cols[p * kPanel + g * stride + u] = g * H + p * U + u;
  }
  return cols;
}

ColumnMap gate_half_grouped_columns(int64_t H) {
  constexpr int64_t U = kPanel / 4;
  const int64_t np = (H + U - 1) / U;
  ColumnMap cols(np * kPanel, -1);
  for (int64_t p = 0; p < np; ++p)
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t g = 0; g < 4; ++g)
        for (int64_t j = 0; j < U / 2 && p * U + h * U / 2 + j < H; ++j)
          cols[p * kPanel + h * 2 * U + g * U / 2 + j] = g * H + p * U + h * U / 2 + j;
  return cols;
}

namespace {

// A 64-bit digest of a tensor's bytes: kLanes running sums of position-dependent 32-bit
// multiply-adds, (w_i ^ i * K1) * K2 mod 2^32 with K2 odd, so a change to any one 4-byte word always
// changes its lane. The lanes vectorize to 32-bit multiplies; AVX2 has none of 64 bits, and a 64-bit
// version took ~50 us of a 960 KB LSTM weight on Zen 3, serial time in every step of an nn.LSTMCell
// loop (T = 1, B = 64 inference 330 -> 288 us a call; NOTES v30). Splitting it across threads did not
// measure faster.
constexpr int kLanes = 16;
constexpr uint32_t kPosMul = 0x9E3779B9u, kWordMul = 0x85EBCA6Bu;

// The lane sums over the first `words` 4-byte words at p.
void digest_lanes(const unsigned char* p, int64_t words, uint32_t (&acc)[kLanes]) {
  // lane j's position term advances by kLanes * kPosMul a block: kept in its own array so that the
  // loop is plain lane-wise arithmetic (vpxor, vpmulld, vpaddd)
  uint32_t pos[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    pos[j] = uint32_t(j) * kPosMul;
    acc[j] = 0;
  }
  // words read in place (any alignment: a bf16 tensor's data may start 2 bytes into a word)
  typedef uint32_t word_t __attribute__((aligned(1), may_alias));
  int64_t i = 0;
  for (; i + kLanes <= words; i += kLanes) {
    const word_t* w = reinterpret_cast<const word_t*>(p + 4 * i);
    for (int j = 0; j < kLanes; ++j) {
      acc[j] += (w[j] ^ pos[j]) * kWordMul;
      pos[j] += uint32_t(kLanes) * kPosMul;
    }
  }
  for (; i < words; ++i) {
    uint32_t w;
    std::memcpy(&w, p + 4 * i, 4);
    acc[i % kLanes] += (w ^ uint32_t(i) * kPosMul) * kWordMul;
  }
}

uint64_t digest(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const int64_t bytes = c.numel() * int64_t(c.element_size());
  const unsigned char* p = static_cast<const unsigned char*>(c.const_data_ptr());
  const int64_t words = bytes / 4;
  uint32_t acc[kLanes];
  digest_lanes(p, words, acc);
  uint64_t h = 0x9E3779B97F4A7C15ull ^ uint64_t(bytes);
  for (int j = 0; j < kLanes; ++j) {
    h = (h ^ acc[j]) * 0xBF58476D1CE4E5B9ull;
    h ^= h >> 31;
  }
  for (int64_t i = 4 * words; i < bytes; ++i) h = h * 31 + p[i];
  return h;
}

struct CacheKey {
  int64_t kind = 0;
  std::vector<std::vector<int64_t>> sizes;
  std::vector<at::ScalarType> dtypes;
  std::vector<uint64_t> digests;
  bool operator==(const CacheKey&) const = default;
};

CacheKey key_of(const std::vector<at::Tensor>& sources, int64_t kind) {
  CacheKey k;
  k.kind = kind;
  for (const at::Tensor& t : sources) {
    k.sizes.emplace_back(t.sizes().begin(), t.sizes().end());
    k.dtypes.push_back(t.scalar_type());
    k.digests.push_back(digest(t));
  }
  return k;
}

struct CacheEntry {
  CacheKey key;
  at::Tensor packed;
  uint64_t last_use = 0;
};

}  // namespace

at::Tensor cached_pack(const std::vector<at::Tensor>& sources, int64_t kind, at::IntArrayRef sizes,
                       at::ScalarType dtype, const std::function<void(at::Tensor&)>& pack) {
  static std::mutex mu;
  static std::vector<CacheEntry> entries;
  static uint64_t clock = 0;
  CacheKey key = key_of(sources, kind);
  at::Tensor reuse;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (CacheEntry& e : entries)
      if (e.key == key) {
        e.last_use = ++clock;
        return e.packed;
      }
    // Weights that changed since the last call (every training step): an entry of the same packing
    // and shapes that nothing outside the cache still holds is packed over in place. Its padding is
    // already zero, and a fresh buffer would cost a zero fill on cold pages (350 us of a 1 MB
    // buffer in a T = 19 training step).
    auto stale = std::find_if(entries.begin(), entries.end(), [&](const CacheEntry& e) {
      return e.key.kind == key.kind && e.key.sizes == key.sizes && e.key.dtypes == key.dtypes &&
             e.packed.sizes() == sizes && e.packed.scalar_type() == dtype && e.packed.use_count() == 1 &&
             e.packed.storage().use_count() == 1;
    });
    if (stale != entries.end()) {
      reuse = std::move(stale->packed);
      entries.erase(stale);
    }
  }
  at::Tensor packed = reuse.defined() ? std::move(reuse) : at::zeros(sizes, dtype);
  pack(packed);
  std::lock_guard<std::mutex> lock(mu);
  constexpr size_t kMaxEntries = 16;
  if (entries.size() >= kMaxEntries) {
    auto oldest = std::min_element(entries.begin(), entries.end(),
                                   [](const CacheEntry& a, const CacheEntry& b) { return a.last_use < b.last_use; });
    entries.erase(oldest);
  }
  entries.push_back({std::move(key), packed, ++clock});
  return packed;
}

namespace {

#ifdef BIGMODEL_HAS_AVX512_KERNELS
// 16 consecutive source rows n0.. of a [N, K] matrix, transposed into 16 panel columns: one gather
// per k (the rows advance together; each store is one 64-byte panel row quarter).
BM_AVX512 void transpose16(const float* src, int64_t ld, int64_t K, float* out) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(int32_t(ld)));
  for (int64_t k = 0; k < K; ++k) _mm512_storeu_ps(out + k * kPanel, _mm512_i32gather_ps(idx, src + k, 4));
}
#endif

}  // namespace

void pack_f32_into(float* out, int64_t K_total, int64_t k0, const at::Tensor& src, bool src_is_nk,
                   const ColumnMap& cols) {
  const at::Tensor s = src.to(at::kFloat).contiguous();
  const float* sp = s.const_data_ptr<float>();
  const int64_t K = src_is_nk ? s.size(1) : s.size(0);
  const int64_t ld = s.size(1);
  const int64_t np = int64_t(cols.size()) / kPanel;
  // Packing runs on every call whose weights changed (every training step): one thread below about
  // a MiB, where a thread team costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, K * kPanel));
  at::parallel_for(0, np, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* op = out + (p * K_total + k0) * kPanel;
      const int64_t* cp = cols.data() + p * kPanel;
      if (src_is_nk) {  // column n of B is row n of src
        for (int64_t c0 = 0; c0 < kPanel; c0 += 16) {
          bool run16 = cp[c0] >= 0 && cp[c0] + 15 < s.size(0) && ld <= INT32_MAX / 16;
          for (int64_t u = 1; run16 && u < 16; ++u) run16 = cp[c0 + u] == cp[c0] + u;
#ifdef BIGMODEL_HAS_AVX512_KERNELS
          if (run16 && cpu::has_avx512()) {
            transpose16(sp + cp[c0] * ld, ld, K, op + c0);
            continue;
          }
#endif
          for (int64_t c = c0; c < c0 + 16; ++c)
            if (cp[c] >= 0)
              for (int64_t k = 0; k < K; ++k) op[k * kPanel + c] = sp[cp[c] * ld + k];
        }
      } else {  // row k of B is row k of src: copy runs of consecutive columns
        for (int64_t c0 = 0; c0 < kPanel;) {
          if (cp[c0] < 0) {
            ++c0;
            continue;
          }
          int64_t c1 = c0 + 1;
          while (c1 < kPanel && cp[c1] == cp[c0] + (c1 - c0)) ++c1;
          for (int64_t k = 0; k < K; ++k)
            std::memcpy(op + k * kPanel + c0, sp + k * ld + cp[c0], (c1 - c0) * sizeof(float));
          c0 = c1;
        }
      }
    }
  });
}

namespace {

// Element k (along the row) of row n of a float32 or bfloat16 matrix, as bf16 bits (float32 rounds
// to nearest even, as Tensor.to(torch.bfloat16) does).
template <typename T>
inline int16_t bf16_bits(const T* row, int64_t k) {
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    return int16_t(row[k].x);
  else
    return int16_t(c10::BFloat16(row[k]).x);
}

template <typename T>
void pack_bf16_rows(int16_t* out, int64_t K2_total, int64_t k0, const T* sp, int64_t K, int64_t ld,
                    bool src_is_nk, const ColumnMap& cols) {
  const int64_t np = int64_t(cols.size()) / kPanel;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, K * kPanel));
  at::parallel_for(0, np, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int16_t* op = out + p * K2_total * kPanel * 2;
      const int64_t* cp = cols.data() + p * kPanel;
      for (int64_t c = 0; c < kPanel; ++c) {
        if (cp[c] < 0) continue;
        if (src_is_nk) {  // column n of B is row n of src: read it along k
          const T* row = sp + cp[c] * ld;
          for (int64_t k = 0; k < K; ++k) op[(((k0 + k) / 2) * kPanel + c) * 2 + ((k0 + k) & 1)] = bf16_bits(row, k);
        } else {
          for (int64_t k = 0; k < K; ++k)
            op[(((k0 + k) / 2) * kPanel + c) * 2 + ((k0 + k) & 1)] = bf16_bits(sp + k * ld, cp[c]);
        }
      }
    }
  });
}

}  // namespace

void pack_bf16_into(int16_t* out, int64_t K2_total, int64_t k0, const at::Tensor& src, bool src_is_nk,
                    const ColumnMap& cols) {
  TORCH_CHECK(src.dim() == 2 && (src.scalar_type() == at::kFloat || src.scalar_type() == at::kBFloat16),
              "pack_bf16_into: src must be a 2-D float32 or bfloat16 tensor");
  const at::Tensor s = src.contiguous();
  const int64_t K = src_is_nk ? s.size(1) : s.size(0), ld = s.size(1);
  TORCH_CHECK(k0 >= 0 && k0 + K <= 2 * K2_total, "pack_bf16_into: rows past the panels");
  if (s.scalar_type() == at::kBFloat16)
    pack_bf16_rows(out, K2_total, k0, s.const_data_ptr<c10::BFloat16>(), K, ld, src_is_nk, cols);
  else
    pack_bf16_rows(out, K2_total, k0, s.const_data_ptr<float>(), K, ld, src_is_nk, cols);
}

namespace cpu {

bool has_avx512() {
#ifdef BIGMODEL_HAS_AVX512_KERNELS
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return ok;
#else
  return false;
#endif
}

bool has_avx512_bf16() {
#ifdef BIGMODEL_HAS_AVX512_KERNELS
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

bool has_amx_bf16() {
#if defined(BIGMODEL_HAS_AVX512_KERNELS) && defined(__linux__)
  // Linux hands out the 8 KiB tile state only on request (ARCH_REQ_XCOMP_PERM for XTILEDATA).
  static const bool ok = has_avx512_bf16() && __builtin_cpu_supports("amx-tile") &&
                         __builtin_cpu_supports("amx-bf16") && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
#else
  return false;
#endif
}

bool has_avx2() {
#ifdef BIGMODEL_HAS_AVX2_KERNELS
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

KernelChoice kernel_choice() {
  const char* env = std::getenv("BIGMODEL_CPU_KERNEL");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return KernelChoice::Auto;
  if (std::strcmp(env, "generic") == 0) return KernelChoice::Generic;
  const bool fp32 = std::strcmp(env, "avx512-fp32") == 0;
  if (fp32 || std::strcmp(env, "avx512") == 0) {
    TORCH_CHECK(has_avx512(), "bigmodel: BIGMODEL_CPU_KERNEL=", env, ", but this CPU lacks AVX-512 (or this build ",
                "has no AVX-512 kernels); use 'auto', 'avx2' or 'generic'");
    return fp32 ? KernelChoice::Avx512Fp32 : KernelChoice::Avx512;
  }
  TORCH_CHECK(std::strcmp(env, "avx2") == 0, "bigmodel: BIGMODEL_CPU_KERNEL must be 'auto', 'avx512', ",
              "'avx512-fp32', 'avx2' or 'generic' (or unset), got '", env, "'");
  TORCH_CHECK(has_avx2(), "bigmodel: BIGMODEL_CPU_KERNEL=avx2, but this CPU lacks AVX2 + FMA (or this build has ",
              "no AVX2 kernels); use 'auto' or 'generic'");
  return KernelChoice::Avx2;
}

const char* kernel_choice_name(KernelChoice k) {
  switch (k) {
    case KernelChoice::Auto: return "auto";
    case KernelChoice::Avx512: return "avx512";
    case KernelChoice::Avx512Fp32: return "avx512-fp32";
    case KernelChoice::Avx2: return "avx2";
    case KernelChoice::Generic: return "generic";
  }
  return "?";
}

bool microkernels_enabled() {
  const KernelChoice k = kernel_choice();
  return k == KernelChoice::Auto || k == KernelChoice::Avx512 || k == KernelChoice::Avx512Fp32;
}

bool amx_enabled() { return has_amx_bf16() && kernel_choice() == KernelChoice::Auto; }

Bf16Kernel bf16_kernel() {
  switch (kernel_choice()) {
    case KernelChoice::Generic:
    case KernelChoice::Avx2:
      return Bf16Kernel::None;
    case KernelChoice::Avx512Fp32:
      return Bf16Kernel::Fp32Tiles;
    case KernelChoice::Avx512:
      return has_avx512_bf16() ? Bf16Kernel::Dot : Bf16Kernel::Fp32Tiles;
    case KernelChoice::Auto:
      break;
  }
  if (amx_enabled()) return Bf16Kernel::Amx;
  if (!has_avx512()) return Bf16Kernel::None;
  return bf16_dot_pays() ? Bf16Kernel::Dot : Bf16Kernel::Fp32Tiles;
}

#ifdef BIGMODEL_HAS_AVX512_KERNELS
namespace {
template <bool kDot>
BM_AVX512_BF16 BM_ALWAYS_INLINE __m512 chain_step(__m512 acc) {
  if constexpr (kDot) {
    const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3a83);  // ~1e-3
    return _mm512_dpbf16_ps(acc, x, x);
  } else {
    const __m512 x = _mm512_set1_ps(1e-3f);
    return _mm512_fmadd_ps(x, x, acc);
  }
}

// Seconds for `iters` rounds of 12 independent vfmadd231ps (dot = false) or vdpbf16ps (true) chains:
// enough chains to cover either instruction's latency at two per cycle, so only throughput counts.
template <bool kDot>
BM_AVX512_BF16 __attribute__((noinline)) double time_chains(int64_t iters) {
  // Distinct starting values, so that the compiler cannot merge the chains (no lambda: it would not
  // inherit this function's target attribute in a build without -mavx512f).
  __m512 a0 = _mm512_set1_ps(0.f), a1 = _mm512_set1_ps(1.f), a2 = _mm512_set1_ps(2.f);
  __m512 a3 = _mm512_set1_ps(3.f), a4 = _mm512_set1_ps(4.f), a5 = _mm512_set1_ps(5.f);
  __m512 a6 = _mm512_set1_ps(6.f), a7 = _mm512_set1_ps(7.f), a8 = _mm512_set1_ps(8.f);
  __m512 a9 = _mm512_set1_ps(9.f), a10 = _mm512_set1_ps(10.f), a11 = _mm512_set1_ps(11.f);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    a0 = chain_step<kDot>(a0), a1 = chain_step<kDot>(a1), a2 = chain_step<kDot>(a2);
    a3 = chain_step<kDot>(a3), a4 = chain_step<kDot>(a4), a5 = chain_step<kDot>(a5);
    a6 = chain_step<kDot>(a6), a7 = chain_step<kDot>(a7), a8 = chain_step<kDot>(a8);
    a9 = chain_step<kDot>(a9), a10 = chain_step<kDot>(a10), a11 = chain_step<kDot>(a11);
  }
  const auto t1 = std::chrono::steady_clock::now();
  const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                 _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
  const __m512 r = _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11));
  volatile float sink = _mm512_reduce_add_ps(_mm512_add_ps(s, r));
  (void)sink;
  return std::chrono::duration<double>(t1 - t0).count();
}
}  // namespace
#endif

std::pair<double, double> fma_and_bf16_dot_rates() {
#ifdef BIGMODEL_HAS_AVX512_KERNELS
  static const std::pair<double, double> rates = []() -> std::pair<double, double> {
    if (!has_avx512_bf16()) return {0.0, 0.0};
    // Best of five alternating trials of ~10-40 us each: a trial the scheduler interrupts only
    // reads slower, and the best of each is the instruction's rate.
    constexpr int64_t kIters = 4096;
    double fma = 1e30, dot = 1e30;
    time_chains<false>(4 * kIters);  // wake the 512-bit units up first (~50 us)
    for (int i = 0; i < 5; ++i) {
      fma = std::min(fma, time_chains<false>(kIters));
      dot = std::min(dot, time_chains<true>(kIters));
    }
    const double lanes = double(kIters) * 12 * 16;
    return {lanes * 2 / fma * 1e-9, lanes * 4 / dot * 1e-9};
  }();
  return rates;
#else
  return {0.0, 0.0};
#endif
}

bool bf16_dot_pays() {
  const auto [fma, dot] = fma_and_bf16_dot_rates();
  return dot > 0.8 * fma;  // the margin below 1: not measured on a CPU with close rates
}

}  // namespace cpu
}  // namespace bigmodel::gemm
