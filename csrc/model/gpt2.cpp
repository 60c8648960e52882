#include "model/gpt2.h"

#include "cpu/half.h"
#include "cpu/parallel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gptcpp {

namespace {

// One row of the token embedding table, widened to float32. The table is usually stored transposed for the
// LM head, [n_embd, vocab] in the matrix kernels' blocked layout (f32/f16: [vocab/64][n_embd][64]; bf16 in k
// pairs, [vocab/64][n_embd/2][64][2]; q8: qmatmul.inl's), so a token's row is its column there, one element
// every 64 (bf16: a pair every 128; q8: byte k%4 of column token%64 in quad k/4 of block token/64, times the
// fp16 scale of its group; q6: its nibble and top bits the same way). A row-major [vocab, n_embd] table
// (passed as it is in a checkpoint) is read directly.
template <class T, class Widen>
void table_row(float* out, const T* data, bool blocked, int32_t token, int C, Widen widen) {
  if (!blocked) {
    const T* p = data + static_cast<int64_t>(token) * C;
    for (int j = 0; j < C; ++j) out[j] = widen(p[j]);
    return;
  }
  const T* p = data + static_cast<int64_t>(token / kBlockCols) * C * kBlockCols + token % kBlockCols;
  for (int j = 0; j < C; ++j) out[j] = widen(p[static_cast<int64_t>(j) * kBlockCols]);
}

void bf16_pairs_table_row(float* out, const uint16_t* data, int32_t token, int C) {
  const uint16_t* p = data + static_cast<int64_t>(token / kBlockCols) * kBf16Rows(C) * kBlockCols + 2 * (token % kBlockCols);
  for (int j = 0; j < C; ++j) out[j] = bf16_to_f32(p[static_cast<int64_t>(j / 2) * 2 * kBlockCols + j % 2]);
}

void embedding_row(float* out, const WeightView& wte, int32_t token, int C, int vocab) {
  switch (wte.dtype) {
    case DType::f32:
      table_row(out, static_cast<const float*>(wte.data), wte.blocked, token, C, [](float v) { return v; });
      break;
    case DType::f16:
      table_row(out, static_cast<const uint16_t*>(wte.data), wte.blocked, token, C, f16_to_f32);
      break;
    case DType::bf16:
      if (wte.blocked)
        bf16_pairs_table_row(out, static_cast<const uint16_t*>(wte.data), token, C);
      else
        table_row(out, static_cast<const uint16_t*>(wte.data), false, token, C, bf16_to_f32);
      break;
    case DType::q4:
      throw std::invalid_argument("an int4 token embedding is not supported");  // refused at load already
    case DType::q8: {
      const int Kp = (C + kQuantGroup - 1) / kQuantGroup * kQuantGroup, col = token % kBlockCols;
      const int8_t* q = static_cast<const int8_t*>(wte.data) + static_cast<int64_t>(token / kBlockCols) * Kp * kBlockCols;
      const uint16_t* s = wte.group_scales + static_cast<int64_t>(token / kBlockCols) * (Kp / kQuantGroup) * kBlockCols;
      for (int j = 0; j < C; ++j)
        out[j] = static_cast<float>(q[(j / 4 * kBlockCols + col) * 4 + j % 4]) * f16_to_f32(s[j / kQuantGroup * kBlockCols + col]);
      break;
    }
    case DType::q6: {  // per 16 k: the nibble rows of quads 0-1 and 2-3, then the top bits of all four
      const int Kp = (C + kQuantGroup - 1) / kQuantGroup * kQuantGroup, col = token % kBlockCols;
      const uint8_t* q = static_cast<const uint8_t*>(wte.data) +
                         static_cast<int64_t>(token / kBlockCols) * Kp * kBlockCols * 6 / 8;  // 6 bits a weight
      const uint16_t* s = wte.group_scales + static_cast<int64_t>(token / kBlockCols) * (Kp / kQuantGroup) * kBlockCols;
      for (int j = 0; j < C; ++j) {
        const int quad = j % 16 / 4;
        const uint8_t* rows = q + (j / 16 * 3) * kBlockCols * 4 + col * 4 + j % 4;
        const int nibble = (rows[quad / 2 * kBlockCols * 4] >> (quad % 2 * 4)) & 15;
        const int top = (rows[2 * kBlockCols * 4] >> (2 * quad)) & 3;
        out[j] = static_cast<float>((nibble | top << 4) - 32) * f16_to_f32(s[j / kQuantGroup * kBlockCols + col]);
      }
      break;
    }
  }
  for (int j = 0; j < wte.n_outlier_rows; ++j)  // q8 / q6: channels stored apart, fp16 [n][vocab]
    out[wte.outlier_rows[j]] = f16_to_f32(wte.outlier_weights[static_cast<int64_t>(j) * vocab + token]);
}

}  // namespace

