// Layer norm and activations, written once against `Vec` (included by each kernels_<isa>.cpp).

namespace norms_detail {

using R = Vec::reg;
constexpr int W = Vec::width;

// Sum of n floats: W lane partial sums, then reduce_add's fixed tree, then the scalar tail.
inline float vec_sum(const float* x, int n, float shift) {
  R acc = Vec::zero();
  const R s = Vec::set1(shift);
  int i = 0;
  for (; i + W <= n; i += W) acc = Vec::add(acc, Vec::sub(Vec::load(x + i), s));
  float total = Vec::reduce_add(acc);
  for (; i < n; ++i) total += x[i] - shift;
  return total;
}

inline float vec_sum_sq(const float* x, int n, float mean) {
  R acc = Vec::zero();
  const R m = Vec::set1(mean);
  int i = 0;
  for (; i + W <= n; i += W) {
    R d = Vec::sub(Vec::load(x + i), m);
    acc = Vec::fma(d, d, acc);
  }
  float total = Vec::reduce_add(acc);
  for (; i < n; ++i) total += (x[i] - mean) * (x[i] - mean);
  return total;
}

}  // namespace norms_detail

// Two passes (mean, then squared deviations) as torch does: the one-pass E[x^2]-E[x]^2 loses digits when the
// residual stream carries large-magnitude channels.
void layernorm_forward(float* out, const float* inp, const float* weight, const float* bias, int M, int C,
                       float eps) {
  using namespace norms_detail;
  parallel_for_if(static_cast<int64_t>(M) * C > 65536, M, [&](int64_t m) {
    const float* x = inp + static_cast<int64_t>(m) * C;
    float* o = out + static_cast<int64_t>(m) * C;
    const float mean = vec_sum(x, C, 0.0f) / C;
    const float rstd = 1.0f / std::sqrt(vec_sum_sq(x, C, mean) / C + eps);
    const R vm = Vec::set1(mean), vr = Vec::set1(rstd);
    int i = 0;
    for (; i + W <= C; i += W) {
      R y = Vec::mul(Vec::sub(Vec::load(x + i), vm), vr);
      Vec::store(o + i, Vec::fma(y, Vec::load(weight + i), Vec::load(bias + i)));
    }
    if (i < C) {
      const int rem = C - i;
      R y = Vec::mul(Vec::sub(Vec::load_partial(x + i, rem), vm), vr);
      Vec::store_partial(o + i, Vec::fma(y, Vec::load_partial(weight + i, rem), Vec::load_partial(bias + i, rem)), rem);
    }
  });
}

namespace norms_detail {

inline R activate(R x, Activation act) {
  switch (act) {
    case Activation::gelu_tanh: {
      // 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3) is x / (1 + exp(-2u)) (1 + tanh(u) =
      // 2 / (1 + exp(-2u))): one exp and one division, and nothing that cancels, so no small-|u| branch.
      R minus_2u = Vec::mul(Vec::set1(-1.5957691216057308f), Vec::fma(Vec::mul(Vec::set1(0.044715f), Vec::mul(x, x)), x, x));
      return Vec::div(x, Vec::add(Vec::set1(1.0f), vec_exp<Vec>(minus_2u)));
    }
    case Activation::gelu_erf:
      return Vec::mul(Vec::mul(Vec::set1(0.5f), x),
                      Vec::add(Vec::set1(1.0f), vec_erf<Vec>(Vec::mul(x, Vec::set1(0.7071067811865476f)))));
    case Activation::quick_gelu:  // x * sigmoid(1.702 x)
      return Vec::div(x, Vec::add(Vec::set1(1.0f), vec_exp<Vec>(Vec::mul(x, Vec::set1(-1.702f)))));
    case Activation::relu: return Vec::max(x, Vec::zero());
    case Activation::silu: return Vec::div(x, Vec::add(Vec::set1(1.0f), vec_exp<Vec>(Vec::sub(Vec::zero(), x))));
    case Activation::tanh: return vec_tanh<Vec>(x);
    case Activation::sigmoid:
      return Vec::div(Vec::set1(1.0f), Vec::add(Vec::set1(1.0f), vec_exp<Vec>(Vec::sub(Vec::zero(), x))));
    case Activation::linear: return x;
  }
  return x;
}

}  // namespace norms_detail

void activation_forward(float* x, int64_t n, Activation act) {
  using namespace norms_detail;
  if (act == Activation::linear) return;
  const int64_t nvec = n / W;
  parallel_for_if(n > 65536, nvec, [&](int64_t b) { Vec::store(x + b * W, activate(Vec::load(x + b * W), act)); });
  const int64_t i = nvec * W;
  if (i < n) {
    const int rem = static_cast<int>(n - i);
    Vec::store_partial(x + i, activate(Vec::load_partial(x + i, rem), act), rem);
  }
}
