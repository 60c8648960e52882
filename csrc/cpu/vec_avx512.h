// 16 floats in a ZMM register (AVX-512 F/BW/VL/DQ); tails use mask registers.
#pragma once
#ifndef GPTCPP_ISA_NS
#error "define GPTCPP_ISA_NS (the per-ISA namespace) before including a vec header"
#endif
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace gptcpp {
namespace GPTCPP_ISA_NS {

struct Vec {
  static constexpr int width = 16;
  using reg = __m512;
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg set1(float x) { return _mm512_set1_ps(x); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, reg a) { _mm512_storeu_ps(p, a); }
  static inline __mmask16 tail_mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static inline reg load_partial(const float* p, int n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
  static inline void store_partial(float* p, reg a, int n) { _mm512_mask_storeu_ps(p, tail_mask(n), a); }
  // Weights stored narrower than float32, widened exactly on load.
  static inline reg load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static inline reg load_f16_partial(const uint16_t* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail_mask(n), p)); }
  static inline void store_f16(uint16_t* p, reg a) {  // rounded to nearest even
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static inline reg load_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static inline reg load_bf16_partial(const uint16_t* p, int n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(tail_mask(n), p)), 16));
  }
  // bf16 in k pairs (the blocked bf16 layout: each 32-bit lane holds k and k + 1 of one column, k in the low
  // half): 16 columns of row k (even) or k + 1 (odd), widened by a shift or a mask of the same lanes. The odd
  // row loads the lanes again (from a pointer the compiler cannot see is the same: an empty asm): keeping the
  // even row's instead left a 6 x 4 tile's weights alive across both rows, past the 32 registers (its sums
  // spilled: gpt2 bf16 pp512 1,440 -> 1,310 tok/s, batch-16 decode 500 -> 458 on an Intel Xeon, avx512-vnni).
  static inline reg load_bf16_even(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(p), 16));
  }
  static inline reg load_bf16_odd_within(const uint16_t* p) { return load_bf16_odd(p); }
  static inline reg load_bf16_odd(const uint16_t* p) {
    __asm__("" : "+r"(p));
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static inline reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline reg round(reg a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline reg pow2(reg n) {
    __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  // x < t ? a : b, per lane.
  static inline reg select_lt(reg x, reg t, reg a, reg b) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, t, _CMP_LT_OQ), b, a); }
  static inline reg abs(reg a) { return _mm512_abs_ps(a); }
  static inline reg copysign(reg a, reg s) {
    const __m512i sign = _mm512_set1_epi32(0x80000000);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_andnot_si512(sign, _mm512_castps_si512(a)),
                                               _mm512_and_si512(sign, _mm512_castps_si512(s))));
  }
  static inline float reduce_add(reg a) {
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static inline float reduce_max(reg a) { return _mm512_reduce_max_ps(a); }
  // Stores lanes holding whole numbers in [-128, 127] as int8.
  static inline void store_i8(int8_t* p, reg a) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(a)));
  }
};

