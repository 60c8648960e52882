// The GPT-2 forward pass over a batch of sequences, each with its own KV cache.
//
// Weights are borrowed pointers owned by the caller: matrices in the Hugging Face layout (Conv1D [in, out];
// wte [vocab, n_embd]) or, as the Python loader passes them, in the kernels' blocked layout (memory-mapped
// in place from a checkpoint written by gptcpp quantize). One forward() call runs all the new
// tokens of all sequences through each layer as one matrix, then attention per (sequence, head).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/kernels.h"

namespace gptcpp {

struct GPT2Config {
  int vocab_size = 50257;
  int n_positions = 1024;
  int n_embd = 768;
  int n_layer = 12;
  int n_head = 12;
  int n_inner = 3072;
  float layer_norm_epsilon = 1e-5f;
  Activation activation = Activation::gelu_tanh;
  bool scale_attn_weights = true;
  bool scale_attn_by_inverse_layer_idx = false;
  // How the KV cache stores keys and values: f32, or f16 (half the bytes a decoding step reads; the Python
  // layer picks it for the narrow weight formats).
  DType kv_dtype = DType::f32;
  int head_dim() const { return n_embd / n_head; }
};

// Matrices may be stored as f32, f16, bf16 or int8 (WeightView); norms, biases and wpe are always float32.
struct LayerWeights {
  const float *ln_1_weight, *ln_1_bias;
  WeightView attn_weight;  // c_attn: [n_embd, 3 n_embd]
  const float* attn_bias;
  WeightView attn_proj_weight;  // attn.c_proj: [n_embd, n_embd]
  const float* attn_proj_bias;
  const float *ln_2_weight, *ln_2_bias;
  WeightView fc_weight;  // mlp.c_fc: [n_embd, n_inner]
  const float* fc_bias;
  WeightView mlp_proj_weight;  // mlp.c_proj: [n_inner, n_embd]
  const float* mlp_proj_bias;
};

struct GPT2Weights {
  WeightView wte;  // [vocab, n_embd] row-major, or (blocked; q8 always) transposed, [n_embd, vocab] (see embedding_row)
  const float* wpe = nullptr;  // [n_positions, n_embd]
  std::vector<LayerWeights> layers;
  const float *ln_f_weight = nullptr, *ln_f_bias = nullptr;
  WeightView lm_head;  // as wte; == wte when tied
};

// 64 (kBlockCols) positions of every layer's and head's keys and values: the unit of KV memory. Per (layer,
// head), keys transposed [head_dim][64] (the blocked layout attention_forward reads: the scores q @ K^T are a
// direct-path product, and a decoding step streams the block front to back) and values [64][head_dim];
// elements float32 or IEEE half (config.kv_dtype).
struct KVBlock {
  std::unique_ptr<char[]> k, v;
};

// Keys and values of one sequence: its blocks, held by shared pointer so that a prefix can be shared read-only
// between sequences (the prefix cache, beams) and is freed with its last holder. A cache writes only into
// blocks it alone holds: prepare_append allocates the blocks of new positions and copies a block still shared
// before it is written. length is how many positions are filled; capacity bounds it.
class KVCache {
 public:
  KVCache(const GPT2Config& config, int capacity);
  int capacity() const { return capacity_; }
  int length() const { return length_; }
  DType dtype() const { return dtype_; }
  // Forgets positions from n on (rollback after rejected speculation).
  void truncate(int n);
  // Makes this cache's first n positions those of other (same model, n <= other.length()), sharing its blocks
  // instead of copying them; nothing of this cache's own is kept.
  void share_prefix_from(const KVCache& other, int n);
  // Lets go of every block (length 0).
  void clear();
  // Makes positions length .. length + n - 1 writable (allocated, held by this cache alone). Not thread-safe:
  // the model calls it for every sequence before a forward pass writes.
  void prepare_append(int n);
  // Block b (positions 64 b ..) of (layer, head): keys [head_dim][64], values [64][head_dim]. The block must be
  // held: b below ceil(length / 64), or made writable by prepare_append.
  void* keys(int layer, int head, int b) { return blocks_[b]->k.get() + offset(layer, head); }
  void* values(int layer, int head, int b) { return blocks_[b]->v.get() + offset(layer, head); }
  const void* keys(int layer, int head, int b) const { return blocks_[b]->k.get() + offset(layer, head); }
  const void* values(int layer, int head, int b) const { return blocks_[b]->v.get() + offset(layer, head); }
  void set_length(int n) { length_ = n; }
  // Blocks this cache holds, and how many of them it shares with another cache (for tests and accounting).
  int blocks_held() const;
  int blocks_shared() const;

 private:
  int64_t offset(int layer, int head) const {  // in bytes, within a block's k or v
    return (static_cast<int64_t>(layer) * n_head_ + head) * head_dim_ * kBlockCols * elem_;
  }
  int n_layer_, n_head_, head_dim_, capacity_, length_ = 0;
  DType dtype_;
  int elem_;             // bytes per element
  int64_t block_bytes_;  // of a block's k (and of its v)
  std::vector<std::shared_ptr<KVBlock>> blocks_;  // ceil(capacity / 64) slots
};

// One sequence's share of a forward pass: its cache, the new tokens to append, and which logits it wants.
struct ForwardItem {
  KVCache* cache;
  const int32_t* tokens;
  int n_tokens;
  int n_logits;  // logits for the last n_logits new positions (1: next-token only; n_tokens: all)
};

class GPT2Model {
 public:
  GPT2Model(const GPT2Config& config, const GPT2Weights& weights);
  const GPT2Config& config() const { return config_; }
  // Logit rows, in item order: n_logits rows per item.
  static int64_t logit_rows(const std::vector<ForwardItem>& items);
  // Runs the items' new tokens through the model, appending to their caches, and writes logit rows
  // [logit_rows(items), vocab] into logits. Throws std::invalid_argument (bad token id) or
  // std::length_error (context or cache capacity exceeded) before touching any cache.
  // When hidden is not null it receives the final-layer-normed hidden state of the same rows.
  void forward(const std::vector<ForwardItem>& items, float* logits, float* hidden = nullptr) const;
  // Number of OpenMP threads a forward pass uses (0: the OpenMP default).
  void set_threads(int n) { threads_ = n; }
  int threads() const { return threads_; }

 private:
  GPT2Config config_;
  GPT2Weights weights_;
  int threads_ = 0;
};

}  // namespace gptcpp
