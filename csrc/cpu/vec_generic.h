// Portable vector of 8 floats: the same shape as the AVX2 register so every kernel compiles unchanged.
// Plain loops that any compiler for baseline x86-64 (or any other target) turns into what it can.
#pragma once
#ifndef GPTCPP_ISA_NS
#error "define GPTCPP_ISA_NS (the per-ISA namespace) before including a vec header"
#endif
#include <cmath>
#include <cstdint>

#include "cpu/half.h"

namespace gptcpp {
namespace GPTCPP_ISA_NS {

struct Vec {
  static constexpr int width = 8;
  struct reg { float v[8]; };
  static inline reg zero() { reg r; for (int i = 0; i < 8; ++i) r.v[i] = 0.f; return r; }
  static inline reg set1(float x) { reg r; for (int i = 0; i < 8; ++i) r.v[i] = x; return r; }
  static inline reg load(const float* p) { reg r; for (int i = 0; i < 8; ++i) r.v[i] = p[i]; return r; }
  static inline void store(float* p, reg a) { for (int i = 0; i < 8; ++i) p[i] = a.v[i]; }
  static inline reg load_partial(const float* p, int n) {
    reg r = zero(); for (int i = 0; i < n; ++i) r.v[i] = p[i]; return r;
  }
  static inline void store_partial(float* p, reg a, int n) { for (int i = 0; i < n; ++i) p[i] = a.v[i]; }
  // Weights stored narrower than float32, widened exactly on load.
  static inline reg load_f16_partial(const uint16_t* p, int n) { reg r = zero(); for (int i = 0; i < n; ++i) r.v[i] = gptcpp::f16_to_f32(p[i]); return r; }
  static inline reg load_bf16_partial(const uint16_t* p, int n) { reg r = zero(); for (int i = 0; i < n; ++i) r.v[i] = gptcpp::bf16_to_f32(p[i]); return r; }
  static inline reg load_f16(const uint16_t* p) { return load_f16_partial(p, 8); }
  static inline void store_f16(uint16_t* p, reg a) { for (int i = 0; i < 8; ++i) p[i] = gptcpp::f32_to_f16(a.v[i]); }
  static inline reg load_bf16(const uint16_t* p) { return load_bf16_partial(p, 8); }
  // bf16 in k pairs (see vec_avx512.h): 8 columns of row k (even) or k + 1 (odd).
  static inline reg load_bf16_even(const uint16_t* p) { reg r; for (int i = 0; i < 8; ++i) r.v[i] = gptcpp::bf16_to_f32(p[2 * i]); return r; }
  static inline reg load_bf16_odd(const uint16_t* p) { reg r; for (int i = 0; i < 8; ++i) r.v[i] = gptcpp::bf16_to_f32(p[2 * i + 1]); return r; }
  static inline reg load_bf16_odd_within(const uint16_t* p) { return load_bf16_odd(p); }
#define GPTCPP_VEC_BINOP(name, expr) \
  static inline reg name(reg a, reg b) { reg r; for (int i = 0; i < 8; ++i) { float x = a.v[i], y = b.v[i]; r.v[i] = (expr); } return r; }
  GPTCPP_VEC_BINOP(add, x + y)
  GPTCPP_VEC_BINOP(sub, x - y)
  GPTCPP_VEC_BINOP(mul, x * y)
  GPTCPP_VEC_BINOP(div, x / y)
  GPTCPP_VEC_BINOP(max, x > y ? x : y)
  GPTCPP_VEC_BINOP(min, x < y ? x : y)
#undef GPTCPP_VEC_BINOP
  // a*b + c, rounded twice (this translation unit is built with -ffp-contract=off so it stays that way).
  static inline reg fma(reg a, reg b, reg c) { reg r; for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i]; return r; }
  static inline reg round(reg a) { reg r; for (int i = 0; i < 8; ++i) r.v[i] = std::nearbyint(a.v[i]); return r; }
  // 2^n for integral n in [-126, 127].
  static inline reg pow2(reg n) { reg r; for (int i = 0; i < 8; ++i) r.v[i] = std::ldexp(1.0f, static_cast<int>(n.v[i])); return r; }
  // x < t ? a : b, per lane.
  static inline reg select_lt(reg x, reg t, reg a, reg b) { reg r; for (int i = 0; i < 8; ++i) r.v[i] = x.v[i] < t.v[i] ? a.v[i] : b.v[i]; return r; }
  static inline reg abs(reg a) { reg r; for (int i = 0; i < 8; ++i) r.v[i] = std::fabs(a.v[i]); return r; }
  // Copies the sign of s onto the magnitude of a.
  static inline reg copysign(reg a, reg s) { reg r; for (int i = 0; i < 8; ++i) r.v[i] = std::copysign(a.v[i], s.v[i]); return r; }
  // Fixed pairwise order, the same as the SIMD versions: (0+4, 1+5, 2+6, 3+7), then (0+2, 1+3), then 0+1.
  static inline float reduce_add(reg a) {
    float s0 = a.v[0] + a.v[4], s1 = a.v[1] + a.v[5], s2 = a.v[2] + a.v[6], s3 = a.v[3] + a.v[7];
    float t0 = s0 + s2, t1 = s1 + s3;
    return t0 + t1;
  }
  static inline float reduce_max(reg a) { float m = a.v[0]; for (int i = 1; i < 8; ++i) m = a.v[i] > m ? a.v[i] : m; return m; }
  // Stores lanes holding whole numbers in [-128, 127] as int8.
  static inline void store_i8(int8_t* p, reg a) { for (int i = 0; i < 8; ++i) p[i] = static_cast<int8_t>(a.v[i]); }
};

// int8 dot products of the grouped int8 format (qmatmul.inl); see vec_avx512.h. 8 int32 lanes, one per column;
// a weight "register" is 32 bytes: 4 consecutive k of each of 8 columns.
struct QDot {
  struct ireg { int32_t v[8]; };
  static constexpr bool offset = false;
  static inline ireg zero() { ireg r; for (int i = 0; i < 8; ++i) r.v[i] = 0; return r; }
  static inline ireg load(const int8_t* p) { return load_bytes(p); }
  static inline Vec::reg to_float(ireg a) { Vec::reg r; for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(a.v[i]); return r; }
  static inline ireg sub(ireg a, ireg b) { for (int i = 0; i < 8; ++i) a.v[i] -= b.v[i]; return a; }
  static inline ireg bcast(int32_t x4) { ireg r; for (int i = 0; i < 8; ++i) r.v[i] = x4; return r; }
  static inline ireg set1(int32_t v) { return bcast(v); }
  static inline ireg weights(ireg w) { return w; }
  // int4 weights, two unsigned nibbles (value + 8) per byte; see vec_avx512.h.
  static inline ireg low_nibbles(ireg w) { for (int i = 0; i < 8; ++i) w.v[i] &= 0x0F0F0F0F; return w; }
  static inline ireg high_nibbles(ireg w) {
    for (int i = 0; i < 8; ++i) w.v[i] = static_cast<int32_t>((static_cast<uint32_t>(w.v[i]) >> 4) & 0x0F0F0F0Fu);
    return w;
  }
  static inline ireg dot_unsigned(ireg acc, ireg x, ireg w) {
    for (int i = 0; i < 8; ++i)
      for (int b = 0; b < 4; ++b)
        acc.v[i] += static_cast<int32_t>(static_cast<int8_t>(x.v[i] >> (8 * b))) *
                    static_cast<int32_t>((static_cast<uint32_t>(w.v[i]) >> (8 * b)) & 0xFF);
    return acc;
  }
  static inline ireg nibble_pair(ireg acc, ireg x0, ireg lo, ireg x1, ireg hi) {
    return dot_unsigned(dot_unsigned(acc, x0, lo), x1, hi);
  }
  static inline ireg group_sum(ireg acc) { return acc; }
  // int6 weights (see vec_avx512.h): per byte, bits SHIFT, SHIFT + 1 of h at bits 4-5.
  template <int SHIFT>
  static inline ireg top_bits(ireg h) {
    for (int i = 0; i < 8; ++i) {
      const uint32_t u = static_cast<uint32_t>(h.v[i]);
      h.v[i] = static_cast<int32_t>((SHIFT < 4 ? u << (4 - SHIFT) : u >> (SHIFT - 4)) & 0x30303030u);
    }
    return h;
  }
  static inline ireg or_(ireg a, ireg b) { for (int i = 0; i < 8; ++i) a.v[i] |= b.v[i]; return a; }
  static inline ireg wide_pair(ireg acc, ireg x0, ireg lo, ireg x1, ireg hi) { return nibble_pair(acc, x0, lo, x1, hi); }
  static inline ireg dot(ireg acc, ireg x, ireg w) {
    for (int i = 0; i < 8; ++i)
      for (int b = 0; b < 4; ++b)
        acc.v[i] += static_cast<int32_t>(static_cast<int8_t>(x.v[i] >> (8 * b))) * static_cast<int8_t>(w.v[i] >> (8 * b));
    return acc;
  }

 private:
  static inline ireg load_bytes(const int8_t* p) {
    ireg r;
    for (int i = 0; i < 8; ++i)
      r.v[i] = static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint8_t>(p[4 * i])) |
                                    static_cast<uint32_t>(static_cast<uint8_t>(p[4 * i + 1])) << 8 |
                                    static_cast<uint32_t>(static_cast<uint8_t>(p[4 * i + 2])) << 16 |
                                    static_cast<uint32_t>(static_cast<uint8_t>(p[4 * i + 3])) << 24);
    return r;
  }
};

// No bf16 dot product at this level: bf16 weights are widened to float32 (see vec_avx512.h).
struct BDot {
  static constexpr bool available = false;
};

}  // namespace GPTCPP_ISA_NS
}  // namespace gptcpp
