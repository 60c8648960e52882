// AMX tiles (the avx512-amx level): eight 2-D registers of up to 16 rows x 64 bytes, multiplied by a unit beside
// the vector registers: tdpbf16ps adds a [16 x 32] bf16 tile times a [32 x 16] one (stored as 16 rows of 16
// column pairs, k and k + 1 of a column side by side) into a [16 x 16] float32 tile, 8,192 products an
// instruction where vdpbf16ps makes 32 (on one core of the first CPU measured, one every 4.7-4.9 ns: 3.4
// TFLOP/s; the K = 32 int8 products of a quantization group take as long). Tile numbers are part of the
// instruction, so the kernels here name them.
// Included by every kernel set after its vec header; `available` only where the file is built with AMX.
#pragma once
#include <cstdint>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__)
#include <immintrin.h>
#endif

namespace gptcpp {
namespace GPTCPP_ISA_NS {

struct Tiles {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__)
  static constexpr bool available = true;
  // Loads palette 1 with tile i shaped rows[i] x colsb[i] bytes (tiles 0-7). GCC 12 does not see ldtilecfg read
  // its 64 bytes and dropped the stores of the rows and widths before it (the tiles then stay unconfigured:
  // SIGILL); the empty asm makes every store to memory happen first.
  static inline void load_shapes(const uint8_t (&rows)[8], const uint16_t (&colsb)[8]) {
    struct alignas(64) Config {
      uint8_t palette, start_row, reserved[14];
      uint16_t colsb[16];
      uint8_t rows[16];
    } c = {};
    c.palette = 1;
    for (int i = 0; i < 8; ++i) {
      c.colsb[i] = colsb[i];
      c.rows[i] = rows[i];
    }
    __asm__ __volatile__("" : : "r"(&c) : "memory");
    _tile_loadconfig(&c);
  }
  // bf16: every tile 64 bytes wide. Tiles 0-3 hold sums, 4 activations, 6-7 weights (16 rows; 5 is unused).
  // `rows` (1-16): the rows of the sum and activation tiles (0-4); a product's time grows with them, so that
  // decoding's single row costs a sixteenth of a full tile's (rows are independent: the same bits).
  static inline void configure(int rows = 16) {
    const uint8_t r = static_cast<uint8_t>(rows);
    load_shapes({r, r, r, r, r, r, 16, 16}, {64, 64, 64, 64, 64, 64, 64, 64});
  }
  // Back to the init state, so that a context switch does not save 8 KB of tile data.
  static inline void release() { _tile_release(); }

  // One k chunk (32 k from k0) of a 64-column block of row-major bf16 weights in tile order (blocked weights are
  // stored in k pairs, in column order, and loaded in place): dst[kp][64][2] for the chunk's 16 k pairs, each
  // column's k = 2 kp and 2 kp + 1 side by side; src rows are ldb apart, only the first ncols columns and the
  // rows below K are read, the rest are zeros. The pairs come in vpunpck's column order (one instruction for 16
  // pairs, as BDot::pairs interleaves them for vdpbf16ps; a three-op permute into column order measured no
  // faster): weight tile j (at dst + 32 j, rows 256 bytes apart) holds columns 32 (j / 2) + {0-3, 8-11, 16-19,
  // 24-27} for even j and + {4-7, 12-15, 20-23, 28-31} for odd j, and BDot::columns puts a pair of tiles' sums
  // back. (Written out rather than through BDot::pairs_partial, whose per-call masks and null checks made the
  // one-row gpt2 LM head 1.55 -> 1.75 ms and decoding 11% slower when blocked weights came this way too.)
  static inline void pack_bf16_chunk(uint16_t* dst, const uint16_t* src, int64_t ldb, int k0, int K, int ncols) {
    const __mmask32 m0 = BDot::mask32(ncols), m1 = BDot::mask32(ncols - 32);
    const __m512i zero = _mm512_setzero_si512();
    for (int k = k0; k < k0 + 32; k += 2, dst += 128) {
      const uint16_t* r0 = src + static_cast<int64_t>(k) * ldb;
      const uint16_t* r1 = r0 + ldb;
      const __m512i a0 = k < K ? _mm512_maskz_loadu_epi16(m0, r0) : zero;
      const __m512i a1 = k < K ? _mm512_maskz_loadu_epi16(m1, r0 + 32) : zero;
      const __m512i b0 = k + 1 < K ? _mm512_maskz_loadu_epi16(m0, r1) : zero;
      const __m512i b1 = k + 1 < K ? _mm512_maskz_loadu_epi16(m1, r1 + 32) : zero;
      _mm512_store_si512(dst, _mm512_unpacklo_epi16(a0, b0));
      _mm512_store_si512(dst + 32, _mm512_unpackhi_epi16(a0, b0));
      _mm512_store_si512(dst + 64, _mm512_unpacklo_epi16(a1, b1));
      _mm512_store_si512(dst + 96, _mm512_unpackhi_epi16(a1, b1));
    }
  }

