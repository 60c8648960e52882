// 8 floats in a YMM register (AVX2 + FMA).
#pragma once
#ifndef GPTCPP_ISA_NS
#error "define GPTCPP_ISA_NS (the per-ISA namespace) before including a vec header"
#endif
#include <immintrin.h>
#include <cstdint>

namespace gptcpp {
namespace GPTCPP_ISA_NS {

struct Vec {
  static constexpr int width = 8;
  using reg = __m256;
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg set1(float x) { return _mm256_set1_ps(x); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, reg a) { _mm256_storeu_ps(p, a); }
  static inline __m256i tail_mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline reg load_partial(const float* p, int n) { return _mm256_maskload_ps(p, tail_mask(n)); }
  static inline void store_partial(float* p, reg a, int n) { _mm256_maskstore_ps(p, tail_mask(n), a); }
  // Weights stored narrower than float32, widened exactly on load (F16C for fp16).
  static inline reg load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static inline void store_f16(uint16_t* p, reg a) {  // rounded to nearest even
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static inline reg load_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  // bf16 in k pairs (see vec_avx512.h): 8 columns of row k (even) or k + 1 (odd). With 16 registers a 6 x 2
  // tile has none to spare for the even row's lanes or a mask: the odd row shifts up the 32 bits that start one
  // value later (its own value low, the next column's k above it, shifted out), a load of its own that reads
  // 2 bytes past the 8 pairs (load_bf16_odd_within: only where more of the matrix follows; gpt2 bf16 pp512 on
  // an Intel Xeon 870-900 tok/s with the lanes loaded again and cleared by two shifts, 930-945 this way).
  static inline reg load_bf16_even(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 16));
  }
  static inline reg load_bf16_odd_within(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 1)), 16));
  }
  static inline reg load_bf16_odd(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                                _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  template <class T>
  static inline void copy_tail(T* dst, const T* src, int n) { for (int i = 0; i < 8; ++i) dst[i] = i < n ? src[i] : T(0); }
  static inline reg load_f16_partial(const uint16_t* p, int n) { uint16_t t[8]; copy_tail(t, p, n); return load_f16(t); }
  static inline reg load_bf16_partial(const uint16_t* p, int n) { uint16_t t[8]; copy_tail(t, p, n); return load_bf16(t); }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static inline reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static inline reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline reg round(reg a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline reg pow2(reg n) {
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  // x < t ? a : b, per lane.
  static inline reg select_lt(reg x, reg t, reg a, reg b) { return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, t, _CMP_LT_OQ)); }
  static inline reg abs(reg a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static inline reg copysign(reg a, reg s) {
    const reg sign = _mm256_set1_ps(-0.0f);
    return _mm256_or_ps(_mm256_andnot_ps(sign, a), _mm256_and_ps(sign, s));
  }
  static inline float reduce_add(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));  // (0+4, 1+5, 2+6, 3+7)
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                          // (0+2, 1+3)
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static inline float reduce_max(reg a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  // Stores lanes holding whole numbers in [-128, 127] as int8.
  static inline void store_i8(int8_t* p, reg a) {
    const __m256i i32 = _mm256_cvtps_epi32(a);
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(i16, i16));
  }
};

// int8 dot products of the grouped int8 format (qmatmul.inl); see vec_avx512.h. 8 int32 lanes, one per column.
struct QDot {
  using ireg = __m256i;
  static inline ireg zero() { return _mm256_setzero_si256(); }
  static inline ireg load(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline ireg bcast(int32_t x4) { return _mm256_set1_epi32(x4); }
  static inline ireg set1(int32_t v) { return _mm256_set1_epi32(v); }
  static inline Vec::reg to_float(ireg a) { return _mm256_cvtepi32_ps(a); }
  static inline ireg sub(ireg a, ireg b) { return _mm256_sub_epi32(a, b); }
#ifdef __AVXVNNI__
  static constexpr bool offset = true;
  static inline ireg weights(ireg w) { return _mm256_xor_si256(w, _mm256_set1_epi32(static_cast<int32_t>(0x80808080u))); }
  static inline ireg dot(ireg acc, ireg x, ireg w) { return _mm256_dpbusd_avx_epi32(acc, w, x); }
#else
  static constexpr bool offset = false;
  static inline ireg weights(ireg w) { return w; }
  static inline ireg dot(ireg acc, ireg x, ireg w) {
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
#endif
  // int4 weights, two unsigned nibbles (value + 8) per byte; see vec_avx512.h.
  static inline ireg low_nibbles(ireg w) { return _mm256_and_si256(w, _mm256_set1_epi8(0x0F)); }
  static inline ireg high_nibbles(ireg w) { return _mm256_and_si256(_mm256_srli_epi16(w, 4), _mm256_set1_epi8(0x0F)); }
#ifdef __AVXVNNI__
  static inline ireg nibble_pair(ireg acc, ireg x0, ireg lo, ireg x1, ireg hi) {
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, lo, x0), hi, x1);
  }
  static inline ireg group_sum(ireg acc) { return acc; }
#else
  // A group's int4 products summed in int16 lanes, widened once (see vec_avx512.h).
  static inline ireg nibble_pair(ireg acc, ireg x0, ireg lo, ireg x1, ireg hi) {
    return _mm256_add_epi16(acc, _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1)));
  }
  static inline ireg group_sum(ireg acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
#endif
  // int6 weights (see vec_avx512.h): bits SHIFT.. SHIFT + 1 of each byte of h moved to bits 4-5, to be or-ed
  // onto a nibble; a pair of quads summed straight into int32 lanes.
  template <int SHIFT>
  static inline ireg top_bits(ireg h) {
    const ireg m = _mm256_set1_epi8(0x30);
    if constexpr (SHIFT < 4) return _mm256_and_si256(_mm256_slli_epi16(h, 4 - SHIFT), m);
    else if constexpr (SHIFT > 4) return _mm256_and_si256(_mm256_srli_epi16(h, SHIFT - 4), m);
    else return _mm256_and_si256(h, m);
  }
  static inline ireg or_(ireg a, ireg b) { return _mm256_or_si256(a, b); }
#ifdef __AVXVNNI__
  static inline ireg wide_pair(ireg acc, ireg x0, ireg lo, ireg x1, ireg hi) { return nibble_pair(acc, x0, lo, x1, hi); }
#else
  static inline ireg wide_pair(ireg acc, ireg x0, ireg lo, ireg x1, ireg hi) {
    const ireg pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
#endif
};

// No bf16 dot product at this level: bf16 weights are widened to float32 (see vec_avx512.h).
struct BDot {
  static constexpr bool available = false;
};

}  // namespace GPTCPP_ISA_NS
}  // namespace gptcpp