// int8 dot products of the grouped int8 format (qmatmul.inl). An ireg holds 16 int32 lanes, one per output
// column; a weight register holds 4 consecutive k of each of those 16 columns (prepared once by weights()),
// and x is the broadcast of the 4 matching activation bytes. dot() adds sum over the 4 k of x[k] * w[k][n]
// to each lane, exactly, except that with `offset` it adds 128 * sum x[k] more, which the caller takes off.
struct QDot {
  using ireg = __m512i;
  static inline ireg zero() { return _mm512_setzero_si512(); }
  static inline ireg load(const int8_t* p) { return _mm512_loadu_si512(p); }
  static inline ireg bcast(int32_t x4) { return _mm512_set1_epi32(x4); }
  static inline ireg set1(int32_t v) { return _mm512_set1_epi32(v); }
  static inline Vec::reg to_float(ireg a) { return _mm512_cvtepi32_ps(a); }
  static inline ireg sub(ireg a, ireg b) { return _mm512_sub_epi32(a, b); }
#ifdef __AVX512VNNI__
  // vpdpbusd multiplies unsigned by signed bytes: the weights go in offset by +128 (one xor per register,
  // shared by every row of a tile) and the activations, signed, as the instruction's broadcast operand.
  static constexpr bool offset = true;
  static inline ireg weights(ireg w) { return _mm512_xor_si512(w, _mm512_set1_epi32(static_cast<int32_t>(0x80808080u))); }
  static inline ireg dot(ireg acc, ireg x, ireg w) { return _mm512_dpbusd_epi32(acc, w, x); }
#else
  // Without VNNI: |x| (unsigned) times w with x's sign moved onto it, through vpmaddubsw (pairs, int16:
  // at most 2 * 127 * 127, no saturation since neither side is ever -128) and vpmaddwd against ones.
  static constexpr bool offset = false;
  static inline ireg weights(ireg w) { return w; }
  static inline ireg dot(ireg acc, ireg x, ireg w) {
    const __m512i ws = _mm512_mask_sub_epi8(w, _mm512_movepi8_mask(x), _mm512_setzero_si512(), w);
    const __m512i pairs = _mm512_maddubs_epi16(_mm512_abs_epi8(x), ws);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
  }
#endif
  // int4 weights come as two nibbles per byte, each the value + 8 (0..15): unsigned bytes, so both paths take
  // them as the unsigned operand directly (vpmaddubsw pairs stay within 2 * 15 * 127); the caller takes off
  // 8 * sum x[k].
  static inline ireg low_nibbles(ireg w) { return _mm512_and_si512(w, _mm512_set1_epi8(0x0F)); }
  static inline ireg high_nibbles(ireg w) { return _mm512_and_si512(_mm512_srli_epi16(w, 4), _mm512_set1_epi8(0x0F)); }
#ifdef __AVX512VNNI__
  // One pair of int4 quads (low nibbles against x0, high against x1) into a group's sums, and the group's sums
  // as int32 lanes: with VNNI they are int32 all along.
  static inline ireg nibble_pair(ireg acc, ireg x0, ireg lo, ireg x1, ireg hi) {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, lo, x0), hi, x1);
  }
  static inline ireg group_sum(ireg acc) { return acc; }
#else
  // Without VNNI a group's int4 products are summed in int16 lanes and widened to int32 once a group instead of
  // once a quad: a lane of vpmaddubsw is two products of a weight in 0..15 and an activation in -127..127, at
  // most 3,810 in size, and a group adds 8 of them, at most 30,480 < 32,767, so nothing saturates or wraps.
  static inline ireg nibble_pair(ireg acc, ireg x0, ireg lo, ireg x1, ireg hi) {
    return _mm512_add_epi16(acc, _mm512_add_epi16(_mm512_maddubs_epi16(lo, x0), _mm512_maddubs_epi16(hi, x1)));
  }
  static inline ireg group_sum(ireg acc) { return _mm512_madd_epi16(acc, _mm512_set1_epi16(1)); }
#endif
  // int6 weights (the value + 32, 0..63) come as a nibble (as int4's) and two more bits from a plane that holds
  // them for four quads a byte: top_bits<SHIFT> moves bits SHIFT, SHIFT + 1 of each byte of h to bits 4-5, to be
  // or-ed onto the nibble. The shifts are 16-bit ones: what crosses from one byte into the next lands outside
  // bits 4-5 and is masked off.
  template <int SHIFT>
  static inline ireg top_bits(ireg h) {
    const ireg m = _mm512_set1_epi8(0x30);
    if constexpr (SHIFT < 4) return _mm512_and_si512(_mm512_slli_epi16(h, 4 - SHIFT), m);
    else if constexpr (SHIFT > 4) return _mm512_and_si512(_mm512_srli_epi16(h, SHIFT - 4), m);
    else return _mm512_and_si512(h, m);
  }
  static inline ireg or_(ireg a, ireg b) { return _mm512_or_si512(a, b); }
  // One pair of int6 quads into int32 sums. Without VNNI a vpmaddubsw lane is at most 2 * 63 * 127 = 16,002, so
  // the pair's two fit int16 (32,004) but not a group's eight: widened once a pair.
#ifdef __AVX512VNNI__
  static inline ireg wide_pair(ireg acc, ireg x0, ireg lo, ireg x1, ireg hi) { return nibble_pair(acc, x0, lo, x1, hi); }