  static inline void zero_sums() {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  // One k chunk for 16 rows of activations a (bf16, lda apart) against all 64 columns of a packed chunk w.
  static inline void bf16_chunk_rows16(const uint16_t* a, int lda, const uint16_t* w) {
    const int64_t as = static_cast<int64_t>(lda) * 2;
    _tile_loadd(4, a, as);
    _tile_loadd(6, w, 256);
    _tile_loadd(7, w + 32, 256);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(6, w + 64, 256);
    _tile_loadd(7, w + 96, 256);
    _tile_dpbf16ps(2, 4, 6);
    _tile_dpbf16ps(3, 4, 7);
  }
  // Sums of bf16_chunk_rows16 from c [16][64] floats (as store_rows16 left them).
  static inline void load_rows16(const float* c) {
    _tile_loadd(0, c, 256);
    _tile_loadd(1, c + 16, 256);
    _tile_loadd(2, c + 32, 256);
    _tile_loadd(3, c + 48, 256);
  }
  // Sums of bf16_chunk_rows16 to c [16][64] floats.
  static inline void store_rows16(float* c) {
    _tile_stored(0, c, 256);
    _tile_stored(1, c + 16, 256);
    _tile_stored(2, c + 32, 256);
    _tile_stored(3, c + 48, 256);
  }

  // int8 (the grouped format of qmatmul.inl): tiles 0-3 hold int32 sums (16 rows x 16 columns), 4-5 activations
  // (16 rows x 32 bytes: one group of 32 k), 6-7 weights (8 rows x 64 bytes: the format's [64][4] quad rows,
  // 16 columns of 4 k, as they are stored).
  static inline void configure_q8() {
    load_shapes({16, 16, 16, 16, 16, 16, 8, 8}, {64, 64, 64, 64, 32, 32, 64, 64});
  }
  // One group's exact int32 sums for 16 rows of activations a (int8, lda bytes apart, the group's 32 bytes
  // each) against 32 columns of the group's 8 quad rows w (a 64-column block's rows, 256 bytes apart), stored
  // to c [16][32]. Weights signed (int8: tdpbssd) or, with UNSIGNED_W, unsigned (int4's value + 8: tdpbsud).
  // Calls alternate P = 0, 1 between two pairs of sum tiles and two activation tiles, so that a group's
  // products need not wait for the group before to leave its tiles (stores are the slow part here).
  // (The intrinsics paste their tile numbers into the instruction's text: they must be literals.)
#define GPTCPP_Q8_GROUP_HALF(C0, C1, A, DP)  \
  _tile_zero(C0);                            \
  _tile_zero(C1);                            \
  _tile_loadd(A, a, lda);                    \
  _tile_loadd(6, w, 256);                    \
  _tile_loadd(7, w + 64, 256);               \
  DP(C0, A, 6);                              \
  DP(C1, A, 7);                              \
  _tile_stored(C0, c, 128);                  \
  _tile_stored(C1, c + 16, 128);
  template <bool UNSIGNED_W, int P>
  static inline void q8_group_half(int32_t* c, const int8_t* a, int lda, const int8_t* w) {
    if constexpr (P == 0 && UNSIGNED_W) {
      GPTCPP_Q8_GROUP_HALF(0, 1, 4, _tile_dpbsud)
    } else if constexpr (P == 0) {
      GPTCPP_Q8_GROUP_HALF(0, 1, 4, _tile_dpbssd)
    } else if constexpr (UNSIGNED_W) {
      GPTCPP_Q8_GROUP_HALF(2, 3, 5, _tile_dpbsud)
    } else {
      GPTCPP_Q8_GROUP_HALF(2, 3, 5, _tile_dpbssd)
    }
  }
#undef GPTCPP_Q8_GROUP_HALF

  // int4 weights as the bytes tdpbsud takes: nibble row p of a block (256 bytes, qmatmul.inl's layout) holds
  // quads 2p (low nibbles) and 2p + 1 (high), value + 8; dst gets them as quad rows 2p and 2p + 1.
  static inline void unpack_nibbles(int8_t* dst, const uint8_t* src, int nibble_rows) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int p = 0; p < nibble_rows; ++p, src += 256, dst += 512)
      for (int j = 0; j < 256; j += 64) {
        const __m512i raw = _mm512_loadu_si512(src + j);
        _mm512_storeu_si512(dst + j, _mm512_and_si512(raw, low));
        _mm512_storeu_si512(dst + 256 + j, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low));
      }
  }
#else
  static constexpr bool available = false;
#endif
};

}  // namespace GPTCPP_ISA_NS
}  // namespace gptcpp
