// Causal attention for one head of one sequence, written once against `Vec`. Keys and values are float32 or
// IEEE half (the KV cache of the narrow weight formats), read through matmul's weight readers.
// Scores and the weighted sum of V are both matrix products: S = q @ kt through matmul's direct path over the
// blocked keys (see kernels.h; a decoding step's few rows through few_rows_product), masked softmax per row,
// then out = P @ v. Query rows go in chunks of ROW_CHUNK, each against only the keys its last row can see,
// which skips most of the masked upper triangle of a prompt. Row t sees keys 0..pos0+t; later keys in its
// chunk get probability exactly 0, which adds nothing to the FMA chains of P @ v, so the chunking changes no
// bit. One call is one (sequence, head) unit: the model spreads units over threads, so nothing here depends
// on the batch or the thread count.

constexpr int ROW_CHUNK = 64;

// The two products for the few rows of a decoding step (T below the matmul's packing threshold), with the sums
// in registers: dst[t][j] = sum over k of a[t][k] * b[k][j] as one fma chain over k = 0..K-1 from zero per
// element, which is exactly what matmul_forward computes for these shapes, so decoding one token or verifying
// several gives the bits a prompt chunk does. b is row-major (rows ldb apart) or, when blocked, in the blocked
// layout of kernels.h (column blocks of kBlockCols, each [K][kBlockCols], whole blocks allocated): a block is
// then read front to back.

// NC vectors of columns of one row, their W-wide column groups starting at bv[0..NC-1] (row k at + k * ld).
// NC is a template argument so that the sums stay in registers (a runtime count spilled them to the stack);
// up to 8 independent chains hide the FMA latency. TAIL: the last vector has only `rem` columns in memory
// (row-major b); blocked b has whole blocks, so only the store is partial.
template <class WR, int NC, bool TAIL>
inline void few_rows_cols(float* d, const float* at, const typename WR::T* const* bv, int64_t ld, int K, int rem) {
  using R = Vec::reg;
  constexpr int W = Vec::width;
  R acc[NC];
  for (int v = 0; v < NC; ++v) acc[v] = Vec::zero();
  for (int k = 0; k < K; ++k) {
    const R x = Vec::set1(at[k]);
    const int64_t off = k * ld;
    for (int v = 0; v < NC; ++v)
      acc[v] = Vec::fma(x, TAIL && v == NC - 1 ? WR::load_partial(bv[v] + off, rem) : WR::load(bv[v] + off), acc[v]);
  }
  for (int v = 0; v < NC - 1; ++v) Vec::store(d + v * W, acc[v]);
  if (rem < W) Vec::store_partial(d + (NC - 1) * W, acc[NC - 1], rem);
  else Vec::store(d + (NC - 1) * W, acc[NC - 1]);
}

template <class WR, bool TAIL>
inline void few_rows_dispatch(int nc, float* d, const float* at, const typename WR::T* const* bv, int64_t ld, int K,
                              int rem) {
  switch (nc) {
    case 1: return few_rows_cols<WR, 1, TAIL>(d, at, bv, ld, K, rem);
    case 2: return few_rows_cols<WR, 2, TAIL>(d, at, bv, ld, K, rem);
    case 3: return few_rows_cols<WR, 3, TAIL>(d, at, bv, ld, K, rem);
    case 4: return few_rows_cols<WR, 4, TAIL>(d, at, bv, ld, K, rem);
    case 5: return few_rows_cols<WR, 5, TAIL>(d, at, bv, ld, K, rem);
    case 6: return few_rows_cols<WR, 6, TAIL>(d, at, bv, ld, K, rem);
    case 7: return few_rows_cols<WR, 7, TAIL>(d, at, bv, ld, K, rem);
    default: return few_rows_cols<WR, 8, TAIL>(d, at, bv, ld, K, rem);
  }
}

template <class WR>
inline void few_rows_product(float* dst, int ldd, const float* a, int lda, const typename WR::T* b, int ldb,
                             bool blocked, int T, int K, int N) {
  constexpr int W = Vec::width, NCMAX = 8;
  static_assert(kBlockCols % W == 0, "a vector must not straddle two blocks");
  const int64_t ld = blocked ? kBlockCols : ldb;
  for (int t = 0; t < T; ++t) {
    const float* at = a + static_cast<int64_t>(t) * lda;
    float* d = dst + static_cast<int64_t>(t) * ldd;
    for (int j0 = 0; j0 < N; j0 += NCMAX * W) {
      const int width = N - j0 < NCMAX * W ? N - j0 : NCMAX * W;
      const int nc = (width + W - 1) / W, rem = width - (nc - 1) * W;
      const typename WR::T* bv[NCMAX];
      for (int v = 0; v < nc; ++v) {
        const int col = j0 + v * W;
        bv[v] = blocked ? b + static_cast<int64_t>(col / kBlockCols) * K * kBlockCols + col % kBlockCols : b + col;
      }
      if (!blocked && rem < W) few_rows_dispatch<WR, true>(nc, d + j0, at, bv, ld, K, rem);
      else few_rows_dispatch<WR, false>(nc, d + j0, at, bv, ld, K, rem);
    }
  }
}

template <class WR>
void attention_rows(float* out, const float* q, const typename WR::T* kt, const typename WR::T* v, int T, int pos0,
                    int hd, int ld_q, int ld_out, float scale) {
  using R = Vec::reg;
  constexpr int W = Vec::width;
  const int n_keys = pos0 + T;
  float* S = scratch_floats(static_cast<int64_t>(T) * n_keys, 1);
  const bool few = T < matmul_detail::PACK_MIN_M;
  if (few)
    few_rows_product<WR>(S, n_keys, q, ld_q, kt, 0, true, T, hd, n_keys);
  else
    matmul_detail::matmul_impl<WR>(S, q, kt, true, nullptr, T, hd, n_keys, ld_q, n_keys, 0, false);
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
  if (few)
    few_rows_product<WR>(out, ld_out, S, n_keys, v, hd, false, T, n_keys, hd);
  else
    matmul_detail::matmul_impl<WR>(out, S, v, false, nullptr, T, n_keys, hd, n_keys, ld_out, hd, false);
}

template <class WR>
void attention_chunks(float* out, const float* q, const typename WR::T* kt, const typename WR::T* v, int T, int pos0,
                      int hd, int ld_q, int ld_out, float scale) {
  for (int t0 = 0; t0 < T; t0 += ROW_CHUNK) {
    const int rows = T - t0 < ROW_CHUNK ? T - t0 : ROW_CHUNK;
    attention_rows<WR>(out + static_cast<int64_t>(t0) * ld_out, q + static_cast<int64_t>(t0) * ld_q, kt, v, rows,
                       pos0 + t0, hd, ld_q, ld_out, scale);
  }
}

void attention_forward(float* out, const float* q, const void* kt, const void* v, DType kv, int T, int pos0, int hd,
                       int ld_q, int ld_out, float scale) {
  if (kv == DType::f16)
    return attention_chunks<matmul_detail::F16W>(out, q, static_cast<const uint16_t*>(kt),
                                                 static_cast<const uint16_t*>(v), T, pos0, hd, ld_q, ld_out, scale);
  attention_chunks<matmul_detail::F32W>(out, q, static_cast<const float*>(kt), static_cast<const float*>(v), T, pos0,
                                        hd, ld_q, ld_out, scale);
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
