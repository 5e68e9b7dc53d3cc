// Attention on the GEMM core's AVX-512 micro-kernels (attention_cpu_fast.cpp), used by
// attention_cpu.cpp when the CPU has AVX-512 and head dims d and dv up to kMaxDim (multiples of 16
// but for the float32 tile kernels; causal, key_lengths and an additive attn_mask are fine; the
// float32 tile kernels also take dropout).
//
// Forward. A task is one (batch, query head, block of query rows); it packs its kv head's K^T (times
// scale) into 64-key panels once and reuses them while consecutive tasks share the head. Each group
// of 6 query rows walks the 64-key blocks it can see: S = Q K^T is one register tile, the online
// softmax (row max, exp, row sum, rescale) runs on it in registers, and P V multiplies the tile,
// spilled to L1, by V read in place. Nothing of size L x L, or even 6 x L, is written.
// forward_lanes (below) serves calls with few query rows per kv head without packing anything.
// Backward: see backward() below.
#pragma once

#include <cstdint>

#include "attention/attention.h"

namespace bigmodel::attention::fast {

// T: float, or uint16_t for bfloat16 bits.
template <typename T>
struct ProblemOf {
  int64_t B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0, d = 0, dv = 0;
  float scale = 1.f;
  bool causal = false;
  const T* q = nullptr;  // rows of d values at strides qs over (batch, head, row)
  const T* k = nullptr;
  const T* v = nullptr;
  int64_t qs[3] = {}, ks[3] = {}, vs[3] = {};
  const int64_t* lengths = nullptr;  // [B] or nullptr
  Dropout dropout;  // forward(), backward(), forward_lanes(), forward_bf16_dot(), backward_bf16_dot()
  // An additive mask (attn_mask as a float32 [B, Hq, Lq, Lk] view, keys contiguous, rows at strides ms
  // over (batch, query head, row)) or nullptr; every kernel here but forward_amx takes it.
  const float* mask = nullptr;
  int64_t ms[3] = {};
};
using Problem = ProblemOf<float>;
using ProblemBf16 = ProblemOf<uint16_t>;

// Head dims of the lanes and bf16 kernels: multiples of 16 up to kMaxDim. Outputs wider than a register
// tile's 64 columns run as 64-column chunks.
constexpr int64_t kMaxDim = 256;
inline bool supports(int64_t d, int64_t dv) {
  return d % 16 == 0 && dv % 16 == 0 && d >= 16 && dv >= 16 && d <= kMaxDim && dv <= kMaxDim;
}
// Head dims of the float32 tile kernels (forward, backward, weights): any up to kMaxDim. The products'
// B operands they copy anyway (V in the forward; K, Q and dO in the backward) get rows padded with
// zeros to whole vectors, and the outputs' last vector is stored through a lane mask.
inline bool supports_tiles(int64_t d, int64_t dv) { return d >= 1 && dv >= 1 && d <= kMaxDim && dv <= kMaxDim; }

constexpr int64_t kBlockQ = 96;  // query rows per forward task

// Forward tasks [t0, t1) of B * Hq * ceil(Lq / kBlockQ): out [B, Hq, Lq, dv], lse [B, Hq, Lq].
void forward(const Problem& p, int64_t t0, int64_t t1, float* out, float* lse);

// The same forward for a few query rows per kv head (up to kLanes rows of its query heads per task,
// tasks [t0, t1) of B * Hkv * ceil(group * Lq / kLanes)): the rows are the 16 lanes of a vector, so the
// scores are S^T = K Q^T with K read in place (one broadcast FMA per key and head-dim element for all
// rows), the online softmax runs down the keys without horizontal reductions, and P V reads V in
// place. Nothing is packed: the blocked forward packs K^T for every task, which a few rows cannot repay.
// An additive mask (the Problem's) is added to each block of S^T, transposed from the lanes' rows;
// dropout (the Problem's) drops P^T a key (16 rows) at a time with the same hash bits.
// Also for bf16 q, k, v (and out): each 64-key block is widened to float32 in L1, the softmax and both
// products run in float32 (P is not rounded), the output is rounded to bf16 once.
// Head dims: float32 as supports_tiles() (V's rows copied per block, padded, when dv is no multiple of
// 16), bf16 as supports().
constexpr int64_t kLanes = 16;
void forward_lanes(const Problem& p, int64_t t0, int64_t t1, float* out, float* lse);
void forward_lanes(const ProblemBf16& p, int64_t t0, int64_t t1, uint16_t* out, float* lse);

// bfloat16 forward on AMX tiles: q, k, v are bf16 (uint16 bits, rows at the Problem's strides); d a
// multiple of 32 up to 128, dv a multiple of 16 up to 64; causal and key lengths (the Problem's
// additive mask too, on vdpbf16ps: the caller keeps masked calls off AMX, untested there). S, P and
// the output accumulate in float32; P is rounded to bf16 for P V (as flash kernels do). out is bf16.
inline bool supports_amx(int64_t d, int64_t dv) {
  return d % 32 == 0 && d <= 128 && dv % 16 == 0 && dv >= 16 && dv <= 64;
}
constexpr int64_t kBlockQAmx = 64;  // query rows per bf16 forward task
void forward_amx(const ProblemBf16& p, int64_t t0, int64_t t1, uint16_t* out, float* lse);
// The same forward with the products on vdpbf16ps (AVX512-BF16 without AMX; same layouts), whose
// (P V)^T is not bound to four AMX accumulator tiles: head dims as supports(). It also takes dropout
// (the Problem's; P^T's kept entries scaled a key at a time, as forward_lanes does), which the AMX
// form is not given.
void forward_bf16_dot(const ProblemBf16& p, int64_t t0, int64_t t1, uint16_t* out, float* lse);

// The probabilities a forward multiplied V by (attention_weights). weights_pack packs scale K^T of kv
// heads [t0, t1) of B * Hkv into panels (ceil(Lk / 64) * d * 64 floats per head), once per call: every
// task reads them. weights runs tasks [t0, t1) of B * (average ? 1 : Hq) * ceil(Lq / block) (block:
// query rows per task, a multiple of 6 the caller picks); w is [B, Hq, Lq, Lk], or with average
// [B, Lq, Lk] summed over the query heads (times 1 / Hq) as it is made. lse [B, Hq, Lq] is the
// forward's. Each 6-row group recomputes S = Q K^T per 64-key block as a register tile and writes
// exp(S - lse) (masks, causal, key lengths and the dropout factor applied) straight from it. Head dim
// d as supports_tiles.
void weights_pack(const Problem& p, int64_t t0, int64_t t1, float* panels);
void weights(const Problem& p, const float* panels, const float* lse, bool average, int64_t block, int64_t t0,
             int64_t t1, float* w);

struct Grads {
  const float* grad_out = nullptr;  // [B, Hq, Lq, dv] contiguous
  const float* lse = nullptr;       // [B, Hq, Lq]
  const float* delta = nullptr;     // [B, Hq, Lq]: rowsum(grad_out * out)
  float* gq = nullptr;              // [B, Hq, Lq, d] contiguous, zero on entry
  float* gk = nullptr;              // [B, Hkv, Lk, d] contiguous, zero on entry
  float* gv = nullptr;              // [B, Hkv, Lk, dv] contiguous, zero on entry
  // nullptr, or where the scores' gradient dS is added: row (b, h, i) of keys at gmask + b * gmask_strides[0]
  // + h * gmask_strides[1] + i * gmask_strides[2] (strides 0 over the dimensions an attn_mask broadcasts).
  float* gmask = nullptr;
  int64_t gmask_strides[3] = {};
  // Key splits per kv head (see backward); with splits > 1, gq_parts holds splits - 1 more dQ
  // [B, Hq, Lq, d] (zero on entry) that the caller adds to gq.
  int64_t splits = 1;
  float* gq_parts = nullptr;
};

// The bf16 backward's operands: everything bf16 bits but lse, contiguous; the gradients are
// accumulated in float32 per task and written once, rounded (no zeroing needed on entry).
struct GradsBf16 {
  const uint16_t* grad_out = nullptr;  // [B, Hq, Lq, dv]
  const uint16_t* out = nullptr;       // [B, Hq, Lq, dv]: the forward's output (for rowsum(dO * O))
  const float* lse = nullptr;          // [B, Hq, Lq]
  uint16_t* gq = nullptr;              // [B, Hq, Lq, d]
  uint16_t* gk = nullptr;              // [B, Hkv, Lk, d]
  uint16_t* gv = nullptr;              // [B, Hkv, Lk, dv]
  // Key splits per kv head (as Grads); with splits > 1 each split writes its float32 dQ into gq_parts
  // ([splits, B, Hq, Lq, d]) instead of gq, and the caller sums and rounds them.
  int64_t splits = 1;
  float* gq_parts = nullptr;
};

// Backward tasks [t0, t1) of B * Hkv * splits: a task owns the 64-key blocks of one kv head that
// KeySplit gives it (the only writer of their dK / dV rows) and writes its query heads' dQ rows, split
// c > 0 into its own copy of dQ. Per 64-key block and 48 query rows: S and dP = dO V^T as register
// tiles, P and dS to L1, dQ += dS K per 6 rows, then dV += P^T dO and dK += dS^T Q.
void backward(const Problem& p, const Grads& g, int64_t t0, int64_t t1);

// Which of `splits` tasks owns key block jb of a kv head: the blocks dealt out in rounds of `splits`,
// every other round in reverse (0 1 1 0 0 1 ...), so that causal splits, whose later blocks meet fewer
// query rows, get about the same work. The backward parallelizes over batch x kv heads; where those
// are fewer than the threads (or leave a round half full), splitting each head's keys fills the team.
struct KeySplit {
  int64_t splits = 1, c = 0;
  bool owns(int64_t jb) const {
    const int64_t pos = jb % splits;
    return ((jb / splits) % 2 ? splits - 1 - pos : pos) == c;
  }
};

// The same backward for bf16 q, k, v and grad_out with its five products on vdpbf16ps (AVX512-BF16,
// where bf16_kernel() chose it): float32 accumulation and softmax, P and dS rounded to bf16 where they
// multiply (dS as two terms, see the .cpp); head dims as supports(); gradients rounded to bf16 once.
// Tasks and key splits as backward(); dropout as backward()'s (P Z rounded for dV).
void backward_bf16_dot(const ProblemBf16& p, const GradsBf16& g, int64_t t0, int64_t t1);

}  // namespace bigmodel::attention::fast
