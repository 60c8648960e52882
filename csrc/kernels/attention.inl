// Causal attention for one head of one sequence, written once against `Vec`.
// Scores and the weighted sum of V are both matrix products through matmul_forward (packed GEMM for a
// prompt, the streaming path for one new token): S = q @ kt, masked softmax per row, then out = P @ v.
// Query rows go in chunks of ROW_CHUNK, each against only the keys its last row can see, which skips most
// of the masked upper triangle of a prompt. Row t sees keys 0..pos0+t; later keys in its chunk get
// probability exactly 0, which adds nothing to the FMA chains of P @ v, so the chunking changes no bit.
// One call is one (sequence, head) unit: the model spreads units over threads, so nothing here depends on
// the batch or the thread count.

constexpr int ROW_CHUNK = 64;

// The two products for the few rows of a decoding step (T below the matmul's packing threshold), with the sums
// in registers instead of the streaming matmul's buffer: dst[t][j] = sum over k of a[t][k] * b[k][j], b's rows
// ldb apart, as one fma chain over k = 0..K-1 from zero per element, which is exactly what matmul_forward
// computes for these shapes, so decoding one token or verifying several gives the bits a prompt chunk does.
inline void few_rows_product(float* dst, int ldd, const float* a, int lda, const float* b, int ldb, int T, int K,
                             int N) {
  using R = Vec::reg;
  constexpr int W = Vec::width, NV = 4;
  for (int t = 0; t < T; ++t) {
    const float* at = a + static_cast<int64_t>(t) * lda;
    float* d = dst + static_cast<int64_t>(t) * ldd;
    for (int j0 = 0; j0 < N; j0 += NV * W) {
      const int width = N - j0 < NV * W ? N - j0 : NV * W;
      R acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = Vec::zero();
      if (width == NV * W) {
        for (int k = 0; k < K; ++k) {
          const R x = Vec::set1(at[k]);
          const float* bk = b + static_cast<int64_t>(k) * ldb + j0;
          for (int v = 0; v < NV; ++v) acc[v] = Vec::fma(x, Vec::load(bk + v * W), acc[v]);
        }
      } else {
        for (int k = 0; k < K; ++k) {
          const R x = Vec::set1(at[k]);
          const float* bk = b + static_cast<int64_t>(k) * ldb + j0;
          for (int v = 0; v * W < width; ++v) {
            const int rem = width - v * W;
            acc[v] = Vec::fma(x, rem >= W ? Vec::load(bk + v * W) : Vec::load_partial(bk + v * W, rem), acc[v]);
          }
        }
      }
      for (int v = 0; v * W < width; ++v) {
        const int rem = width - v * W;
        if (rem >= W) Vec::store(d + j0 + v * W, acc[v]);
        else Vec::store_partial(d + j0 + v * W, acc[v], rem);
      }
    }
  }
}

void attention_rows(float* out, const float* q, const float* kt, const float* v, int T, int pos0, int hd,
                    int ld_q, int ld_out, int ld_k, float scale) {
  using R = Vec::reg;
  constexpr int W = Vec::width;
  const int n_keys = pos0 + T;
  float* S = scratch_floats(static_cast<int64_t>(T) * n_keys, 1);
  const bool few = T < matmul_detail::PACK_MIN_M;
  if (few)
    few_rows_product(S, n_keys, q, ld_q, kt, ld_k, T, hd, n_keys);
  else
    matmul_detail::matmul_impl<matmul_detail::F32W>(S, q, kt, false, nullptr, T, hd, n_keys, ld_q, n_keys, ld_k, false);
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
    few_rows_product(out, ld_out, S, n_keys, v, hd, T, n_keys, hd);
  else
    matmul_detail::matmul_impl<matmul_detail::F32W>(out, S, v, false, nullptr, T, n_keys, hd, n_keys, ld_out, hd, false);
}

void attention_forward(float* out, const float* q, const float* kt, const float* v, int T, int pos0, int hd,
                       int ld_q, int ld_out, int ld_k, float scale) {
  for (int t0 = 0; t0 < T; t0 += ROW_CHUNK) {
    const int rows = T - t0 < ROW_CHUNK ? T - t0 : ROW_CHUNK;
    attention_rows(out + static_cast<int64_t>(t0) * ld_out, q + static_cast<int64_t>(t0) * ld_q, kt, v, rows,
                   pos0 + t0, hd, ld_q, ld_out, ld_k, scale);
  }
}
