// Matrix multiplication over the grouped int8 weight format, written once against `Vec` and `QDot` (included by
// each kernels_<isa>.cpp; QDot is vpdpbusd where the CPU has VNNI, vpmaddubsw otherwise, plain loops in generic).
//
// q8_matmul_forward: out[M,N] (+)= inp[M,K] @ weight[K,N] + bias, the weight (int8, or int4) quantized
// symmetrically in groups of 32 along k (w = q * scale, one fp16 scale per group and column, q in [-127, 127]), the activations
// quantized the same way per row on the fly (x = p * xs, one float scale per row and group). A group's
// products sum exactly in int32, so each output element is
//     acc = 0;  for g in 0..K/32-1:  acc = fma(float(sum_k p[k] q[k][n]), xs[g] * scale[g][n], acc)
// then (where the weight has outlier rows, see kernels.h) + the float32 products of those channels, one fma
// each in channel order, then + bias, then + out: the same operations whatever the tile, thread count, batch or instruction set
// (the integer part is exact, the float part runs in one order), so a row's result never depends on what it
// is batched with, and every x86 level gives the same bits (generic differs only where its fma rounds twice).
//
// Weight layout (a [K,N] Conv1D matrix, or the transposed token embedding [n_embd, vocab] for the LM head),
// with Kp = K rounded up to 32 and the columns in blocks of 64 (the last zero-padded):
//     q      int8 [ceil(N/64)][Kp/4][64][4]: per block, per 4 consecutive k, 64 columns of 4 bytes, so one
//            register load is 4 k of 16 (AVX-512) or 8 columns and the 4 matching activation bytes are one
//            broadcast; a block streams front to back.
//     scale  fp16 [ceil(N/64)][Kp/32][64]
// int4 (q4) has the same scales and the same [64][4] rows, each byte holding two of them: per block, per pair of
// quads (8 consecutive k), byte (n, k%4) is quad 2p's value + 8 in its low nibble and quad 2p+1's in its high
// one, so one register load unpacks (an and, a shift) into two quads' worth of unsigned weights:
//     q4     uint8 [ceil(N/64)][Kp/8][64][4]
// int6 (q6, the int4 format's LM head) keeps int4's nibble rows for the low 4 bits of each value + 32, and after
// every two of them (16 consecutive k, quads 4t .. 4t+3) a row whose byte (n, k%4) holds the top 2 bits of quad
// 4t+i's value at bits 2i, 2i+1; a block streams front to back as before:
//     q6     uint8 [ceil(N/64)][Kp/16][3][64][4]   (rows: the nibble pairs of quads 4t,4t+1 and 4t+2,4t+3, the top bits)
namespace qmatmul_detail {

using R = Vec::reg;
using I = QDot::ireg;
constexpr int L = Vec::width;  // columns per register
constexpr int GROUP = kQuantGroup;
constexpr int QUADS = GROUP / 4;
constexpr int BLOCK = kBlockCols;
constexpr int QUAD_BYTES = BLOCK * 4;  // one [64][4] row of a block
// Rows of QUAD_BYTES per group, and bytes per column block, for weights of BITS (8, 4 or 6) bits.
template <int BITS>
constexpr int ROWS_PER_GROUP = QUADS * BITS / 8;
template <int BITS>
inline int64_t block_bytes(int Kp) { return static_cast<int64_t>(Kp) * BLOCK * BITS / 8; }

// Rows m0..m1-1 of inp quantized into xq [M][Kp] (zero past K) and xs [M][Kp/32]. amax / 127 is the scale and
// x * (127 / amax) rounded to nearest even the value, exactly as the numpy reference computes it. A NaN or inf
// makes its group's scale NaN (and its values 0), so it reaches the output as it would in float32. Channels marked in `skip`
// (the weight's outlier rows, multiplied separately) count as zero.
// xc[m][g] = the sum of the group's quantized values: offset weights (VNNI's int8 + 128, int4's + 8) add that
// many times the offset to each integer sum. xo[m] gathers the outlier channels' values.
inline void quantize_rows(int8_t* xq, float* xs, int32_t* xc, float* xo, const float* inp, const uint8_t* skip,
                          const int32_t* outlier_rows, int n_out, int m0, int m1, int K, int Kp, int ldi) {
  alignas(64) float v[GROUP];
  const R lo = Vec::set1(-127.0f), hi = Vec::set1(127.0f);
  for (int m = m0; m < m1; ++m) {
    const float* x = inp + static_cast<int64_t>(m) * ldi;
    for (int j = 0; j < n_out; ++j) xo[static_cast<int64_t>(m) * n_out + j] = x[outlier_rows[j]];
    int8_t* q = xq + static_cast<int64_t>(m) * Kp;
    float* s = xs + static_cast<int64_t>(m) * (Kp / GROUP);
    int32_t* c = xc + static_cast<int64_t>(m) * (Kp / GROUP);
    for (int k0 = 0; k0 < Kp; k0 += GROUP) {
      const int n = K - k0 < GROUP ? K - k0 : GROUP;
      const float* g = x + k0;
      if (skip || n < GROUP) {  // a copy with the skipped channels and the tail past K zeroed
        for (int i = 0; i < GROUP; ++i) v[i] = i >= n || (skip && skip[k0 + i]) ? 0.0f : x[k0 + i];
        g = v;
      }
      // amax over the group (exact in any order); x * 0 is NaN exactly where x is NaN or infinite
      R vmax = Vec::zero(), bad = Vec::zero();
      for (int i = 0; i < GROUP; i += L) {
        const R xv = Vec::load(g + i);
        vmax = Vec::max(vmax, Vec::abs(xv));
        bad = Vec::add(bad, Vec::mul(xv, Vec::zero()));
      }
      const float amax = Vec::reduce_max(vmax);
      const bool finite = Vec::reduce_add(bad) == 0.0f;
      s[k0 / GROUP] = finite ? amax / 127.0f : std::nanf("");
      if (!finite || amax == 0.0f) {
        std::memset(q + k0, 0, GROUP);
        c[k0 / GROUP] = 0;
        continue;
      }
      const R id = Vec::set1(127.0f / amax);
      R total = Vec::zero();
      for (int i = 0; i < GROUP; i += L) {
        const R r = Vec::min(Vec::max(Vec::round(Vec::mul(Vec::load(g + i), id)), lo), hi);
        Vec::store_i8(q + k0 + i, r);
        total = Vec::add(total, r);
      }
      c[k0 / GROUP] = static_cast<int32_t>(Vec::reduce_add(total));  // integers below 2^24: exact
    }
  }
}

inline int32_t four_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Where a tile's rows find their quantized activations, and the weight's outlier channels (kernels.h) their
// float32 activations and fp16 weight rows.
struct QRows {
  const int8_t* xq;   // [rows][Kp]
  const float* xs;    // [rows][Kp/32]
  const int32_t* xc;  // [rows][Kp/32]
  int Kp;
  const float* xo;        // [rows][n_out]: the activations of the outlier channels
  const uint16_t* wo;     // [n_out][N]: their weight rows
  int n_out, N;
  QRows from(int m) const {
    const int64_t g = static_cast<int64_t>(m) * (Kp / GROUP);
    return {xq + static_cast<int64_t>(m) * Kp, xs + g, xc + g, Kp, xo + static_cast<int64_t>(m) * n_out, wo, n_out, N};
  }
};

// Rows m0..m1-1 of inp quantized into x's buffers (which the team shares; see q8_matmul_forward).
inline void quantize_into(const QRows& x, const float* inp, const uint8_t* skip, const WeightView& w, int m0, int m1,
                          int K, int ldi) {
  quantize_rows(const_cast<int8_t*>(x.xq), const_cast<float*>(x.xs), const_cast<int32_t*>(x.xc),
                const_cast<float*>(x.xo), inp, skip, w.outlier_rows, x.n_out, m0, m1, K, x.Kp, ldi);
}

// A row's epilogue: + the outlier channels' float32 products (in channel order), then matmul.inl's: + bias, + out.
// acc: CV registers of the row's float sums, columns n0 ..; i: the row within x.
template <int CV>
inline void q8_finish(float* out_row, R* acc, const QRows& x, int i, const float* bias, int n0, int ncols,
                      bool accumulate) {
  for (int j = 0; j < CV; ++j) {
    const int rem = ncols - j * L;
    if (rem <= 0) break;
    for (int e = 0; e < x.n_out; ++e) {
      const uint16_t* wr = x.wo + static_cast<int64_t>(e) * x.N + n0 + j * L;
      acc[j] = Vec::fma(Vec::set1(x.xo[static_cast<int64_t>(i) * x.n_out + e]),
                        rem >= L ? Vec::load_f16(wr) : Vec::load_f16_partial(wr, rem), acc[j]);
    }
  }
  matmul_detail::store_sums<CV>(out_row, acc, bias, n0, ncols, accumulate);
}

// ROWS rows of out against CV registers of columns of one block (columns c .. c + CV*L - 1 of the block,
// n0 the first's index in out); float sums in registers across the groups, int32 sums per group. BITS: the
// weights are int8, int4 or int6 (see the layouts above).
// Groups g0..g1-1 only: a tile that starts past group 0 takes its float sums from `partial` ([ROWS][CV*L]),
// one that ends before the last group leaves them there instead of finishing the output; the sums see the
// same operations in the same order either way.
template <int ROWS, int CV, int BITS, bool SLICED = BITS == 8>
inline void q8_tile(float* out, int ldo, QRows x, const int8_t* wblock, const uint16_t* sblock, int c,
                    const float* bias, int n0, int ncols, bool accumulate, int slice_g0, int slice_g1, float* partial,
                    const char* prefetch = nullptr, int prefetch_step = 0) {
  constexpr int UNIT = CV * L;
  const int Kp = x.Kp, groups = Kp / GROUP;
  // int4 / int6 are never sliced by q8_range: their tiles keep the whole-k loop the compiler sees as such.
  const int g0 = SLICED ? slice_g0 : 0, g1 = SLICED ? slice_g1 : groups;
  R acc[ROWS][CV];
  for (int i = 0; i < ROWS; ++i)
    for (int j = 0; j < CV; ++j) acc[i][j] = g0 == 0 ? Vec::zero() : Vec::load(partial + i * UNIT + j * L);
  // What the weights' offset adds per unit of the activations' sum: int4 + 8, int6 + 32, int8 + 128 with VNNI.
  constexpr int32_t offset = BITS == 4 ? 8 : BITS == 6 ? 32 : QDot::offset ? 128 : 0;
  const int8_t* wq = wblock + c * 4 + static_cast<int64_t>(g0) * ROWS_PER_GROUP<BITS> * QUAD_BYTES;
  // Decoding (one row) prefetches ahead (matmul.inl's prefetch_ahead): without it these loops waited on memory at
  // the start of each row of a block, most of all int6's (three rows per 16 k, 1.6 times int8's instructions a
  // weight: 70% of its samples on the first loads of each 16 k). Measured on AVX2 (Zen 3, 2 threads): int6 LM
  // head alone 50257 x 768: 2.9-3.3 -> 1.2-2.0 ms; gpt2 decode int4 (int6 head, in one build) 126-148 -> 163-189
  // tok/s; int8 even within the host's noise (113-139 before, 118-145 with it). AVX-512 does not prefetch into
  // L1: on Zen 4 (2 threads, caches flushed between calls, alternating processes) the int6 head took 0.87-1.34 ms
  // without it against 1.18-1.83 with it (faster in 7 of 8 rounds), gpt2 int4 decode 260-297 against 255-275
  // tok/s (5 of 5); int4 / int8 blocks with it measured even there. AVX-512 int6 prefetches into L2 instead,
  // 16 KB on (DECODE_AHEAD_L2): the head alone, the same way, 0.78-1.18 ms against 1.02-1.52 without (6 of 7 rounds;
  // into L1 16 KB on 1.36-1.78, 32 KB into L2 0.84-1.24); int4 blocks 0.54-0.65 against 0.54-0.75, int8 even
  // or slower, so only int6.
  constexpr bool decode_prefetch = ROWS == 1 && L == 8;
  constexpr bool decode_prefetch_l2 = ROWS == 1 && L == 16 && BITS == 6;
  using matmul_detail::prefetch_ahead;
  using matmul_detail::DECODE_AHEAD_L2;
  for (int g = g0; g < g1; ++g) {
    I sum[ROWS][CV];
    for (int i = 0; i < ROWS; ++i)
      for (int j = 0; j < CV; ++j) sum[i][j] = QDot::zero();
    const int8_t* xg = x.xq + g * GROUP;
    if constexpr (BITS == 6) {
      // A pair of quads: the nibbles of one row, the top bits (at SHIFT and SHIFT + 2) of the quartet's row.
      auto pair = [&](auto shift, const int8_t* nib, const int8_t* top, const int8_t* xp) {
        constexpr int SHIFT = decltype(shift)::value;
        // Column register j's two quads, unsigned 0..63: nibble | top bits.
        auto unpack = [&](int j, I& lo, I& hi) {
          const I raw = QDot::load(nib + j * L * 4), h = QDot::load(top + j * L * 4);
          lo = QDot::or_(QDot::low_nibbles(raw), QDot::template top_bits<SHIFT>(h));
          hi = QDot::or_(QDot::high_nibbles(raw), QDot::template top_bits<SHIFT + 2>(h));
        };
        if constexpr (ROWS == 1) {  // each pair of weight registers used as soon as unpacked (see int8's)
          const I x0 = QDot::bcast(four_bytes(xp)), x1 = QDot::bcast(four_bytes(xp + 4));
          for (int j = 0; j < CV; ++j) {
            I lo, hi;
            unpack(j, lo, hi);
            sum[0][j] = QDot::wide_pair(sum[0][j], x0, lo, x1, hi);
          }
          return;
        }
        I lo[CV], hi[CV];
        for (int j = 0; j < CV; ++j) unpack(j, lo[j], hi[j]);
        for (int i = 0; i < ROWS; ++i) {
          const I x0 = QDot::bcast(four_bytes(xp + static_cast<int64_t>(i) * Kp));
          const I x1 = QDot::bcast(four_bytes(xp + static_cast<int64_t>(i) * Kp + 4));
          for (int j = 0; j < CV; ++j) sum[i][j] = QDot::wide_pair(sum[i][j], x0, lo[j], x1, hi[j]);
        }
      };
      for (int t = 0; t < QUADS / 4; ++t, wq += 3 * QUAD_BYTES, xg += 16) {
        if constexpr (decode_prefetch) prefetch_ahead(wq, 3 * QUAD_BYTES);
        if constexpr (decode_prefetch_l2) prefetch_ahead<DECODE_AHEAD_L2, 2>(wq, 3 * QUAD_BYTES);
        if (prefetch) {
          for (int r = 0; r < 3; ++r) __builtin_prefetch(prefetch + r * prefetch_step, 0, 3);
          prefetch += 3 * prefetch_step;
        }
        pair(std::integral_constant<int, 0>{}, wq, wq + 2 * QUAD_BYTES, xg);
        pair(std::integral_constant<int, 4>{}, wq + QUAD_BYTES, wq + 2 * QUAD_BYTES, xg + 8);
      }
    } else if constexpr (BITS == 4) {
      for (int q = 0; q < QUADS; q += 2, wq += QUAD_BYTES, xg += 8) {
        if constexpr (decode_prefetch) prefetch_ahead(wq, QUAD_BYTES);
        if (prefetch) {
          __builtin_prefetch(prefetch, 0, 3);
          prefetch += prefetch_step;
        }
        I lo[CV], hi[CV];
        for (int j = 0; j < CV; ++j) {
          const I raw = QDot::load(wq + j * L * 4);
          lo[j] = QDot::low_nibbles(raw);
          hi[j] = QDot::high_nibbles(raw);
        }
        for (int i = 0; i < ROWS; ++i) {
          const I x0 = QDot::bcast(four_bytes(xg + static_cast<int64_t>(i) * Kp));
          const I x1 = QDot::bcast(four_bytes(xg + static_cast<int64_t>(i) * Kp + 4));
          for (int j = 0; j < CV; ++j) sum[i][j] = QDot::nibble_pair(sum[i][j], x0, lo[j], x1, hi[j]);
        }
      }
      for (int i = 0; i < ROWS; ++i)
        for (int j = 0; j < CV; ++j) sum[i][j] = QDot::group_sum(sum[i][j]);
    } else {
      for (int q = 0; q < QUADS; ++q, wq += QUAD_BYTES, xg += 4) {
        if constexpr (decode_prefetch) prefetch_ahead(wq, QUAD_BYTES);
        if (prefetch) {
          __builtin_prefetch(prefetch, 0, 3);
          prefetch += prefetch_step;
        }
        if constexpr (ROWS == 1) {  // each weight register used as soon as loaded: AVX2's 16 hold the 8 sums
          const I xb = QDot::bcast(four_bytes(xg));
          for (int j = 0; j < CV; ++j) sum[0][j] = QDot::dot(sum[0][j], xb, QDot::weights(QDot::load(wq + j * L * 4)));
          continue;
        }
        I w[CV];
        for (int j = 0; j < CV; ++j) w[j] = QDot::weights(QDot::load(wq + j * L * 4));
        for (int i = 0; i < ROWS; ++i) {
          const I xb = QDot::bcast(four_bytes(xg + static_cast<int64_t>(i) * Kp));
          for (int j = 0; j < CV; ++j) sum[i][j] = QDot::dot(sum[i][j], xb, w[j]);
        }
      }
    }
    R sw[CV];
    for (int j = 0; j < CV; ++j) sw[j] = Vec::load_f16(sblock + g * BLOCK + c + j * L);
    for (int i = 0; i < ROWS; ++i) {
      const R sx = Vec::set1(x.xs[i * groups + g]);
      const I off = QDot::set1(offset * x.xc[i * groups + g]);
      for (int j = 0; j < CV; ++j) {
        const I d = offset ? QDot::sub(sum[i][j], off) : sum[i][j];
        acc[i][j] = Vec::fma(QDot::to_float(d), Vec::mul(sx, sw[j]), acc[i][j]);
      }
    }
  }
  if (g1 < groups) {
    for (int i = 0; i < ROWS; ++i)
      for (int j = 0; j < CV; ++j) Vec::store(partial + i * UNIT + j * L, acc[i][j]);
    return;
  }
  for (int i = 0; i < ROWS; ++i)
    q8_finish<CV>(out + static_cast<int64_t>(i) * ldo, acc[i], x, i, bias, n0, ncols, accumulate);
}

// The last rows - m (fewer than ROWS) of a unit, one tile.
template <int ROWS, int CV, int BITS, bool SLICED = BITS == 8>
inline void q8_tail(int rows, float* out, int ldo, QRows x, const int8_t* wb, const uint16_t* sb, int c,
                    const float* bias, int n0, int ncols, bool accumulate, int g0, int g1, float* partial,
                    const char* prefetch = nullptr, int prefetch_step = 0) {
  if constexpr (ROWS > 1) {
    if (rows == ROWS - 1)
      return q8_tile<ROWS - 1, CV, BITS, SLICED>(out, ldo, x, wb, sb, c, bias, n0, ncols, accumulate, g0, g1, partial,
                                               prefetch, prefetch_step);
    return q8_tail<ROWS - 1, CV, BITS, SLICED>(rows, out, ldo, x, wb, sb, c, bias, n0, ncols, accumulate, g0, g1,
                                             partial, prefetch, prefetch_step);
  }
}

// Rows m0..m1-1 against units u0..u1-1 (AVX2 batches), the way matmul.inl's chunked_passes walks float
// weights: block by block, each block's k in chunks of CHUNK_GROUPS groups (int8 16 KB, int4 8 KB), every unit
// and row tile of the block running over a chunk in L1 while each tile iteration prefetches an even share of
// the chunk two ahead. Without the prefetch the first tile of each unit waited on memory and the others ran
// with the bus idle (chunks alone measured no faster); numbers in q8_matmul_forward. The float sums wait in
// `partial` [units of a block][M][UNIT] between chunks: the same operations in the same order as q8_range.
constexpr int CHUNK_GROUPS = 8;

template <int ROWS, int CV, int BITS>
inline void q8_chunked(float* out, QRows x, const WeightView& w, const float* bias, int m0, int m1, int N, int ldo,
                       int u0, int u1, bool accumulate) {
  constexpr int UNIT = CV * L, UPB = BLOCK / UNIT;
  constexpr int ROWS_PER_GROUP = qmatmul_detail::ROWS_PER_GROUP<BITS>;
  const int8_t* q = static_cast<const int8_t*>(w.data);
  const uint16_t* s = w.group_scales;
  const int Kp = x.Kp, groups = Kp / GROUP, M = m1 - m0;
  float* partial = scratch_floats(static_cast<int64_t>(M) * BLOCK, 0);
  const int row_tiles = (M + ROWS - 1) / ROWS;
  for (int b = u0 / UPB; b * UPB < u1 && b * BLOCK < N; ++b) {
    const int ua = u0 > b * UPB ? u0 : b * UPB, ub = u1 < (b + 1) * UPB ? u1 : (b + 1) * UPB;
    const int8_t* wb = q + b * block_bytes<BITS>(Kp);
    const uint16_t* sb = s + static_cast<int64_t>(b) * (Kp / GROUP) * BLOCK;
    const int runs = (ub - ua) * row_tiles;  // tile runs per chunk
    for (int g0 = 0; g0 < groups; g0 += CHUNK_GROUPS) {
      const int g1 = g0 + CHUNK_GROUPS < groups ? g0 + CHUNK_GROUPS : groups;
      const int iters = (g1 - g0) * ROWS_PER_GROUP;  // per tile
      const matmul_detail::ChunkPrefetch pf(wb + static_cast<int64_t>(g0) * ROWS_PER_GROUP * QUAD_BYTES, iters,
                                            QUAD_BYTES, runs);
      int t = 0;
      for (int u = ua; u < ub; ++u) {
        const int c = (u % UPB) * UNIT, n0 = b * BLOCK + c;
        if (n0 >= N) break;
        const int ncols = N - n0 < UNIT ? N - n0 : UNIT;
        float* pu = partial + static_cast<int64_t>(u % UPB) * M * UNIT;
        int m = m0;
        for (; m + ROWS <= m1; m += ROWS, ++t)
          q8_tile<ROWS, CV, BITS, true>(out + static_cast<int64_t>(m) * ldo, ldo, x.from(m), wb, sb, c, bias, n0, ncols,
                                      accumulate, g0, g1, pu + static_cast<int64_t>(m - m0) * UNIT, pf.share(t),
                                      pf.step);
        if (m < m1)
          q8_tail<ROWS, CV, BITS, true>(m1 - m, out + static_cast<int64_t>(m) * ldo, ldo, x.from(m), wb, sb, c, bias, n0,
                                      ncols, accumulate, g0, g1, pu + static_cast<int64_t>(m - m0) * UNIT,
                                      pf.share(t++), pf.step);
      }
    }
  }
}

// Rows m0..m1-1 against units u0..u1-1, a unit being CV registers of columns (a block holds 64 / (CV*L)),
// ROWS rows per tile sharing each weight load. With more than a few tiles of rows, a unit's weights go in
// equal slices along k of at most SLICE_BYTES that every tile of rows takes in turn, so that the tiles after
// the first read the slice from L1, not L2 (a unit of 64 int8 columns is 48 KB at K = 768 and 192 KB at
// 3,072, against Zen 5's 48 KB L1); the tiles' float sums wait in `partial` between slices. Measured on Zen 5,
// 2 threads, gpt2's four matrix shapes in int8 (warm): 512 rows 1,310 -> 1,405 GOP/s, 16 rows 965 -> 1,190;
// gpt2 int8 pp512 5,470 -> 5,975 tok/s, batch-16 decode +2%. int4 (16 KB units at K = 768) measured 2%
// slower in slices and goes whole. On Zen 4 (32 KB L1; Tuning::avx512_q8_slices) int8 goes whole too: 2
// threads, the four shapes warm in L3, alternating, median GOP/s: 512 rows 515 -> 528 (ahead in 7 of 8), 16
// rows 425 -> 512 (9 of 10), 32 rows 452 -> 515; gpt2 int8 pp512 +5.2% and batch-16 decode +5.8% (8 of 10
// each). Smaller slices were slower there still (pp512: 16 KB 0.98x, 8 KB 0.81x of 32 KB).
constexpr int SLICE_BYTES = 32768;

template <int ROWS, int CV, int BITS>
inline void q8_range(float* out, QRows x, const WeightView& w, const float* bias, int m0, int m1, int N, int ldo,
                     int u0, int u1, bool accumulate) {
  constexpr int UNIT = CV * L, UNITS_PER_BLOCK = BLOCK / UNIT;
  const int8_t* q = static_cast<const int8_t*>(w.data);
  const uint16_t* s = w.group_scales;
  const int Kp = x.Kp, groups = Kp / GROUP;
  constexpr int SLICE_GROUPS = SLICE_BYTES / (GROUP * UNIT * BITS / 8);
  const bool slices = BITS == 8 && m1 - m0 > 4 * ROWS && (L != 16 || tuning().avx512_q8_slices);
  const int n_slices = slices ? (groups + SLICE_GROUPS - 1) / SLICE_GROUPS : 1;
  const int slice = (groups + n_slices - 1) / n_slices;  // slices of equal size
  float* partial = n_slices > 1 ? scratch_floats(static_cast<int64_t>(m1 - m0) * UNIT, 0) : nullptr;
  for (int u = u0; u < u1; ++u) {
    const int b = u / UNITS_PER_BLOCK, c = (u % UNITS_PER_BLOCK) * UNIT, n0 = b * BLOCK + c;
    if (n0 >= N) break;
    const int ncols = N - n0 < UNIT ? N - n0 : UNIT;
    const int8_t* wb = q + b * block_bytes<BITS>(Kp);
    const uint16_t* sb = s + static_cast<int64_t>(b) * (Kp / GROUP) * BLOCK;
    for (int g0 = 0; g0 < groups; g0 += slice) {
      const int g1 = g0 + slice < groups ? g0 + slice : groups;
      int m = m0;
      for (; m + ROWS <= m1; m += ROWS)
        q8_tile<ROWS, CV, BITS>(out + static_cast<int64_t>(m) * ldo, ldo, x.from(m), wb, sb, c, bias, n0, ncols,
                              accumulate, g0, g1, partial ? partial + static_cast<int64_t>(m - m0) * UNIT : nullptr);
      if (m < m1)
        q8_tail<ROWS, CV, BITS>(m1 - m, out + static_cast<int64_t>(m) * ldo, ldo, x.from(m), wb, sb, c, bias, n0,
                              ncols, accumulate, g0, g1,
                              partial ? partial + static_cast<int64_t>(m - m0) * UNIT : nullptr);
    }
  }
}

// Tile shapes (rows x registers of columns). Decoding (M <= 2): rows one by one, each pass a whole 64-column
// block, whose 256-byte rows then stream front to back (4 ZMM or 8 YMM registers; the float sums, touched once
// a group, are what the compiler spills on AVX2). Half a block per pass, as AVX2 had it, reads two lines of
// every four and leaves the other two for a second pass: measured on Zen 5 in AVX2 mode, 2 threads, gpt2
// decode int8 276 -> 347 tok/s, int4 391 -> 500 (avx2-vnni int8 304 -> 313). More rows: as many as the
// register file holds with their int32 and float sums (AVX-512: 6 x 2 is 24 sums + 2 weights of 32 registers,
// 3 x 4 is 24 + 4; AVX2: 3 x 2 with VNNI, 2 x 2 with vpmaddubsw, which needs three more registers for its sign
// trick); see q8_matmul_forward.
constexpr int Q_CV = BLOCK / L;
constexpr int Q_ROWS_GEMM = L == 16 ? 6 : QDot::offset ? 3 : 2;
constexpr int Q_CV_GEMM = 2;

template <int ROWS, int CV, int BITS, bool CHUNKED = false>
void q8_parallel(float* out, QRows x, const uint8_t* skip, const float* inp, const WeightView& w, const float* bias,
                 int M, int K, int N, int ldi, int ldo, bool accumulate, bool parallel) {
  constexpr int UNIT = CV * L;
  const int units = (N + BLOCK - 1) / BLOCK * (BLOCK / UNIT);
  auto quantize = [&](int m0, int m1) { quantize_into(x, inp, skip, w, m0, m1, K, ldi); };
  // A decoding step's row or two are quantized before the team starts, as bf16_dot_matmul rounds them: a
  // barrier after quantizing in the team cost more than the quantizing (Zen 3, 2 threads, gpt2 decode, 60
  // rounds of old and new in one process: int4 +2.7%, int8 +1.6% median, ahead in 38 of 60 each).
  const bool before = M <= 2;
  if (before) quantize(0, M);
  // Tasks: column units, and the rows split too when there are too few units for the team; contiguous ranges
  // of them per thread, with stealing for decoding steps as matmul.inl's float paths (STEAL_MAX_M).
  const int team = parallel ? next_team_size() : 1;
  const int mgroups = units >= 2 * team || M < 2 * ROWS ? 1 : (2 * team + units - 1) / units;
  const int tasks = units * mgroups;
  StealingRanges ranges(tasks, M <= matmul_detail::STEAL_MAX_M ? 2 * (BLOCK / UNIT) : tasks, team);
  parallel_region_if(parallel, [&](int t, int nt) {
    if (!before) {
      quantize(static_cast<int>(static_cast<int64_t>(M) * t / nt), static_cast<int>(static_cast<int64_t>(M) * (t + 1) / nt));
      if (nt > 1) {
#pragma omp barrier
      }
    }
    ranges.run(t, nt, [&](int64_t k0, int64_t k1) {
      for (int task = static_cast<int>(k0); task < k1;) {
        const int g = task / units, u = task % units;
        const int u_end = (g + 1) * units < k1 ? units : static_cast<int>(k1) - g * units;
        const int m0 = static_cast<int>(static_cast<int64_t>(M) * g / mgroups);
        const int m1 = static_cast<int>(static_cast<int64_t>(M) * (g + 1) / mgroups);
        if constexpr (CHUNKED)
          q8_chunked<ROWS, CV, BITS>(out, x, w, bias, m0, m1, N, ldo, u, u_end, accumulate);
        else
          q8_range<ROWS, CV, BITS>(out, x, w, bias, m0, m1, N, ldo, u, u_end, accumulate);
        task += u_end - u;
      }
    });
  });
}

// int8 and int4 weights on the avx512-amx level, from AMX_Q8_MIN_M rows: each group's integer sums for 16 rows x
// 32 columns (half a block) come from two tile products, the weights' quad rows being already the tiles' layout
// (int8: tdpbssd, signed by signed bytes; int4: its nibbles laid out as bytes, value + 8, once per block and
// thread, then tdpbsud with the offset taken off as QDot's paths do); the vector units turn them into the float
// sums in the same operations and order as q8_tile (acc = fma(float(isum), xs * ws, acc) over the groups, then
// q8_finish), so the bits are every other level's. The float sums of a 16 x 64 tile wait in L1 between groups.
// Group g + 1's tile products are issued before group g's sums are scaled, into other tiles and the other of
// two buffers, in the hope that the tile unit and the vector units would work at once; measured, they do not
// (512 x 768 x 2304: tile part alone 1.43 ms, scaling alone 1.20, both 2.23): a group's K of 32 is half what a
// tile product takes in the same time, and its sums leave the tiles through memory every group. (int6, only the
// int4 format's LM head, which prefill runs for one row, keeps q8_tile.)
template <class TL, int BITS>
void q8_tiles_parallel(float* out, QRows x, const uint8_t* skip, const float* inp, const WeightView& w,
                       const float* bias, int M, int K, int N, int ldi, int ldo, bool accumulate, bool parallel) {
  static_assert(BITS == 8 || BITS == 4, "int8 or int4");
  constexpr int32_t offset = BITS == 4 ? 8 : 0;
  const int Kp = x.Kp, groups = Kp / GROUP, nb = (N + BLOCK - 1) / BLOCK;
  const int8_t* q = static_cast<const int8_t*>(w.data);
  const uint16_t* s = w.group_scales;
  int8_t* xq = const_cast<int8_t*>(x.xq);
  const int M16 = (M + 15) & ~15;
  std::memset(xq + static_cast<int64_t>(M) * Kp, 0, static_cast<size_t>(M16 - M) * Kp);  // rows the last tile reads
  parallel_region_if(parallel, [&](int t, int nt) {
    quantize_into(x, inp, skip, w, static_cast<int>(static_cast<int64_t>(M) * t / nt),
                  static_cast<int>(static_cast<int64_t>(M) * (t + 1) / nt), K, ldi);
    if (nt > 1) {
#pragma omp barrier
    }
    const int b0 = static_cast<int>(static_cast<int64_t>(nb) * t / nt);
    const int b1 = static_cast<int>(static_cast<int64_t>(nb) * (t + 1) / nt);
    if (b0 >= b1) return;
    // [16][64] float sums, two [16][32] int32 buffers (in [16][64]'s room), and for int4 the block's weights as
    // bytes [Kp/4][64][4].
    float* acc = scratch_floats(3 * 16 * BLOCK + (BITS == 4 ? static_cast<int64_t>(Kp) * BLOCK / 4 : 0), 0);
    int32_t* isum[2] = {reinterpret_cast<int32_t*>(acc + 16 * BLOCK), reinterpret_cast<int32_t*>(acc + 32 * BLOCK)};
    int8_t* bytes = reinterpret_cast<int8_t*>(acc + 48 * BLOCK);
    TL::configure_q8();
    for (int b = b0; b < b1; ++b) {
      const int n0 = b * BLOCK, ncols = N - n0 < BLOCK ? N - n0 : BLOCK;
      const int8_t* wb = q + b * block_bytes<BITS>(Kp);
      const uint16_t* sb = s + static_cast<int64_t>(b) * groups * BLOCK;
      if constexpr (BITS == 4) {
        TL::unpack_nibbles(bytes, reinterpret_cast<const uint8_t*>(wb), Kp / 8);
        wb = bytes;
      }
      for (int m0 = 0; m0 < M; m0 += 16) {
        const int rows = M - m0 < 16 ? M - m0 : 16;
        const QRows xr = x.from(m0);
        for (int h = 0; h < 2 && 32 * h < ncols; ++h) {  // halves of the block: 32 columns
          const int8_t* wh = wb + 128 * h;
          const int c0 = 32 * h;
          auto products = [&](int g) {
            const int8_t* wg = wh + static_cast<int64_t>(g) * QUADS * QUAD_BYTES;
            if (g & 1)
              TL::template q8_group_half<BITS == 4, 1>(isum[1], xr.xq + g * GROUP, Kp, wg);
            else
              TL::template q8_group_half<BITS == 4, 0>(isum[0], xr.xq + g * GROUP, Kp, wg);
          };
          products(0);
          for (int g = 0; g < groups; ++g) {
            if (g + 1 < groups) products(g + 1);
            const int32_t* c = isum[g & 1];
            const R sw0 = Vec::load_f16(sb + g * BLOCK + c0), sw1 = Vec::load_f16(sb + g * BLOCK + c0 + L);
            for (int i = 0; i < rows; ++i) {
              const R sx = Vec::set1(xr.xs[i * groups + g]);
              const I off = QDot::set1(offset * xr.xc[i * groups + g]);
              float* a = acc + i * BLOCK + c0;
              I d0 = QDot::load(reinterpret_cast<const int8_t*>(c + i * 32));
              I d1 = QDot::load(reinterpret_cast<const int8_t*>(c + i * 32 + L));
              if constexpr (offset != 0) {
                d0 = QDot::sub(d0, off);
                d1 = QDot::sub(d1, off);
              }
              const R a0 = g == 0 ? Vec::zero() : Vec::load(a), a1 = g == 0 ? Vec::zero() : Vec::load(a + L);
              Vec::store(a, Vec::fma(QDot::to_float(d0), Vec::mul(sx, sw0), a0));
              Vec::store(a + L, Vec::fma(QDot::to_float(d1), Vec::mul(sx, sw1), a1));
            }
          }
        }
        for (int i = 0; i < rows; ++i) {
          R r[4];
          for (int j = 0; j < 4; ++j) r[j] = Vec::load(acc + i * BLOCK + j * L);
          q8_finish<4>(out + static_cast<int64_t>(m0 + i) * ldo, r, xr, i, bias, n0, ncols, accumulate);
        }
      }
    }
    TL::release();
  });
}
constexpr int AMX_Q8_MIN_M = 16;

// The tile shapes for M rows of BITS-bit weights (see q8_matmul_forward for the buffers).
template <int BITS>
void q8_dispatch(float* out, QRows x, const uint8_t* skip, const float* inp, const WeightView& w, const float* bias,
                 int M, int K, int N, int ldi, int ldo, bool accumulate, bool parallel) {
  if constexpr (BITS != 6 && Tiles::available) {
    if (M >= AMX_Q8_MIN_M)
      return q8_tiles_parallel<Tiles, BITS>(out, x, skip, inp, w, bias, M, K, N, ldi, ldo, accumulate, parallel);
  }
  if (M <= 2) {
    return q8_parallel<1, Q_CV, BITS>(out, x, skip, inp, w, bias, M, K, N, ldi, ldo, accumulate, parallel);
  }
  if constexpr (L == 16) {
    // AVX-512 tile shapes by measurement (12 layers of gpt2 weights, cold in cache, Zen 5): int8 streams whole
    // 64-column blocks, whose 256-byte rows the memory system fetches best: 2 x 4 for a few rows, 3 x 4 above
    // (M = 16: 4.6-5.2 ms against 7.4-9.7 for 6 x 2; M = 512 the same). int4 reads half the bytes and keeps
    // 6 x 2 except for a few rows; int6 takes int4's shapes (its weights unpack the same way, into two registers).
    if constexpr (BITS != 8) {
      if (M <= 8) return q8_parallel<3, 4, BITS>(out, x, skip, inp, w, bias, M, K, N, ldi, ldo, accumulate, parallel);
      return q8_parallel<Q_ROWS_GEMM, Q_CV_GEMM, BITS>(out, x, skip, inp, w, bias, M, K, N, ldi, ldo, accumulate,
                                                        parallel);
    } else {
      if (M <= 8) return q8_parallel<2, 4, BITS>(out, x, skip, inp, w, bias, M, K, N, ldi, ldo, accumulate, parallel);
      return q8_parallel<3, 4, BITS>(out, x, skip, inp, w, bias, M, K, N, ldi, ldo, accumulate, parallel);
    }
  } else {
    // AVX-VNNI, measured the same way on Zen 5: int8 in whole-block 3 x 4 tiles (some sums spill) beat 2 x 2 at
    // 16 rows (478 vs 396 GOP/s) but not at 512 (571 vs 620). Without VNNI, see below.
    // Up to 32 rows, in prefetched chunks (q8_chunked). Zen 3 (AVX2, vpmaddubsw), 2 threads, 768 x 3072 cold,
    // interleaved best of 5: int8 9 rows 493 -> 356 us, 16 rows 719 -> 593, 32 rows 1,328 -> 1,165; int4 299
    // -> 238, 475 -> 392, 885 -> 721; 64 rows within 3% either way (so not there); 16 x 3072 x 768 int8 691 ->
    // 601, int4 534 -> 428. Chunks of 4 or 12 groups, or prefetching one or three chunks ahead, no better.
    // gpt2 batch-16 decode int8 283-327 -> 335-398 tok/s, int4 352-354 -> 439-441.
    // Without VNNI, by measurement on Zen 3 (2 threads, in one process alternating; 3 x 4 had beaten 2 x 2 on
    // Zen 5 in AVX2 mode): int8 2 x 4, whose 8 sums, 4 weights and the sign trick's 3 registers fit the 16
    // without spilling (3 x 4 spilled in the k loop);
    // int4 and int6 4 x 2 (8 int16 sums, 2 x 2 unpacked weights, 2 activations, the nibble mask). Against 3 x 4
    // and 2 x 2: gpt2 batch-16 decode int8 +13% median (8 of 8 rounds), int4 +11% and then its int6 head +9%
    // (8 of 8 each); 512 x 768 x 3072 int8 cold 124 -> 139 GOP/s, gpt2 int8 pp512 +7-12% median. int4 at 512
    // rows measured even between 2 x 2, 3 x 2 and 4 x 2 and stays 2 x 2.
    constexpr bool sign_trick = !QDot::offset;
    if (M <= 32) {
      if constexpr (BITS != 8 && sign_trick)
        return q8_parallel<4, 2, BITS, true>(out, x, skip, inp, w, bias, M, K, N, ldi, ldo, accumulate, parallel);
      else if constexpr (BITS != 8)
        return q8_parallel<Q_ROWS_GEMM, Q_CV_GEMM, BITS, true>(out, x, skip, inp, w, bias, M, K, N, ldi, ldo,
                                                              accumulate, parallel);
      else if constexpr (sign_trick)
        return q8_parallel<2, 4, BITS, true>(out, x, skip, inp, w, bias, M, K, N, ldi, ldo, accumulate, parallel);
      else
        return q8_parallel<3, 4, BITS, true>(out, x, skip, inp, w, bias, M, K, N, ldi, ldo, accumulate, parallel);
    }
    if constexpr (BITS == 8 && sign_trick)
      return q8_parallel<2, 4, BITS>(out, x, skip, inp, w, bias, M, K, N, ldi, ldo, accumulate, parallel);
    else
      return q8_parallel<Q_ROWS_GEMM, Q_CV_GEMM, BITS>(out, x, skip, inp, w, bias, M, K, N, ldi, ldo, accumulate,
                                                        parallel);
  }
}

}  // namespace qmatmul_detail