KVCache::KVCache(const GPT2Config& config, int capacity)
    : n_layer_(config.n_layer), n_head_(config.n_head), head_dim_(config.head_dim()), capacity_(capacity),
      dtype_(config.kv_dtype), elem_(config.kv_dtype == DType::f16 ? 2 : 4),
      block_bytes_(static_cast<int64_t>(config.n_layer) * config.n_head * config.head_dim() * kBlockCols * elem_) {
  if (capacity <= 0 || capacity > config.n_positions)
    throw std::length_error("KV cache capacity " + std::to_string(capacity) + " is outside 1.." +
                            std::to_string(config.n_positions) + " (n_positions)");
  if (dtype_ != DType::f32 && dtype_ != DType::f16) throw std::invalid_argument("a KV cache holds f32 or f16");
  blocks_.resize((capacity + kBlockCols - 1) / kBlockCols);
}

void KVCache::truncate(int n) {
  if (n < 0 || n > length_) throw std::out_of_range("cannot truncate a KV cache of length " +
                                                    std::to_string(length_) + " to " + std::to_string(n));
  length_ = n;
}

void KVCache::share_prefix_from(const KVCache& other, int n) {
  if (other.n_layer_ != n_layer_ || other.n_head_ != n_head_ || other.head_dim_ != head_dim_ || other.dtype_ != dtype_)
    throw std::invalid_argument("KV caches of different models");
  if (n > other.length_ || n > capacity_) throw std::length_error("prefix longer than the cache");
  const int used = (n + kBlockCols - 1) / kBlockCols;
  for (int b = 0; b < static_cast<int>(blocks_.size()); ++b) blocks_[b] = b < used ? other.blocks_[b] : nullptr;
  length_ = n;
}

void KVCache::clear() {
  for (auto& b : blocks_) b.reset();
  length_ = 0;
}

void KVCache::prepare_append(int n) {
  if (n <= 0) return;
  for (int b = length_ / kBlockCols; b <= (length_ + n - 1) / kBlockCols; ++b) {
    std::shared_ptr<KVBlock>& slot = blocks_[b];
    if (slot && slot.use_count() == 1) continue;
    auto fresh = std::make_shared<KVBlock>();
    fresh->k.reset(new char[block_bytes_]);
    fresh->v.reset(new char[block_bytes_]);
    if (slot) {  // shared: copy the positions filled so far (keys whole: [head_dim][64] rows are interleaved)
      const int filled = std::clamp(length_ - b * kBlockCols, 0, kBlockCols);  // 0: a block past a truncation
      std::memcpy(fresh->k.get(), slot->k.get(), block_bytes_);
      const int64_t per_head = static_cast<int64_t>(head_dim_) * kBlockCols * elem_;
      for (int64_t h = 0; h < static_cast<int64_t>(n_layer_) * n_head_; ++h)
        std::memcpy(fresh->v.get() + h * per_head, slot->v.get() + h * per_head,
                    static_cast<size_t>(filled) * head_dim_ * elem_);
    }
    slot = std::move(fresh);
  }
}

int KVCache::blocks_held() const {
  int n = 0;
  for (const auto& b : blocks_) n += b != nullptr;
  return n;
}

int KVCache::blocks_shared() const {
  int n = 0;
  for (const auto& b : blocks_) n += b != nullptr && b.use_count() > 1;
  return n;
}

GPT2Model::GPT2Model(const GPT2Config& config, const GPT2Weights& weights) : config_(config), weights_(weights) {
  if (config.n_embd % config.n_head != 0)
    throw std::invalid_argument("n_embd must be divisible by n_head");
  if (config.n_positions > kMaxKVBlocks * kBlockCols)
    throw std::invalid_argument("n_positions above " + std::to_string(kMaxKVBlocks * kBlockCols) + " is not supported");
  if (static_cast<int>(weights.layers.size()) != config.n_layer)
    throw std::invalid_argument("weights have a different number of layers than n_layer");
}

int64_t GPT2Model::logit_rows(const std::vector<ForwardItem>& items) {
  int64_t rows = 0;
  for (const auto& it : items) rows += it.n_logits;
  return rows;
}