#else
  static inline ireg wide_pair(ireg acc, ireg x0, ireg lo, ireg x1, ireg hi) {
    const ireg pairs = _mm512_add_epi16(_mm512_maddubs_epi16(lo, x0), _mm512_maddubs_epi16(hi, x1));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
  }
#endif
};

// bf16 dot products (the avx512-bf16 level): a pair register holds 16 lanes of two bf16 each, k and k + 1 of one
// output column (weights) or of one row (activations, broadcast); dot() adds w[k] x[k] + w[k+1] x[k+1] to each
// float32 lane (vdpbf16ps: the products are exact in float32). Blocked weights are stored in such pairs and
// loaded as they are; row-major ones come as rows of the [K][N] layout, so pairs() interleaves two rows of 32
// columns into two pair registers in vpunpck's order: `lo` holds columns 0-3, 8-11, 16-19, 24-27 and `hi` the
// others, and columns() puts the two registers' sums back in order.
struct BDot {
#ifdef __AVX512BF16__
  static constexpr bool available = true;
  using preg = __m512i;
  static inline void pairs(const uint16_t* row0, const uint16_t* row1, preg& lo, preg& hi) {
    const __m512i r0 = _mm512_loadu_si512(row0), r1 = row1 ? _mm512_loadu_si512(row1) : _mm512_setzero_si512();
    lo = _mm512_unpacklo_epi16(r0, r1);
    hi = _mm512_unpackhi_epi16(r0, r1);
  }
  // The first n of 32 16-bit lanes (none for n <= 0).
  static inline __mmask32 mask32(int n) { return n <= 0 ? 0u : n >= 32 ? ~0u : (1u << n) - 1u; }
  static inline void pairs_partial(const uint16_t* row0, const uint16_t* row1, int n, preg& lo, preg& hi) {
    const __mmask32 m = mask32(n);
    const __m512i r0 = _mm512_maskz_loadu_epi16(m, row0);
    const __m512i r1 = row1 ? _mm512_maskz_loadu_epi16(m, row1) : _mm512_setzero_si512();
    lo = _mm512_unpacklo_epi16(r0, r1);
    hi = _mm512_unpackhi_epi16(r0, r1);
  }
  // 16 consecutive pairs (32 values along k) of a contiguous row, the last n values of a partial one.
  static inline preg load(const uint16_t* p) { return _mm512_loadu_si512(p); }
  static inline preg load_partial(const uint16_t* p, int n) { return _mm512_maskz_loadu_epi16(mask32(n), p); }
  static inline preg bcast(const uint16_t* pair) {
    int32_t v;
    std::memcpy(&v, pair, 4);
    return _mm512_set1_epi32(v);
  }
  static inline Vec::reg dot(Vec::reg acc, preg x, preg w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
  }
  // Sums of the lo / hi registers of 32 columns -> columns 0-15 and 16-31.
  static inline void columns(Vec::reg& lo, Vec::reg& hi) {
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    const Vec::reg a = _mm512_permutex2var_ps(lo, first, hi), b = _mm512_permutex2var_ps(lo, second, hi);
    lo = a;
    hi = b;
  }
  // out[0..n) = in rounded to bf16, nearest even (vcvtne2ps2bf16).
  static inline void round_row(uint16_t* out, const float* in, int n) {
    int i = 0;
    for (; i + 32 <= n; i += 32) {
      const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(in + i + 16), _mm512_loadu_ps(in + i));
      _mm512_storeu_si512(out + i, (__m512i)b);
    }
    if (i < n) {
      const int r = n - i;
      const __m512 lo = _mm512_maskz_loadu_ps(Vec::tail_mask(r < 16 ? r : 16), in + i);
      const __m512 hi = r > 16 ? _mm512_maskz_loadu_ps(Vec::tail_mask(r - 16), in + i + 16) : _mm512_setzero_ps();
      const __m512bh b = _mm512_cvtne2ps_pbh(hi, lo);
      _mm512_mask_storeu_epi16(out + i, mask32(r), (__m512i)b);
    }
  }
#else
  static constexpr bool available = false;
#endif
};

}  // namespace GPTCPP_ISA_NS
}  // namespace gptcpp