void q8_matmul_forward(float* out, const float* inp, WeightView w, const float* bias, int M, int K, int N, int ldi,
                       int ldo, bool accumulate) {
  using namespace qmatmul_detail;
  const int Kp = (K + GROUP - 1) / GROUP * GROUP;
  // Quantized activations in the calling thread's buffer, shared with the team: M*Kp bytes, the scales, the
  // offset corrections, the outlier channels' values, and a byte per channel marking them.
  // (xq has room for M rounded up to 16 rows: AMX tiles read 16 rows at a time.)
  const int64_t xq_floats = (static_cast<int64_t>((M + 15) & ~15) * Kp + 3) / 4;
  const int64_t per_group = static_cast<int64_t>(M) * (Kp / GROUP);
  const int n_out = w.n_outlier_rows;
  const int64_t xo_floats = static_cast<int64_t>(M) * n_out;
  float* buf = scratch_floats(xq_floats + 2 * per_group + xo_floats + (K + 3) / 4, 2);
  const QRows x{reinterpret_cast<int8_t*>(buf), buf + xq_floats, reinterpret_cast<int32_t*>(buf + xq_floats + per_group),
                Kp, buf + xq_floats + 2 * per_group, w.outlier_weights, n_out, N};
  uint8_t* skip = nullptr;
  if (n_out > 0) {
    skip = reinterpret_cast<uint8_t*>(buf + xq_floats + 2 * per_group + xo_floats);
    std::memset(skip, 0, K);
    for (int j = 0; j < w.n_outlier_rows; ++j) skip[w.outlier_rows[j]] = 1;
  }
  const bool parallel = static_cast<int64_t>(M) * K * N > 32768;
  switch (w.dtype) {
    case DType::q4: return q8_dispatch<4>(out, x, skip, inp, w, bias, M, K, N, ldi, ldo, accumulate, parallel);
    case DType::q6: return q8_dispatch<6>(out, x, skip, inp, w, bias, M, K, N, ldi, ldo, accumulate, parallel);
    default: return q8_dispatch<8>(out, x, skip, inp, w, bias, M, K, N, ldi, ldo, accumulate, parallel);
  }
}