void GPT2Model::forward(const std::vector<ForwardItem>& items, float* logits, float* hidden) const {
  const GPT2Config& c = config_;
  const int C = c.n_embd, H = c.n_head, hd = c.head_dim(), I = c.n_inner, V = c.vocab_size;
  int M = 0;
  for (const auto& it : items) {
    if (it.n_tokens <= 0) throw std::invalid_argument("a sequence in the batch has no new tokens");
    if (it.n_logits < 0 || it.n_logits > it.n_tokens) throw std::invalid_argument("n_logits outside 0..n_tokens");
    const int end = it.cache->length() + it.n_tokens;
    if (end > c.n_positions)
      throw std::length_error("sequence of " + std::to_string(end) + " tokens exceeds n_positions (" +
                              std::to_string(c.n_positions) + ")");
    if (end > it.cache->capacity())
      throw std::length_error("sequence of " + std::to_string(end) + " tokens exceeds its KV cache capacity (" +
                              std::to_string(it.cache->capacity()) + ")");
    for (int t = 0; t < it.n_tokens; ++t)
      if (it.tokens[t] < 0 || it.tokens[t] >= V)
        throw std::invalid_argument("token id " + std::to_string(it.tokens[t]) + " is outside the vocabulary (0.." +
                                    std::to_string(V - 1) + ")");
    M += it.n_tokens;
  }
  if (M == 0) return;
  for (const auto& it : items) it.cache->prepare_append(it.n_tokens);  // blocks to write, none shared
#ifdef _OPENMP
  if (threads_ > 0) omp_set_num_threads(threads_);
#endif
  const KernelTable& K = kernels();

  // Activations in per-thread buffers that only grow: a decoding step allocates (and the OS zeroes) nothing.
  // Every element a step reads is written by that step first. The names below are references bound here, in
  // the calling thread, so that the parallel regions use its buffers, not each worker's own thread_local copy.
  thread_local std::vector<float> buffers[5];
  std::vector<float>&x = buffers[0], &ln = buffers[1], &qkv = buffers[2], &att = buffers[3], &fc = buffers[4];
  const int64_t batch_rows = M;
  for (auto [buf, n] : {std::pair<std::vector<float>*, int64_t>{&x, batch_rows * C}, {&ln, batch_rows * C},
                        {&qkv, batch_rows * 3 * C}, {&att, batch_rows * C}, {&fc, batch_rows * I}})
    if (static_cast<int64_t>(buf->size()) < n) buf->resize(n);
  // Row r of the batch belongs to item row_item[r] at position row_pos[r].
  std::vector<int> item_row0(items.size());
  {
    int r = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      item_row0[i] = r;
      const auto& it = items[i];
      for (int t = 0; t < it.n_tokens; ++t, ++r) {
        const float* pe = weights_.wpe + static_cast<int64_t>(it.cache->length() + t) * C;
        float* xr = x.data() + static_cast<int64_t>(r) * C;
        embedding_row(xr, weights_.wte, it.tokens[t], C, config_.vocab_size);
        for (int j = 0; j < C; ++j) xr[j] += pe[j];
      }
    }
  }
  // Attention work units: (sequence, head, chunk of query rows). Chunks match the kernel's own row chunking,
  // so splitting here changes no arithmetic; it only gives many threads enough units for one long prompt.
  constexpr int kRowsPerUnit = 64;
  struct Unit { int item, head, t0, rows; };
  std::vector<Unit> units;
  for (size_t i = 0; i < items.size(); ++i)
    for (int h = 0; h < H; ++h)
      for (int t0 = 0; t0 < items[i].n_tokens; t0 += kRowsPerUnit)
        units.push_back({static_cast<int>(i), h, t0, std::min(kRowsPerUnit, items[i].n_tokens - t0)});
  const int n_units = static_cast<int>(units.size());
  // Decoding a batch, a unit's keys and values are a few tens of KB that the other sequences have evicted since
  // the last step (all of them: 85 MB a step for 16 sequences of gpt2 at 72 positions), and each is a fresh
  // stream the hardware prefetcher ramps up on late; so a thread asks for its next unit's lines (only those
  // attention reads) while it computes this one. Measured on gpt2 int8, batch 16: +3% tokens per second.
  constexpr int kDecodingRows = 8;  // fewer rows a sequence: one unit each per head, unit i * H + h
  static_assert(kDecodingRows <= kRowsPerUnit, "a decoding step's unit u must be key/value task u");
  bool decoding = true;
  for (const Unit& un : units) decoding = decoding && un.rows < kDecodingRows;
  const bool half = c.kv_dtype == DType::f16;
  const int elem = half ? 2 : 4;
  auto prefetch_unit = [&](const Unit& un, int layer) {
    const auto& it = items[un.item];
    const int n_keys = it.cache->length() + un.t0 + un.rows;
    for (int b = 0; b * kBlockCols < n_keys; ++b) {  // each block: its key rows' first n_keys - 64 b columns
      const char* k = static_cast<const char*>(it.cache->keys(layer, un.head, b));
      const char* v = static_cast<const char*>(it.cache->values(layer, un.head, b));
      const int cols = std::min(kBlockCols, n_keys - b * kBlockCols);
      for (int d = 0; d < hd; ++d)
        for (int64_t x = 0; x < static_cast<int64_t>(cols) * elem; x += 64)
          __builtin_prefetch(k + static_cast<int64_t>(d) * kBlockCols * elem + x, 0, 2);
      for (int64_t x = 0; x < static_cast<int64_t>(cols) * hd * elem; x += 64) __builtin_prefetch(v + x, 0, 2);
    }
  };
  for (int l = 0; l < c.n_layer; ++l) {
    const LayerWeights& w = weights_.layers[l];
    K.layernorm_forward(ln.data(), x.data(), w.ln_1_weight, w.ln_1_bias, M, C, c.layer_norm_epsilon);
    K.matmul_forward(qkv.data(), ln.data(), w.attn_weight, w.attn_bias, M, C, 3 * C, C, 3 * C, 3 * C, false);
    // Append this layer's new keys and values to each sequence's cache, one (sequence, head) per task: for
    // a long prompt the transposed key writes are scattered enough to be worth both cores.
    const int n_kv = static_cast<int>(items.size()) * H;
    // The largest magnitude written, as a max-reduction (the half cache refuses one beyond its range).
    auto write_kv = [&](int task) {
      float kv_max = 0.0f;
      const int i = task / H, h = task % H;
      const auto& it = items[i];
      for (int t = 0; t < it.n_tokens; ++t) {
        const float* row = qkv.data() + static_cast<int64_t>(item_row0[i] + t) * 3 * C;
        const int pos = it.cache->length() + t;
        const float* krow = row + C + h * hd;
        const float* vrow = row + 2 * C + h * hd;
        // Keys go to column pos % 64 of their block's [head_dim][64], values to row pos % 64 of its [64][head_dim].
        const int b = pos / kBlockCols, col = pos % kBlockCols;
        if (half) {
          uint16_t* kt = static_cast<uint16_t*>(it.cache->keys(l, h, b)) + col;
          for (int d0 = 0; d0 < hd; d0 += 64) {  // converted 64 at a time, then scattered down the column
            uint16_t k16[64];
            const int n = std::min(64, hd - d0);
            kv_max = std::max(kv_max, K.to_f16(k16, krow + d0, n));
            for (int d = 0; d < n; ++d) kt[static_cast<int64_t>(d0 + d) * kBlockCols] = k16[d];
          }
          kv_max = std::max(kv_max, K.to_f16(static_cast<uint16_t*>(it.cache->values(l, h, b)) +
                                                 static_cast<int64_t>(col) * hd, vrow, hd));
        } else {
          float* kt = static_cast<float*>(it.cache->keys(l, h, b)) + col;
          for (int d = 0; d < hd; ++d) kt[static_cast<int64_t>(d) * kBlockCols] = krow[d];
          std::memcpy(static_cast<float*>(it.cache->values(l, h, b)) + static_cast<int64_t>(col) * hd, vrow,
                      sizeof(float) * hd);
        }
      }
      return kv_max;
    };
    // A decoding step's units are one per (sequence, head), task order: each writes its own keys and values
    // just before its attention, inside the attention's team. Written here, in the calling thread, they took
    // 140 us of a 7.4 ms gpt2 int4 token (Zen 3, 2 threads: a scattered store per key element, each a miss
    // while the other thread waits); in the team, keys, values and attention 470 -> 380 us a token.
    float kv_max = 0.0f;
    auto check_kv = [&] {
      if (half && !(kv_max < 65520.0f))
        throw std::overflow_error("a key or value of layer " + std::to_string(l) + " is " + std::to_string(kv_max) +
                                  ", beyond float16's range (65504): use kv_cache_dtype='fp32' for this model");
    };
    if (!decoding) {
      if (M * C > 65536) {
#pragma omp parallel for schedule(static) reduction(max : kv_max)
        for (int task = 0; task < n_kv; ++task) kv_max = std::max(kv_max, write_kv(task));
      } else {  // outside the OpenMP runtime: see cpu/parallel.h
        for (int task = 0; task < n_kv; ++task) kv_max = std::max(kv_max, write_kv(task));
      }
      check_kv();
    }
    float scale = c.scale_attn_weights ? 1.0f / std::sqrt(static_cast<float>(hd)) : 1.0f;
    if (c.scale_attn_by_inverse_layer_idx) scale /= static_cast<float>(l + 1);
    auto run_unit = [&](int u) {
      const Unit& un = units[u];
      const auto& it = items[un.item];
      const int64_t r0 = item_row0[un.item] + un.t0;
      const int n_blocks = (it.cache->length() + un.t0 + un.rows + kBlockCols - 1) / kBlockCols;
      const void* kb[kMaxKVBlocks];
      const void* vb[kMaxKVBlocks];
      for (int b = 0; b < n_blocks; ++b) {
        kb[b] = it.cache->keys(l, un.head, b);
        vb[b] = it.cache->values(l, un.head, b);
      }
      K.attention_forward(att.data() + r0 * C + un.head * hd, qkv.data() + r0 * 3 * C + un.head * hd, kb, vb,
                          c.kv_dtype, un.rows, it.cache->length() + un.t0, hd, 3 * C, C, scale);
    };
    if (decoding) {  // units of equal cost, shared with stealing (see matmul.inl's STEAL_MAX_M), each thread
                     // prefetching the unit after the one it runs, usually its next
      StealingRanges ranges(n_units, 2);
      parallel_region_if(n_units > 1, [&](int t, int nt) {
        float thread_kv_max = 0.0f;
        ranges.run(t, nt, [&](int64_t u0, int64_t u1) {
          for (int64_t u = u0; u < u1; ++u) {
            if (u + 1 < n_units) prefetch_unit(units[u + 1], l);
            thread_kv_max = std::max(thread_kv_max, write_kv(static_cast<int>(u)));  // unit u is task u
            run_unit(static_cast<int>(u));
          }
        });
#pragma omp critical(gptcpp_kv_max)
        kv_max = std::max(kv_max, thread_kv_max);
      });
      check_kv();  // (a throw inside the team would end the process)
    } else {  // a prompt's chunks cost more the later they sit: taken as threads come free
#pragma omp parallel for schedule(dynamic, 1) if (n_units > 1)
      for (int u = 0; u < n_units; ++u) run_unit(u);
    }
    K.matmul_forward(x.data(), att.data(), w.attn_proj_weight, w.attn_proj_bias, M, C, C, C, C, C, true);
    K.layernorm_forward(ln.data(), x.data(), w.ln_2_weight, w.ln_2_bias, M, C, c.layer_norm_epsilon);
    K.matmul_forward(fc.data(), ln.data(), w.fc_weight, w.fc_bias, M, C, I, C, I, I, false);
    K.activation_forward(fc.data(), static_cast<int64_t>(M) * I, c.activation);
    K.matmul_forward(x.data(), fc.data(), w.mlp_proj_weight, w.mlp_proj_bias, M, I, C, I, C, C, true);
  }
  for (const auto& it : items) it.cache->set_length(it.cache->length() + it.n_tokens);

  // Final layer norm and LM head only on the rows whose logits are wanted.
  const int64_t rows = logit_rows(items);
  float* sel = ln.data();  // rows <= M, so ln has room
  {
    int64_t r = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      const auto& it = items[i];
      const int first = it.n_tokens - it.n_logits;
      for (int t = first; t < it.n_tokens; ++t, ++r)
        std::memcpy(sel + r * C, x.data() + static_cast<int64_t>(item_row0[i] + t) * C, sizeof(float) * C);
    }
  }
  K.layernorm_forward(sel, sel, weights_.ln_f_weight, weights_.ln_f_bias, static_cast<int>(rows), C,
                      c.layer_norm_epsilon);
  if (hidden) std::memcpy(hidden, sel, sizeof(float) * rows * C);
  // A blocked (transposed) table is an ordinary [n_embd, vocab] matrix: the direct path's tiles read it at
  // every row count (at 16 rows fp32 3.7 ms instead of 6.7 with row dot products, gpt2 vocab, Zen 5, 2 threads).
  if (logits && weights_.lm_head.blocked)
    K.matmul_forward(logits, sel, weights_.lm_head, nullptr, static_cast<int>(rows), C, V, C, V, V, false);
  else if (logits)
    K.matmul_nt_forward(logits, sel, weights_.lm_head, static_cast<int>(rows), C, V, V);
}

}  // namespace gptcpp
