// The kernel table: one set of function pointers per instruction-set level, each compiled from the same
// ISA-neutral sources (matmul.inl, norms.inl, attention.inl, sampling.inl) against that level's Vec.
// All matrices are row-major float32. No kernel splits a reduction across threads or changes its
// summation order with M or the thread count, so a row's result never depends on what it is batched with.
#pragma once
#include <cstdint>

#include "cpu/isa.h"

namespace gptcpp {

enum class Activation { gelu_tanh, gelu_erf, quick_gelu, relu, silu, tanh, sigmoid, linear };

// How a weight matrix is stored. f16 / bf16 are widened to float32 exactly in registers, so their compute is
// float32. q8 is int8 symmetric in groups of kQuantGroup along k with an fp16 scale per group and column,
// multiplied against activations quantized the same way (qmatmul.inl); it exists only as a [K,N] matrix in
// qmatmul.inl's layout (the LM head too, as the transposed embedding [n_embd, vocab]).
// q4 is the same with 4-bit values (q in [-7, 7], stored + 8 as nibbles), the activations still int8; q6 with
// 6-bit values (q in [-31, 31], stored + 32 as a nibble and two more bits), the int4 format's LM head.
enum class DType { f32 = 0, f16 = 1, bf16 = 2, q8 = 3, q4 = 4, q6 = 5 };
struct WeightView {
  const void* data = nullptr;
  DType dtype = DType::f32;
  const uint16_t* group_scales = nullptr;  // q8 / q4 / q6 only: fp16 [ceil(N/64)][ceil(K/32)][64]
  // q8 / q4 / q6 only, optional: input channels (rows k, increasing) kept out of the int8 product, because the
  // activations and weights there are far larger than in the other channels (GPT-2's residual stream has a
  // few such channels) and would cost their groups' other members most of their precision. Their rows are
  // zero in the int8 weight and stored here instead, fp16 [n_outlier_rows][N], multiplied in float32.
  const int32_t* outlier_rows = nullptr;
  int n_outlier_rows = 0;
  const uint16_t* outlier_weights = nullptr;
  // f32/f16/bf16 [K,N] matrices: false for row-major (ldw apart), true for the blocked layout of matmul.inl
  // (column blocks of 64, each a contiguous [K][64] run, the last zero-padded; bf16 in k pairs, [K/2][64][2]
  // with an odd K's last pair zero-padded: see kBf16Rows). q8 is always blocked.
  bool blocked = false;
};
constexpr int kBlockCols = 64;
// Rows of K a blocked bf16 block stores: K rounded up to pairs. Block b starts at b * kBf16Rows(K) * 64, and
// element (k, c) of it sits at (k / 2) * 128 + 2 c + k % 2: the pairs vdpbf16ps and AMX tiles multiply, loaded as
// they are stored (the float paths widen a pair's halves by a shift and a mask).
constexpr int kBf16Rows(int K) { return K + (K & 1); }
constexpr int kQuantGroup = 32;
// The longest sequence attention takes, in KV blocks of kBlockCols positions (their list lives on the stack).
constexpr int kMaxKVBlocks = 256;

struct KernelTable {
  Isa isa;
  // out[M,N] = inp[M,K] @ weight[K,N] + bias[N]  (bias may be null); when accumulate, out += that instead.
  // weight is the Hugging Face Conv1D layout [in, out]; ldi / ldo / ldw are the row strides of inp / out /
  // weight (ldw > N: a window of a wider matrix, such as a head's transposed key cache).
  void (*matmul_forward)(float* out, const float* inp, WeightView weight, const float* bias, int M, int K, int N,
                         int ldi, int ldo, int ldw, bool accumulate);
  // out[M,N] = inp[M,K] @ weight[N,K]^T: the LM head over the (tied) token embedding table [vocab, n_embd].
  void (*matmul_nt_forward)(float* out, const float* inp, WeightView weight, int M, int K, int N, int ldo);
  // out[M,C] = (inp - mean) / sqrt(var + eps) * weight + bias, per row. out may equal inp.
  void (*layernorm_forward)(float* out, const float* inp, const float* weight, const float* bias, int M, int C,
                            float eps);
  // In place, n contiguous values.
  void (*activation_forward)(float* x, int64_t n, Activation act);
  // One attention head of one sequence, for T new query rows whose first row sits at position pos0:
  // out[t, :hd] = softmax(scale * q[t] . k[0..pos0+t]) @ v[0..pos0+t]. q and out rows are ld_q / ld_out
  // apart. Keys and values come in blocks of kBlockCols positions, block b holding positions 64 b ..: kb[b]
  // the keys transposed, [hd][64] (the blocked layout of a [hd, positions] weight, so that the scores are a
  // direct-path matrix product and a decoding step streams the block front to back), vb[b] the values
  // [64][hd]; positions past pos0 + T in the last block are never used (any values). Elements are float32
  // (kv f32) or IEEE half (kv f16), widened exactly on load. At most kMaxKVBlocks blocks.
  void (*attention_forward)(float* out, const float* q, const void* const* kb, const void* const* vb, DType kv,
                            int T, int pos0, int hd, int ld_q, int ld_out, float scale);
  // out[0..n) = in rounded to IEEE half, nearest even; returns max |in| (65520 and up became infinity).
  float (*to_f16)(uint16_t* out, const float* in, int n);
  // max and log(sum(exp(x - max))) of n values: the log-softmax normaliser of a logits row.
  void (*logsumexp)(const float* x, int n, float* max_out, float* lse_out);
  // Sum of n floats, read as fast as the core can load them (the bandwidth probe's inner loop).
  float (*read_sum)(const float* x, int64_t n);
};

const KernelTable& kernels_for(Isa isa);
// The table of the currently selected level (selected_isa()).
const KernelTable& kernels();

}  // namespace gptcpp

namespace gptcpp {
// A per-thread scratch buffer of at least n floats, valid until the same thread asks for the same slot
// again (slot 0: matmul internals, slot 1: attention scores, slot 2: int8 activations, which the calling
// thread's team shares). Defined in portable code so that no
// ISA-specific copy of a standard-library template can leak into the others.
float* scratch_floats(int64_t n, int slot);

// The OpenMP team size and this thread's index in it (1 and 0 when built without OpenMP), and the size of the
// team a region started here would have (1 inside a region: regions do not nest).
int thread_count();
int thread_index();
int next_team_size();
}  // namespace gptcpp
