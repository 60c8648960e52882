// Transcendentals written once on top of any Vec: exp (Cephes polynomial, ~1 ulp on [-87, 88]),
// tanh and erf built from it. Included after a vec_*.h in each per-ISA kernel file.
#pragma once

template <class V>
inline typename V::reg vec_exp(typename V::reg x) {
  using R = typename V::reg;
  x = V::min(V::max(x, V::set1(-87.3f)), V::set1(88.3f));
  R n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  // x - n*ln2 in two steps keeps the reduction exact for |n| < 2^11.
  x = V::sub(x, V::mul(n, V::set1(0.693359375f)));
  x = V::sub(x, V::mul(n, V::set1(-2.12194440e-4f)));
  R p = V::set1(1.9875691500e-4f);
  p = V::fma(p, x, V::set1(1.3981999507e-3f));
  p = V::fma(p, x, V::set1(8.3334519073e-3f));
  p = V::fma(p, x, V::set1(4.1665795894e-2f));
  p = V::fma(p, x, V::set1(1.6666665459e-1f));
  p = V::fma(p, x, V::set1(5.0000001201e-1f));
  R y = V::add(V::fma(p, V::mul(x, x), x), V::set1(1.0f));
  return V::mul(y, V::pow2(n));
}

// tanh: for |x| >= 0.625, sign(x) * (1 - 2 / (exp(2|x|) + 1)), which cannot overflow; below that the
// subtraction would cancel, so the Cephes odd polynomial x + x^3 P(x^2) is used (relative error ~1e-7).
template <class V>
inline typename V::reg vec_tanh(typename V::reg x) {
  using R = typename V::reg;
  const R a = V::abs(x);
  R e = vec_exp<V>(V::mul(a, V::set1(2.0f)));
  R big = V::copysign(V::sub(V::set1(1.0f), V::div(V::set1(2.0f), V::add(e, V::set1(1.0f)))), x);
  const R z = V::mul(x, x);
  R p = V::set1(-5.70498872745e-3f);
  p = V::fma(p, z, V::set1(2.06390887954e-2f));
  p = V::fma(p, z, V::set1(-5.37397155531e-2f));
  p = V::fma(p, z, V::set1(1.33314422036e-1f));
  p = V::fma(p, z, V::set1(-3.33332819422e-1f));
  R small = V::fma(V::mul(p, z), x, x);
  return V::select_lt(a, V::set1(0.625f), small, big);
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7).
template <class V>
inline typename V::reg vec_erf(typename V::reg x) {
  using R = typename V::reg;
  R a = V::abs(x);
  R t = V::div(V::set1(1.0f), V::fma(V::set1(0.3275911f), a, V::set1(1.0f)));
  R p = V::set1(1.061405429f);
  p = V::fma(p, t, V::set1(-1.453152027f));
  p = V::fma(p, t, V::set1(1.421413741f));
  p = V::fma(p, t, V::set1(-0.284496736f));
  p = V::fma(p, t, V::set1(0.254829592f));
  p = V::mul(p, t);
  R e = vec_exp<V>(V::sub(V::zero(), V::mul(a, a)));
  return V::copysign(V::sub(V::set1(1.0f), V::mul(p, e)), x);
}
