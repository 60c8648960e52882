// Causal attention for one head of one sequence, written once against `Vec`. Keys and values come from the KV
// cache's blocks of kBlockCols (64) positions (see kernels.h), float32 or IEEE half, read through matmul's
// weight readers. Scores S = q @ K^T block by block (a prompt chunk: matmul's direct path over each key block;
// a decoding step's few rows: score_cols), masked softmax per row, then out = P @ V as one sum per value block
// added up block by block in order (a prompt chunk: matmul with accumulate; a few rows: value_cols, which does
// the same arithmetic), so decoding one token or verifying several gives the bits a prompt chunk does. Query
// rows go in chunks of ROW_CHUNK, each against only the keys its last row can see, which skips most of the
// masked upper triangle of a prompt. Row t sees keys 0..pos0+t; later keys in its chunk get probability
// exactly 0, which adds nothing to the sums, so the chunking changes no bit. One call is one (sequence, head)
// unit: the model spreads units over threads, so nothing here depends on the batch or the thread count.

constexpr int ROW_CHUNK = 64;
constexpr int NCMAX = 8;  // vectors of columns per pass of the few-rows loops: up to 8 independent FMA chains
static_assert(kBlockCols % Vec::width == 0, "a vector must not straddle two blocks");

// acc[v] += a[k] * (row k of column group v) for k = 0..K-1, row k of group v at bv[v] + k * ld. NC is a template
// argument so that the sums stay in registers (a run-time count spilled them to the stack). TAIL: the last
// group has only `rem` columns in memory.
template <class WR, int NC, bool TAIL>
inline void fma_rows(Vec::reg (&acc)[NC], const float* a, const typename WR::T* const (&bv)[NC], int64_t ld, int K,
                     int rem) {
  for (int k = 0; k < K; ++k) {
    const Vec::reg x = Vec::set1(a[k]);
    const int64_t off = k * ld;
    for (int v = 0; v < NC; ++v)
      acc[v] = Vec::fma(x, TAIL && v == NC - 1 ? WR::load_partial(bv[v] + off, rem) : WR::load(bv[v] + off), acc[v]);
  }
}

template <int NC>
inline void store_cols(float* d, const Vec::reg (&acc)[NC], int rem) {
  constexpr int W = Vec::width;
  for (int v = 0; v < NC - 1; ++v) Vec::store(d + v * W, acc[v]);
  if (rem < W) Vec::store_partial(d + (NC - 1) * W, acc[NC - 1], rem);
  else Vec::store(d + (NC - 1) * W, acc[NC - 1]);
}

// s[j0 .. j0 + (NC-1) W + rem) = q . key j, one chain over d = 0..hd-1 per key, the keys in blocks kb (whole
// 64-column blocks are allocated, so only the store is partial).
template <class WR, int NC>
inline void score_cols(float* s, const float* q, const typename WR::T* const* kb, int j0, int hd, int rem) {
  constexpr int W = Vec::width;
  Vec::reg acc[NC];
  const typename WR::T* bv[NC];
  for (int v = 0; v < NC; ++v) {
    acc[v] = Vec::zero();
    const int col = j0 + v * W;
    bv[v] = kb[col / kBlockCols] + col % kBlockCols;
  }
  fma_rows<WR, NC, false>(acc, q, bv, kBlockCols, hd, rem);
  store_cols<NC>(s + j0, acc, rem);
}

// o[c0 .. c0 + (NC-1) W + rem) = sum over keys j < n_keys of p[j] * value j: per value block one chain from
// zero over its keys, the blocks' sums added in order (what matmul_forward with accumulate does block by block).
template <class WR, int NC, bool TAIL>
inline void value_cols(float* o, const float* p, const typename WR::T* const* vb, int n_keys, int hd, int c0,
                       int rem) {
  constexpr int W = Vec::width;
  Vec::reg total[NC];
  for (int v = 0; v < NC; ++v) total[v] = Vec::zero();  // what no keys sum to (callers always have one)
  for (int b = 0; b * kBlockCols < n_keys; ++b) {
    Vec::reg acc[NC];
    const typename WR::T* bv[NC];
    for (int v = 0; v < NC; ++v) {
      acc[v] = Vec::zero();
      bv[v] = vb[b] + c0 + v * W;
    }
    const int rows = n_keys - b * kBlockCols < kBlockCols ? n_keys - b * kBlockCols : kBlockCols;
    fma_rows<WR, NC, TAIL>(acc, p + b * kBlockCols, bv, hd, rows, rem);
    for (int v = 0; v < NC; ++v) total[v] = b == 0 ? acc[v] : Vec::add(total[v], acc[v]);
  }
  store_cols<NC>(o + c0, total, rem);
}

