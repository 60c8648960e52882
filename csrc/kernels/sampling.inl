// Row reductions for logits processing, written once against `Vec`.

void logsumexp(const float* x, int n, float* max_out, float* lse_out) {
  using R = Vec::reg;
  constexpr int W = Vec::width;
  R vmx = Vec::set1(-INFINITY);
  int i = 0;
  for (; i + W <= n; i += W) vmx = Vec::max(vmx, Vec::load(x + i));
  float mx = Vec::reduce_max(vmx);
  for (; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
  *max_out = mx;
  if (mx == -INFINITY) {  // every entry masked
    *lse_out = -INFINITY;
    return;
  }
  const R m = Vec::set1(mx);
  R acc = Vec::zero();
  i = 0;
  for (; i + W <= n; i += W) acc = Vec::add(acc, vec_exp<Vec>(Vec::sub(Vec::load(x + i), m)));
  float sum = Vec::reduce_add(acc);
  if (i < n) {
    // masked-out lanes load as 0 and would add exp(-mx): set them to -inf first.
    alignas(64) float tail[W];
    for (int t = 0; t < W; ++t) tail[t] = i + t < n ? x[i + t] : -INFINITY;
    sum += Vec::reduce_add(vec_exp<Vec>(Vec::sub(Vec::load(tail), m)));
  }
  *lse_out = std::log(sum);
}
