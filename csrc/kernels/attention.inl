// Causal attention for one head of one sequence, written once against `Vec`.
// Scores for query t cover keys 0..pos0+t (the KV cache already holds the new rows); softmax subtracts the
// row max; the weighted sum of V is accumulated in key order. One call is one (sequence, head) unit: the
// model spreads units over threads, so nothing here depends on the batch or the thread count.

namespace attention_detail {

using R = Vec::reg;
constexpr int W = Vec::width;

inline float dot(const float* a, const float* b, int n) {
  R acc = Vec::zero();
  int i = 0;
  for (; i + W <= n; i += W) acc = Vec::fma(Vec::load(a + i), Vec::load(b + i), acc);
  if (i < n) acc = Vec::fma(Vec::load_partial(a + i, n - i), Vec::load_partial(b + i, n - i), acc);
  return Vec::reduce_add(acc);
}

}  // namespace attention_detail

void attention_forward(float* out, const float* q, const float* k, const float* v, int T, int pos0, int hd,
                       int ld_q, int ld_out, float scale) {
  using namespace attention_detail;
  float* scores_buf = scratch_floats(pos0 + T + W);
  for (int t = 0; t < T; ++t) {
    const float* qt = q + static_cast<int64_t>(t) * ld_q;
    const int n_keys = pos0 + t + 1;
    float* s = scores_buf;
    float mx = -INFINITY;
    for (int j = 0; j < n_keys; ++j) {
      s[j] = dot(qt, k + static_cast<int64_t>(j) * hd, hd) * scale;
      mx = s[j] > mx ? s[j] : mx;
    }
    const R vmx = Vec::set1(mx);
    R vsum = Vec::zero();
    int j = 0;
    for (; j + W <= n_keys; j += W) {
      R e = vec_exp<Vec>(Vec::sub(Vec::load(s + j), vmx));
      Vec::store(s + j, e);
      vsum = Vec::add(vsum, e);
    }
    float sum = Vec::reduce_add(vsum);
    for (; j < n_keys; ++j) {
      R e = vec_exp<Vec>(Vec::set1(s[j] - mx));
      float ej;
      Vec::store_partial(&ej, e, 1);
      s[j] = ej;
      sum += ej;
    }
    const float inv = 1.0f / sum;
    float* ot = out + static_cast<int64_t>(t) * ld_out;
    for (int c = 0; c < hd; c += W) {
      const int rem = hd - c < W ? hd - c : W;
      R acc = Vec::zero();
      for (int jj = 0; jj < n_keys; ++jj) {
        const float* vr = v + static_cast<int64_t>(jj) * hd + c;
        acc = Vec::fma(Vec::set1(s[jj]), rem == W ? Vec::load(vr) : Vec::load_partial(vr, rem), acc);
      }
      acc = Vec::mul(acc, Vec::set1(inv));
      if (rem == W) Vec::store(ot + c, acc); else Vec::store_partial(ot + c, acc, rem);
    }
  }
}