// Calls F<NC>::run(args...) with NC = nc (1..NCMAX) as a compile-time constant.
template <template <int> class F, class... A>
inline void with_nc(int nc, A&&... args) {
  switch (nc) {
    case 1: return F<1>::run(args...);
    case 2: return F<2>::run(args...);
    case 3: return F<3>::run(args...);
    case 4: return F<4>::run(args...);
    case 5: return F<5>::run(args...);
    case 6: return F<6>::run(args...);
    case 7: return F<7>::run(args...);
    default: return F<8>::run(args...);
  }
}

template <class WR>
struct ScoreCols {
  template <int NC>
  struct F {
    static void run(float* s, const float* q, const typename WR::T* const* kb, int j0, int hd, int rem) {
      score_cols<WR, NC>(s, q, kb, j0, hd, rem);
    }
  };
};

template <class WR, bool TAIL>
struct ValueCols {
  template <int NC>
  struct F {
    static void run(float* o, const float* p, const typename WR::T* const* vb, int n_keys, int hd, int c0, int rem) {
      value_cols<WR, NC, TAIL>(o, p, vb, n_keys, hd, c0, rem);
    }
  };
};

template <class WR>
void attention_rows(float* out, const float* q, const typename WR::T* const* kb, const typename WR::T* const* vb,
                    int T, int pos0, int hd, int ld_q, int ld_out, float scale) {
  using R = Vec::reg;
  constexpr int W = Vec::width, PASS = NCMAX * W;
  const int n_keys = pos0 + T, n_blocks = (n_keys + kBlockCols - 1) / kBlockCols;
  float* S = scratch_floats(static_cast<int64_t>(T) * n_keys, 1);
  const bool few = T < matmul_detail::PACK_MIN_M;
  if (few) {
    for (int t = 0; t < T; ++t)
      for (int j0 = 0; j0 < n_keys; j0 += PASS) {
        const int width = n_keys - j0 < PASS ? n_keys - j0 : PASS, nc = (width + W - 1) / W;
        with_nc<ScoreCols<WR>::template F>(nc, S + static_cast<int64_t>(t) * n_keys, q + static_cast<int64_t>(t) * ld_q,
                                           kb, j0, hd, width - (nc - 1) * W);
      }
  } else {
    for (int b = 0; b < n_blocks; ++b) {
      const int cols = n_keys - b * kBlockCols < kBlockCols ? n_keys - b * kBlockCols : kBlockCols;
      matmul_detail::matmul_impl<WR>(S + b * kBlockCols, q, kb[b], true, nullptr, T, hd, cols, ld_q, n_keys, 0, false,
                                     false);
    }
  }
  const R vscale = Vec::set1(scale);
  for (int t = 0; t < T; ++t) {
    float* s = S + static_cast<int64_t>(t) * n_keys;
    const int valid = pos0 + t + 1;
    R vmx = Vec::set1(-INFINITY);
    int j = 0;
    for (; j + W <= valid; j += W) {
      R x = Vec::mul(Vec::load(s + j), vscale);
      Vec::store(s + j, x);
      vmx = Vec::max(vmx, x);
    }
    if (j < valid) {
      const int rem = valid - j;
      R x = Vec::mul(Vec::load_partial(s + j, rem), vscale);
      Vec::store_partial(s + j, x, rem);
      float tail[W];
      Vec::store(tail, x);
      for (int r = 0; r < rem; ++r) vmx = Vec::max(vmx, Vec::set1(tail[r]));
    }
    const float mx = Vec::reduce_max(vmx);
    const R m = Vec::set1(mx);
    R vsum = Vec::zero();
    j = 0;
    for (; j + W <= valid; j += W) {
      R e = vec_exp<Vec>(Vec::sub(Vec::load(s + j), m));
      Vec::store(s + j, e);
      vsum = Vec::add(vsum, e);
    }
    float sum = Vec::reduce_add(vsum);
    if (j < valid) {
      const int rem = valid - j;
      float tail[W];
      Vec::store(tail, vec_exp<Vec>(Vec::sub(Vec::load_partial(s + j, rem), m)));
      for (int r = 0; r < rem; ++r) {
        s[j + r] = tail[r];
        sum += tail[r];
      }
    }
    const R inv = Vec::set1(1.0f / sum);
    j = 0;
    for (; j + W <= valid; j += W) Vec::store(s + j, Vec::mul(Vec::load(s + j), inv));
    for (; j < valid; ++j) s[j] *= 1.0f / sum;
    for (j = valid; j < n_keys; ++j) s[j] = 0.0f;
  }
  if (few) {
    for (int t = 0; t < T; ++t)
      for (int c0 = 0; c0 < hd; c0 += PASS) {
        const int width = hd - c0 < PASS ? hd - c0 : PASS, nc = (width + W - 1) / W, rem = width - (nc - 1) * W;
        float* o = out + static_cast<int64_t>(t) * ld_out;
        const float* p = S + static_cast<int64_t>(t) * n_keys;
        if (rem < W) with_nc<ValueCols<WR, true>::template F>(nc, o, p, vb, n_keys, hd, c0, rem);
        else with_nc<ValueCols<WR, false>::template F>(nc, o, p, vb, n_keys, hd, c0, rem);
      }
  } else {
    // A value block [64][hd] with hd = 64 (every GPT-2 size) is a one-block [rows, 64] matrix of the blocked
    // layout: the direct path reads it in place instead of packing it.
    for (int b = 0; b < n_blocks; ++b) {
      const int rows = n_keys - b * kBlockCols < kBlockCols ? n_keys - b * kBlockCols : kBlockCols;
      matmul_detail::matmul_impl<WR>(out, S + b * kBlockCols, vb[b], hd == kBlockCols, nullptr, T, rows, hd, n_keys,
                                     ld_out, hd, b > 0, false);
    }
  }
}

template <class WR>
void attention_chunks(float* out, const float* q, const void* const* kb, const void* const* vb, int T, int pos0,
                      int hd, int ld_q, int ld_out, float scale) {
  const typename WR::T* kt[kMaxKVBlocks];
  const typename WR::T* vt[kMaxKVBlocks];
  for (int b = 0; b * kBlockCols < pos0 + T; ++b) {
    kt[b] = static_cast<const typename WR::T*>(kb[b]);
    vt[b] = static_cast<const typename WR::T*>(vb[b]);
  }
  for (int t0 = 0; t0 < T; t0 += ROW_CHUNK) {
    const int rows = T - t0 < ROW_CHUNK ? T - t0 : ROW_CHUNK;
    attention_rows<WR>(out + static_cast<int64_t>(t0) * ld_out, q + static_cast<int64_t>(t0) * ld_q, kt, vt, rows,
                       pos0 + t0, hd, ld_q, ld_out, scale);
  }
}

void attention_forward(float* out, const float* q, const void* const* kb, const void* const* vb, DType kv, int T,
                       int pos0, int hd, int ld_q, int ld_out, float scale) {
  if (kv == DType::f16) return attention_chunks<matmul_detail::F16W>(out, q, kb, vb, T, pos0, hd, ld_q, ld_out, scale);
  attention_chunks<matmul_detail::F32W>(out, q, kb, vb, T, pos0, hd, ld_q, ld_out, scale);
}

// out[0..n) = in rounded to IEEE half (nearest even, as every level rounds); returns max |in|, so that the
// caller can tell when a value did not fit (65520 and up round to infinity).
float to_f16(uint16_t* out, const float* in, int n) {
  using R = Vec::reg;
  constexpr int W = Vec::width;
  R mx = Vec::zero();
  int i = 0;
  for (; i + W <= n; i += W) {
    const R x = Vec::load(in + i);
    mx = Vec::max(mx, Vec::abs(x));
    Vec::store_f16(out + i, x);
  }
  float m = Vec::reduce_max(mx);
  for (; i < n; ++i) {
    out[i] = f32_to_f16(in[i]);
    m = std::fabs(in[i]) > m ? std::fabs(in[i]) : m;
  }
  return m;
}
