// Matrix multiplication, written once against `Vec` (included by each kernels_<isa>.cpp, before qmatmul.inl,
// which shares its tile epilogue, store_sums).
//
// matmul_forward: out[M,N] (+)= inp[M,K] @ weight[K,N] + bias, weight [in, out]: the blocked layout the loader
// converts to, read in place by the direct path at every row count, or the checkpoint's own row-major Conv1D
// layout, packed into panels for M >= PACK_MIN_M (prefill, batches) and streamed for fewer rows (decoding).
// In every path each output element is one fused multiply-add chain over k = 0..K-1 from zero, then + bias,
// then + out; so a row's result is bit-identical whichever path, tile or thread computes it, and whatever it
// is batched with. Threads take disjoint columns; no sum is split. (bf16 weights on a level with bf16 dot
// products have their own chain, over pairs of k, with the same properties: bf16_dot_matmul.) Grouped int8 /
// int4 weights go to qmatmul.inl.
//
// matmul_nt_forward: out[M,N] = inp[M,K] @ weight[N,K]^T, each element a vector dot product along k
// reduced in a fixed order; used for the LM head, whose weight is the token embedding table [vocab, n_embd].
namespace matmul_detail {

using R = Vec::reg;
constexpr int W = Vec::width;

// Width of a column block in the blocked weight layout (a multiple of every NB, and 64 int8 = a cache line).
constexpr int BLOCK_COLS = kBlockCols;

// Weight readers: the one place that knows a storage format. Every path loads weights through one of
// these, so all formats share the same kernels (grouped int8 has its own: qmatmul.inl). load / load_partial
// read W consecutive values of a row; the blocked paths walk a block's stored rows, each KSTEP rows of the
// matrix (load_row(p, s, exact): row s of them, from the stored row's column col(c); exact: loads that never
// pass the stored row, as the block's last needs: see BF16PairW), rows(K) of them a block.
struct F32W {
  using T = float;
  static constexpr int KSTEP = 1;
  static R load(const T* p) { return Vec::load(p); }
  static R load_partial(const T* p, int n) { return Vec::load_partial(p, n); }
  static R load_row(const T* p, int, bool) { return load(p); }
  static constexpr int col(int c) { return c; }
  static constexpr int rows(int K) { return K; }
};
struct F16W {
  using T = uint16_t;
  static constexpr int KSTEP = 1;
  static R load(const T* p) { return Vec::load_f16(p); }
  static R load_partial(const T* p, int n) { return Vec::load_f16_partial(p, n); }
  static R load_row(const T* p, int, bool) { return load(p); }
  static constexpr int col(int c) { return c; }
  static constexpr int rows(int K) { return K; }
};
struct BF16W {  // row-major bf16
  using T = uint16_t;
  static constexpr int KSTEP = 1;
  static R load(const T* p) { return Vec::load_bf16(p); }
  static R load_partial(const T* p, int n) { return Vec::load_bf16_partial(p, n); }
};
// Blocked bf16, in k pairs (kernels.h, kBf16Rows): a stored row holds rows k and k + 1 of the block's 64 columns,
// each column's two values side by side, so that the bf16 dot products (vdpbf16ps, AMX tiles) load them as they
// are; the float paths widen the two halves of the same lanes, k then k + 1 (the same FMA chain as row-major).
struct BF16PairW {
  using T = uint16_t;
  static constexpr int KSTEP = 2;
  // exact: odd rows masked out of the pair register as loaded, which never reads past it: the block's last stored
  // row must (AVX2's odd rows otherwise load again 2 bytes on, keeping a register free for a 6 x 2 tile), and
  // AVX2 one-row (decoding) tiles do, with registers to spare: the load 2 bytes on crosses a cache line every
  // other time (AVX-512's odd rows are always masked). Zen 3, 2 threads, one row against a 768 x 131072 matrix
  // from memory: bf16 at 0.76-0.79 of fp16's GB/s before, 0.90-0.98 after; gpt2 bf16 decode +1-11% (old and
  // new alternating, ahead in 4 of 4 rounds).
  static R load_row(const T* p, int s, bool exact) {
    return s == 0 ? Vec::load_bf16_even(p) : exact ? Vec::load_bf16_odd(p) : Vec::load_bf16_odd_within(p);
  }
  static constexpr int col(int c) { return 2 * c; }
  static constexpr int rows(int K) { return kBf16Rows(K); }
};
// The reader of a format's blocked layout.
template <class WR>
using BlockedW = std::conditional_t<std::is_same_v<WR, BF16W>, BF16PairW, WR>;

// Register budget: MR*NV accumulators + NV weight vectors + 1 broadcast must fit the register file
// (16 YMM for AVX2, 32 ZMM for AVX-512).
constexpr int NV = W == 16 ? 4 : 2;
constexpr int MR = W == 16 ? 6 : 6;

}  // namespace matmul_detail

namespace matmul_detail {

// Packed path, for M large enough that reusing a weight panel across many rows pays (prefill, batches).
// For each block of NB columns a thread copies KC rows of the weight into a contiguous KC x NB panel that
// stays in L1 while every MR-row tile of the input streams past it; partial sums live in a per-thread
// M x NB buffer between K blocks. Storing and reloading a float partial sum is exact, so each element is
// still the single FMA chain k = 0..K-1 of the unpacked path: the two paths give bit-identical rows.
constexpr int KC = W == 16 ? 128 : 192;

template <int mr>
inline void packed_tile(float* c, const float* a, int lda, const float* panel, int kc, bool first) {
  R acc[mr][NV];
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = first ? Vec::zero() : Vec::load(c + i * NV * W + j * W);
  const float* bp = panel;
  for (int k = 0; k < kc; ++k, bp += NV * W) {
    R b[NV];
    for (int j = 0; j < NV; ++j) b[j] = Vec::load(bp + j * W);
    for (int i = 0; i < mr; ++i) {
      R av = Vec::set1(a[static_cast<int64_t>(i) * lda + k]);
      for (int j = 0; j < NV; ++j) acc[i][j] = Vec::fma(av, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < NV; ++j) Vec::store(c + i * NV * W + j * W, acc[i][j]);
}

// Copies rows k0..k0+kc of columns [n0, n0+ncols) of a row-major [K][ldw] weight (the checkpoint's own Conv1D
// layout, used in place; the blocked layout is never packed, see matmul_impl) into a KC x NB panel,
// zero-padding a column tail.
template <class WR>
inline void pack_panel(float* panel, const typename WR::T* weight, int ldw, int k0, int kc, int n0, int ncols) {
  constexpr int NB = NV * W;
  for (int k = 0; k < kc; ++k) {
    const typename WR::T* src = weight + static_cast<int64_t>(k0 + k) * ldw + n0;
    float* dst = panel + k * NB;
    for (int j = 0; j < NV; ++j) {
      const int rem = ncols - j * W;
      Vec::store(dst + j * W, rem >= W ? WR::load(src + j * W) : rem > 0 ? WR::load_partial(src + j * W, rem) : Vec::zero());
    }
  }
}

// All row tiles of the input against one packed panel; partial sums in cbuf [M x NB].
inline void panel_times_rows(float* cbuf, const float* inp, int M, int ldi, int k0, int kc, const float* panel) {
  constexpr int NB = NV * W;
  const bool first = k0 == 0;
  int m = 0;
  for (; m + MR <= M; m += MR)
    packed_tile<MR>(cbuf + static_cast<int64_t>(m) * NB, inp + static_cast<int64_t>(m) * ldi + k0, ldi, panel, kc, first);
  const float* a = inp + static_cast<int64_t>(m) * ldi + k0;
  float* c = cbuf + static_cast<int64_t>(m) * NB;
  switch (M - m) {
    case 0: break;
    case 1: packed_tile<1>(c, a, ldi, panel, kc, first); break;
    case 2: packed_tile<2>(c, a, ldi, panel, kc, first); break;
    case 3: packed_tile<3>(c, a, ldi, panel, kc, first); break;
    case 4: packed_tile<4>(c, a, ldi, panel, kc, first); break;
    default: packed_tile<5>(c, a, ldi, panel, kc, first); break;
  }
}

// Epilogue, in the other paths' order: sum, + bias, then added to out.
inline void store_block(float* out, const float* cbuf, const float* bias, int M, int ldo, int n0,
                        int ncols, bool accumulate) {
  constexpr int NB = NV * W;
  for (int i = 0; i < M; ++i) {
    float* o = out + static_cast<int64_t>(i) * ldo + n0;
    const float* cr = cbuf + static_cast<int64_t>(i) * NB;
    for (int j = 0; j < NV; ++j) {
      const int rem = ncols - j * W;
      if (rem <= 0) break;
      R r = Vec::load(cr + j * W);
      if (rem >= W) {
        if (bias) r = Vec::add(r, Vec::load(bias + n0 + j * W));
        if (accumulate) r = Vec::add(Vec::load(o + j * W), r);
        Vec::store(o + j * W, r);
      } else {
        if (bias) r = Vec::add(r, Vec::load_partial(bias + n0 + j * W, rem));
        if (accumulate) r = Vec::add(Vec::load_partial(o + j * W, rem), r);
        Vec::store_partial(o + j * W, r, rem);
      }
    }
  }
}

// Many rows: one column block at a time, its panel reused by all M / MR row tiles.
template <class WR>
inline void packed_blocks(float* out, const float* inp, const typename WR::T* weight, const float* bias,
                          int M, int K, int N, int ldi, int ldo, int ldw, int b0, int b1,
                          bool accumulate) {
  constexpr int NB = NV * W;
  float* panel = scratch_floats(static_cast<int64_t>(KC) * NB + static_cast<int64_t>(M) * NB, 0);
  float* cbuf = panel + KC * NB;
  for (int b = b0; b < b1; ++b) {
    const int n0 = b * NB, ncols = N - n0 < NB ? N - n0 : NB;
    for (int k0 = 0; k0 < K; k0 += KC) {
      const int kc = K - k0 < KC ? K - k0 : KC;
      pack_panel<WR>(panel, weight, ldw, k0, kc, n0, ncols);
      panel_times_rows(cbuf, inp, M, ldi, k0, kc, panel);
    }
    store_block(out, cbuf, bias, M, ldo, n0, ncols, accumulate);
  }
}

// Few rows: KC rows of all the thread's blocks are packed together, reading each weight row sequentially.
// Rows per chunk in the wide variant: the thread's panels for one chunk stay well inside L2.
constexpr int KC_WIDE = 32;

template <class WR>
inline void packed_wide(float* out, const float* inp, const typename WR::T* weight, const float* bias,
                        int M, int K, int N, int ldi, int ldo, int ldw, int b0, int b1,
                        bool accumulate) {
  constexpr int NB = NV * W;
  const int nb = b1 - b0;
  // Panels sit PS floats apart: a power-of-two stride would map the same row of every panel to one L1 set.
  constexpr int64_t PS = static_cast<int64_t>(KC_WIDE) * NB + 16;
  float* panels = scratch_floats(PS * nb + static_cast<int64_t>(M) * NB * nb, 0);
  float* cbufs = panels + PS * nb;
  for (int k0 = 0; k0 < K; k0 += KC_WIDE) {
    const int kc = K - k0 < KC_WIDE ? K - k0 : KC_WIDE;
    for (int k = 0; k < kc; ++k)
      for (int b = b0; b < b1; ++b) {
        const int n0 = b * NB;
        pack_panel<WR>(panels + (b - b0) * PS + k * NB, weight, ldw, k0 + k, 1, n0, N - n0 < NB ? N - n0 : NB);
      }
    for (int b = b0; b < b1; ++b)
      panel_times_rows(cbufs + static_cast<int64_t>(b - b0) * M * NB, inp, M, ldi, k0, kc, panels + (b - b0) * PS);
  }
  for (int b = b0; b < b1; ++b) {
    const int n0 = b * NB;
    store_block(out, cbufs + static_cast<int64_t>(b - b0) * M * NB, bias, M, ldo, n0,
                N - n0 < NB ? N - n0 : NB, accumulate);
  }
}

constexpr int PACK_MIN_M = 8;
// Below this many rows a thread packs KC rows of its whole column range at once (long sequential reads of
// each weight row), since the panel is reused by only a few row tiles; above it, one block at a time.
constexpr int WIDE_PACK_MAX_M = 64;

// The epilogue of a tile's row: CV vectors of sums for columns n0.. (ncols of them valid), + bias, then added
// to out when accumulating.
template <int CV>
inline void store_sums(float* out_row, const R* acc, const float* bias, int n0, int ncols, bool accumulate) {
  float* o = out_row + n0;
  for (int j = 0; j < CV; ++j) {
    const int rem = ncols - j * W;
    if (rem <= 0) break;
    R r = acc[j];
    if (rem >= W) {
      if (bias) r = Vec::add(r, Vec::load(bias + n0 + j * W));
      if (accumulate) r = Vec::add(Vec::load(o + j * W), r);
      Vec::store(o + j * W, r);
    } else {
      if (bias) r = Vec::add(r, Vec::load_partial(bias + n0 + j * W, rem));
      if (accumulate) r = Vec::add(Vec::load_partial(o + j * W, rem), r);
      Vec::store_partial(o + j * W, r, rem);
    }
  }
}

// Direct path over the blocked layout: the micro-kernel reads each 64-column block where it is, front to back,
// without packing. A tile is ROWS rows of out against CV vectors of one block, the running sums in registers.
// Per element this is again the FMA chain k = 0..K-1 from zero, then + bias, then + out.
// Decoding (one row) reads each weight byte once, front to back; where a tile spends several instructions a byte
// (widening 16-bit weights, unpacking int8 / int4 / int6), the hardware prefetcher alone fell behind, and such
// tiles prefetch the weights DECODE_AHEAD bytes on (2-8 KB measured alike on Zen 3, none 10-30% slower in
// the int8 / int6 LM head alone). `bytes` from p, a line at a time; a hint only, so it may pass the end.
// LOCALITY 3 fetches into L1; 2 (prefetcht1) into L2, DECODE_AHEAD_L2 on, where L1 measured slower (qmatmul.inl).
constexpr int DECODE_AHEAD = 4096;
constexpr int DECODE_AHEAD_L2 = 16384;
template <int AHEAD = DECODE_AHEAD, int LOCALITY = 3>
inline void prefetch_ahead(const void* p, int bytes) {
  for (int l = 0; l < bytes; l += 64) __builtin_prefetch(static_cast<const char*>(p) + AHEAD + l, 0, LOCALITY);
}

// Up to this many rows (decoding steps, batched or not) the threads split a matrix's columns with stealing
// (cpu/parallel.h's StealingRanges) in ranges of two blocks. Zen 3, 2 threads, gpt2, with and without stealing
// (in the matrices and attention) alternating in one process: batch-16 decode fp32 +0-3.5% median over three
// processes (an earlier variant +4-20%), int8 +3%, fp16 / bf16 +2-4%; batch-1 decode int4 +2.2%, int8 +3.6%,
// fp16 +1.3% (ahead in 14-16 of 20 rounds). pp512 measured even: above this each thread's range goes whole.
constexpr int STEAL_MAX_M = 64;

template <class WR, int ROWS, int CV>
inline void blocked_tile(float* out, const float* inp, const typename WR::T* block, const float* bias, int K, int ldi,
                         int ldo, int n0, int ncols, bool accumulate) {
  R acc[ROWS][CV];
  for (int i = 0; i < ROWS; ++i)
    for (int j = 0; j < CV; ++j) acc[i][j] = Vec::zero();
  const typename WR::T* wp = block;
  constexpr int KS = WR::KSTEP;
  // AVX2 decoding of 16-bit weights (one row, a whole block per pass) prefetches ahead (prefetch_ahead). Zen 3,
  // 2 threads, gpt2 decode, builds alternating over 6 rounds: bf16 69-77 -> 67-84 tok/s (ahead in 5 of 6),
  // fp16 68-83 -> 72-83 (ahead in 3); fp32 (one FMA a load) measured even alone and is left as it was.
  constexpr bool decode_prefetch = ROWS == 1 && CV * W == BLOCK_COLS && W == 8 && !std::is_same_v<WR, F32W>;
  // Unrolled by 4: a one-row tile's loop is a handful of instructions per 256 bytes, and its bookkeeping kept
  // fp32 decoding below what memory gives while the host's bandwidth was low (gpt2, Zen 5, 2 threads, ~50 GB/s:
  // AVX-512 87-90 -> 98-103 tok/s; at ~83 GB/s unchanged); AVX2 fp32 batch-16 401 -> 481-508; prefill unchanged.
  // Weight rows k .. k + n - 1 of the stored row at wp (bf16 pairs: n = 2, or 1 for an odd K's last row; exact:
  // see BF16PairW). (Written out in each kernel: passing acc to a helper by reference left GCC
  // keeping it in memory.)
#define GPTCPP_WEIGHT_ROWS_FMA(n, exact)                                                        \
  for (int s = 0; s < (n); ++s) {                                                               \
    R b[CV];                                                                                    \
    for (int j = 0; j < CV; ++j) b[j] = WR::load_row(wp + WR::col(j * W), s, exact);            \
    for (int i = 0; i < ROWS; ++i) {                                                            \
      const R a = Vec::set1(inp[static_cast<int64_t>(i) * ldi + k0 + k + s]);                   \
      for (int j = 0; j < CV; ++j) acc[i][j] = Vec::fma(a, b[j], acc[i][j]);                    \
    }                                                                                           \
  }
  constexpr int k0 = 0;
  int k = 0;
#pragma GCC unroll 4
  for (; k + KS < K; k += KS, wp += KS * BLOCK_COLS) {
    if constexpr (decode_prefetch) prefetch_ahead(wp, KS * BLOCK_COLS * sizeof(typename WR::T));
    GPTCPP_WEIGHT_ROWS_FMA(KS, ROWS == 1)  // the last block is zero-padded; one row: see BF16PairW
  }
  if (k < K) {
    GPTCPP_WEIGHT_ROWS_FMA(K - k, true)  // the last stored row (bf16: an odd K's last row alone in its pair)
  }
  for (int i = 0; i < ROWS; ++i) store_sums<CV>(out + static_cast<int64_t>(i) * ldo, acc[i], bias, n0, ncols, accumulate);
}

// The last rows (fewer than ROWS) of a pass, as one tile.
template <class WR, int ROWS, int CV>
inline void blocked_tail(int rows, float* out, const float* inp, const typename WR::T* block, const float* bias, int K,
                         int ldi, int ldo, int n0, int ncols, bool accumulate) {
  if constexpr (ROWS > 1) {
    if (rows == ROWS - 1) return blocked_tile<WR, ROWS - 1, CV>(out, inp, block, bias, K, ldi, ldo, n0, ncols, accumulate);
    return blocked_tail<WR, ROWS - 1, CV>(rows, out, inp, block, bias, K, ldi, ldo, n0, ncols, accumulate);
  }
}

// Column blocks b0..b1-1, each in passes of CV vectors over SR rows at a time: a pass reads its weights once
// from memory and the pass's other row tiles find them in L1/L2.
template <class WR, int SR, int CV>
inline void blocked_passes(float* out, const float* inp, const typename WR::T* weight, const float* bias, int M, int K,
                           int N, int ldi, int ldo, int b0, int b1, bool accumulate) {
  constexpr int PASS = CV * W;
  for (int b = b0; b < b1; ++b) {
    for (int c = 0; c < BLOCK_COLS; c += PASS) {
      const int n0 = b * BLOCK_COLS + c;
      if (n0 >= N) break;
      const int ncols = N - n0 < PASS ? N - n0 : PASS;
      const typename WR::T* block = weight + static_cast<int64_t>(b) * WR::rows(K) * BLOCK_COLS + WR::col(c);
      int m = 0;
      for (; m + SR <= M; m += SR)
        blocked_tile<WR, SR, CV>(out + static_cast<int64_t>(m) * ldo, inp + static_cast<int64_t>(m) * ldi, block, bias,
                                 K, ldi, ldo, n0, ncols, accumulate);
      if (m < M)
        blocked_tail<WR, SR, CV>(M - m, out + static_cast<int64_t>(m) * ldo, inp + static_cast<int64_t>(m) * ldi, block,
                                 bias, K, ldi, ldo, n0, ncols, accumulate);
    }
  }
}

// Chunked passes: the blocked path for batches, where blocked_passes leaves memory and arithmetic taking
// turns. There, a pass's first row tile pulls each weight line from memory while its FMAs wait on it, and
// the pass's other row tiles then find the lines in cache and run with the bus idle. Here each column block
// is walked KCH weight rows (one chunk) at a time: every row tile runs over the chunk, in each column pass, in
// cache, and meanwhile each tile iteration prefetches a share of the chunk two ahead (the layout is one
// contiguous stream, so that may be the next block's), spread evenly over all of the chunk's iterations so
// that the loads of the next chunks overlap all of this one's arithmetic. Partial sums wait in part
// [M x BLOCK_COLS] between chunks: storing and reloading a float is exact, so each element is still the
// single FMA chain k = 0..K-1 of blocked_tile, and a row's bits do not depend on the path or the batch.
// The prefetch goes to L1 (prefetcht0): to L2 it measured far worse on Zen 5. Measured choices in
// blocked_direct.
// The prefetch schedule of a chunked kernel (here and qmatmul.inl's q8_chunked): the chunk AHEAD chunks on
// (weight rows of row_bytes, one contiguous stream, so it may be the next block's) split evenly over the `runs`
// tile runs of this chunk, each of `iters` iterations prefetching `step` bytes. A hint only (it never faults),
// so it may point past the last block; integer arithmetic keeps the pointer out of it.
struct ChunkPrefetch {
  static constexpr int AHEAD = 2;  // chunks; one ahead measured a little slower on both ISAs
  uintptr_t ahead;
  int iters, step;
  ChunkPrefetch(const void* chunk, int iters, int row_bytes, int runs)
      : ahead(reinterpret_cast<uintptr_t>(chunk) + static_cast<uintptr_t>(AHEAD) * iters * row_bytes),
        iters(iters), step((row_bytes + runs - 1) / runs) {}
  const char* share(int run) const {  // where tile run `run` starts prefetching
    return reinterpret_cast<const char*>(ahead + static_cast<uintptr_t>(run) * iters * step);
  }
};

template <class WR, int ROWS, int CV>
inline void chunk_tile(float* part, const float* inp, const typename WR::T* chunk, int k0, int kc, int ldi, bool first,
                       const char* prefetch, int prefetch_step) {
  R acc[ROWS][CV];
  for (int i = 0; i < ROWS; ++i)
    for (int j = 0; j < CV; ++j) acc[i][j] = first ? Vec::zero() : Vec::load(part + i * BLOCK_COLS + j * W);
  const typename WR::T* wp = chunk;
  constexpr int KS = WR::KSTEP;
  int k = 0;
#pragma GCC unroll 4
  for (; k + KS < kc; k += KS, wp += KS * BLOCK_COLS) {
    for (int s = 0; s < KS; ++s) __builtin_prefetch(prefetch + static_cast<int64_t>(k + s) * prefetch_step, 0, 3);
    GPTCPP_WEIGHT_ROWS_FMA(KS, false)
  }
  if (k < kc) {  // the chunk's last stored row (bf16: an odd K's last row alone in its pair; chunks start even)
    for (int s = 0; s < kc - k; ++s) __builtin_prefetch(prefetch + static_cast<int64_t>(k + s) * prefetch_step, 0, 3);
    GPTCPP_WEIGHT_ROWS_FMA(kc - k, true)
  }
  for (int i = 0; i < ROWS; ++i)
    for (int j = 0; j < CV; ++j) Vec::store(part + i * BLOCK_COLS + j * W, acc[i][j]);
}
#undef GPTCPP_WEIGHT_ROWS_FMA

template <class WR, int ROWS, int CV>
inline void chunk_tail(int rows, float* part, const float* inp, const typename WR::T* chunk, int k0, int kc, int ldi,
                       bool first, const char* prefetch, int prefetch_step) {
  if constexpr (ROWS > 1) {
    if (rows == ROWS - 1)
      return chunk_tile<WR, ROWS - 1, CV>(part, inp, chunk, k0, kc, ldi, first, prefetch, prefetch_step);
    return chunk_tail<WR, ROWS - 1, CV>(rows, part, inp, chunk, k0, kc, ldi, first, prefetch, prefetch_step);
  }
}

// Every row tile of a chunk (kc weight rows at src, read by RD) through all of the block's column passes, tile
// run t of the chunk prefetching its share of pf.
template <class RD, int SR, int CV>
inline void chunk_tiles(float* part, const float* inp, const typename RD::T* src, int M, int k0, int kc, int ldi,
                        bool first, const ChunkPrefetch& pf) {
  constexpr int PASS = CV * W;
  // Row tile by row tile, each through all of the block's column passes (AVX2: four), so that the tile's rows of
  // inp stay in L1 while the chunk does too; passes outside made every pass re-read all M rows from L2: fp32
  // 512 x 768 x 3072 20.2 -> 17.4 ms (Zen 3), 512 x 3072 x 768 23.0 -> 22.2, 16 rows even.
  int t = 0, m = 0;
  for (; m + SR <= M; m += SR)
    for (int c = 0; c < BLOCK_COLS; c += PASS, ++t)
      chunk_tile<RD, SR, CV>(part + m * BLOCK_COLS + c, inp + static_cast<int64_t>(m) * ldi, src + RD::col(c), k0, kc,
                             ldi, first, pf.share(t), pf.step);
  if (m < M)
    for (int c = 0; c < BLOCK_COLS; c += PASS, ++t)
      chunk_tail<RD, SR, CV>(M - m, part + m * BLOCK_COLS + c, inp + static_cast<int64_t>(m) * ldi, src + RD::col(c),
                             k0, kc, ldi, first, pf.share(t), pf.step);
}

// Prefill over 16-bit weights (fp16; bf16 on levels without bf16 dot products) widens a weight vector once per row
// tile, which costs about what its FMAs do. With WIDEN each chunk is widened to float32 once, into a panel
// [KCH][64] that every row tile then reads as float32 (the same FMA chain, the same bits).
template <class WR>
inline void widen_rows(float* panel, const typename WR::T* rows, int kc) {
  for (int r = 0; r < kc; r += WR::KSTEP, rows += WR::KSTEP * BLOCK_COLS)
    for (int s = 0; s < WR::KSTEP && r + s < kc; ++s)
      for (int j = 0; j < BLOCK_COLS / W; ++j)
        Vec::store(panel + (r + s) * BLOCK_COLS + j * W, WR::load_row(rows + WR::col(j * W), s, true));
}

// Widened panels on AVX-512, from Tuning::avx512_widen_rows rows (64; never on Zen 4, see cpu/isa.cpp). Intel
// Xeon (AMX machine), 2 threads, gpt2 pp512, alternating: fp16 1,592-1,623 -> 1,761-1,791 tok/s, bf16 at
// avx512-vnni 1,784 -> 1,901-1,913 (fp32 and batch-16 untouched). AVX2 measured +2-5% there but is tuned on
// Zen 3, where this is unmeasured: it keeps its 6 x 2 passes.

// Tiles of SR rows x CV vectors, chunks of KCH weight rows (with WIDEN, widened into a float32 panel first).
template <class WR, int SR, int CV, int KCH, bool WIDEN = false>
inline void chunked_passes(float* out, const float* inp, const typename WR::T* weight, const float* bias, int M, int K,
                           int N, int ldi, int ldo, int b0, int b1, bool accumulate) {
  constexpr int CB = BLOCK_COLS / W;
  constexpr int ROW_BYTES = BLOCK_COLS * sizeof(typename WR::T);
  float* part = scratch_floats(static_cast<int64_t>(M) * BLOCK_COLS + (WIDEN ? KCH * BLOCK_COLS : 0), 0);
  float* panel = part + static_cast<int64_t>(M) * BLOCK_COLS;
  const int runs = (BLOCK_COLS / (CV * W)) * ((M + SR - 1) / SR);  // tile runs per chunk
  for (int b = b0; b < b1; ++b) {
    const typename WR::T* block = weight + static_cast<int64_t>(b) * WR::rows(K) * BLOCK_COLS;
    const int n0 = b * BLOCK_COLS;
    for (int k0 = 0; k0 < K; k0 += KCH) {
      const int kc = K - k0 < KCH ? K - k0 : KCH;
      const bool first = k0 == 0;
      const typename WR::T* chunk = block + static_cast<int64_t>(k0) * BLOCK_COLS;  // KCH is even: pairs whole
      const ChunkPrefetch pf(chunk, kc, ROW_BYTES, runs);
      if constexpr (WIDEN) {
        widen_rows<WR>(panel, chunk, kc);
        chunk_tiles<F32W, SR, CV>(part, inp, panel, M, k0, kc, ldi, first, pf);
      } else {
        chunk_tiles<WR, SR, CV>(part, inp, chunk, M, k0, kc, ldi, first, pf);
      }
    }
    const int ncols = N - n0 < BLOCK_COLS ? N - n0 : BLOCK_COLS;
    for (int i = 0; i < M; ++i) {
      R acc[CB];
      for (int j = 0; j < CB; ++j) acc[j] = Vec::load(part + i * BLOCK_COLS + j * W);
      store_sums<CB>(out + static_cast<int64_t>(i) * ldo, acc, bias, n0, ncols, accumulate);
    }
  }
}

// One row against two adjacent column blocks at once (AVX-512 decoding): two sequential streams from memory in
// flight instead of one, 8 sums in registers. Per element the same FMA chain as blocked_tile. gpt2 decode, Zen 5,
// 2 threads, ~85 GB/s, five alternating rounds: fp16 272-283 -> 290-297 tok/s (87% of the probe), fp32
// 156-158 -> 157-161; four more, the host's bandwidth moving within rounds: best fp16 271 -> 282, fp32 153 -> 156.
template <class WR>
inline void blocked_pair_tile(float* out, const float* inp, const typename WR::T* block, const float* bias, int K,
                              int n0, int N, bool accumulate) {
  constexpr int CV = BLOCK_COLS / W;
  R acc[2 * CV];
  for (int j = 0; j < 2 * CV; ++j) acc[j] = Vec::zero();
  constexpr int KS = WR::KSTEP;
  const typename WR::T* w0 = block;
  const typename WR::T* w1 = block + static_cast<int64_t>(WR::rows(K)) * BLOCK_COLS;
  int k = 0;
  auto rows = [&](int n, bool last) {  // weight rows k .. k + n - 1 of the stored rows at w0 and w1
    for (int s = 0; s < n; ++s) {
      const R a = Vec::set1(inp[k + s]);
      for (int j = 0; j < CV; ++j) acc[j] = Vec::fma(a, WR::load_row(w0 + WR::col(j * W), s, last), acc[j]);
      for (int j = 0; j < CV; ++j) acc[CV + j] = Vec::fma(a, WR::load_row(w1 + WR::col(j * W), s, last), acc[CV + j]);
    }
  };
#pragma GCC unroll 2
  for (; k + KS < K; k += KS, w0 += KS * BLOCK_COLS, w1 += KS * BLOCK_COLS) rows(KS, false);
  if (k < K) rows(K - k, true);  // the last stored row (bf16: an odd K's last row alone in its pair)
  store_sums<CV>(out, acc, bias, n0, N - n0 < BLOCK_COLS ? N - n0 : BLOCK_COLS, accumulate);
  const int n1 = n0 + BLOCK_COLS;
  store_sums<CV>(out, acc + CV, bias, n1, N - n1 < BLOCK_COLS ? N - n1 : BLOCK_COLS, accumulate);
}

// The blocked layout read in place at every row count (only row-major weights are packed, see matmul_impl).
// Tile shapes (SR x CV sums + CV weights + a broadcast within 32 ZMM / 16 YMM registers), by measurement on
// 12 layers of gpt2 weights cold in cache, Zen 5, 2 threads:
// - AVX-512: 6 x 4 from 2 rows on (one row: two blocks at a time, blocked_pair_tile); against packing panels,
//   fp16 16 rows 9 ms instead of 16, 64 rows 27 instead of 37, 512 rows 192 instead of 204.
// - AVX2, one row (decoding), and fp32 up to 3 rows: 1 x 8, a whole block per pass, each 256-byte row of fp32
//   read front to back (the weights go straight from memory into the FMAs, 8 sums + a broadcast in registers);
//   2 x 4 read two lines of every four and left the other two for a second pass: gpt2 decode fp32 75 -> 92
//   tok/s, fp16 163 -> 186, bf16 146 -> 183, fp32 batch-4 213 -> 277, batch-8 292 -> 380 (1 x 8 would widen
//   fp16/bf16 weights once per row). Past those, 6 x 2, 16 columns (a cache line of fp32) per pass, each
//   weight register shared by three times as many rows: fp32 batch-16 decode 346 -> 427 tok/s, pp512 1,215 ->
//   1,300 (packed before), the attention's own products included; fp16 pp512 1,299 -> 1,405, bf16 1,371 ->
//   1,402; since then in chunks where that measured faster (below).
// Chunked passes (same tiles, chunks of K, prefetch two chunks ahead), where they measured faster:
// - AVX-512 fp32, 16 to 48 rows, chunks of 128 rows (32 KB of fp32; 64, 96, 192, 256 were slower), Zen 5, cold
//   weights, ~85 GB/s: 16 x 768 x 3072 220-250 -> 163-177 us, 16 x 3072 x 768 238-251 -> 169-177, the fp32 LM
//   head 3.9 -> 2.8 ms, 24 rows 293 -> 227, 48 rows 508 -> 448; gpt2 fp32 batch-16 decode 867-929 -> 1,027-1,096
//   tok/s. Slower at 8 and 12 rows (152 -> 239, 182 -> 246 us): too few tiles to hide a chunk's loads behind.
//   On Zen 4 chunks start at 24 rows (Tuning::avx512_fp32_chunk_rows). There plain passes against chunks, 2
//   threads, gpt2's four shapes warm in L3, alternating, median of 10: 16 rows 1.01-1.06x, 20 rows 0.99x, 24
//   rows 0.93x, 32 rows 0.94x, 48 rows 0.96x; gpt2 fp32 batch-16 decode +13% median (ahead in 10 of 10 rounds,
//   best 434 -> 466 tok/s).
// - AVX2, chunks of 64 rows (16 KB of fp32; 32 was as fast, 128 slower), Zen 3, 2 threads, cold, ~16 GB/s,
//   interleaved: fp32 from 4 rows (768 x 3072: 4 rows 933 -> 781 us, 8 rows 1,412 -> 891, 16 rows 1,346 ->
//   646, 64 rows 3,309 -> 1,958, 512 rows 20.7 -> 20.2 ms; 16 x 3072 x 768 2,392 -> 776 us, 512 rows 28.6 ->
//   22.3 ms; 1 row 510 -> 736 and 2 rows even, so 1 x 8 stays there); fp16 and bf16 from 2 to 64 rows
//   (fp16 2 rows 323 -> 271, 8 rows 588 -> 387, 16 rows 850 -> 610, 64 rows 2,690 -> 2,292; bf16 504 -> 349,
//   933 -> 601, 1,070 -> 740, 3,195 -> 2,400; even at 128 rows, slower from 256: 6 x 2 passes stay there).
//   This replaced 2 x 4 passes for fp16 and bf16 and 6 x 2 for fp32 beyond 8 rows. Those passes read one line
//   of every four of a row, so even a warm pass missed L1; a chunk stays in it. gpt2 batch-16 decode: fp32
//   149-168 -> 348-363 tok/s, fp16 256-265 -> 327-361, bf16 224-229 -> 324-328; fp32 pp512 464-579 -> 623-705.
//   AVX-512 fp16 and bf16 (without bf16 dot products) are not measured with chunks yet.
template <class WR>
inline void blocked_direct(float* out, const float* inp, const typename WR::T* weight, const float* bias, int M, int K,
                           int N, int ldi, int ldo, int b0, int b1, bool accumulate) {
  constexpr bool f32 = std::is_same_v<WR, F32W>;
  if constexpr (W == 16) {
    if (M == 1) {
      int b = b0;
      for (; b + 2 <= b1; b += 2)
        blocked_pair_tile<WR>(out, inp, weight + static_cast<int64_t>(b) * WR::rows(K) * BLOCK_COLS, bias, K,
                              b * BLOCK_COLS, N, accumulate);
      if (b < b1) blocked_passes<WR, 6, 4>(out, inp, weight, bias, M, K, N, ldi, ldo, b, b1, accumulate);
      return;
    }
    const Tuning tune = tuning();
    if (!f32 && tune.avx512_widen_rows > 0 && M >= tune.avx512_widen_rows)
      return chunked_passes<WR, 6, 4, 128, true>(out, inp, weight, bias, M, K, N, ldi, ldo, b0, b1, accumulate);
    if (f32 && M >= tune.avx512_fp32_chunk_rows && M <= 48) {
      if (tune.avx512_fp32_chunk_k == 32)
        return chunked_passes<WR, 6, 4, 32>(out, inp, weight, bias, M, K, N, ldi, ldo, b0, b1, accumulate);
      if (tune.avx512_fp32_chunk_k == 64)
        return chunked_passes<WR, 6, 4, 64>(out, inp, weight, bias, M, K, N, ldi, ldo, b0, b1, accumulate);
      return chunked_passes<WR, 6, 4, 128>(out, inp, weight, bias, M, K, N, ldi, ldo, b0, b1, accumulate);
    }
    blocked_passes<WR, 6, 4>(out, inp, weight, bias, M, K, N, ldi, ldo, b0, b1, accumulate);
  } else {
    if (M == 1 || (f32 && M <= 3))
      return blocked_passes<WR, 1, 8>(out, inp, weight, bias, M, K, N, ldi, ldo, b0, b1, accumulate);
    if (f32 || M <= 64)
      return chunked_passes<WR, 6, 2, 64>(out, inp, weight, bias, M, K, N, ldi, ldo, b0, b1, accumulate);
    blocked_passes<WR, 6, 2>(out, inp, weight, bias, M, K, N, ldi, ldo, b0, b1, accumulate);
  }
}

// Streaming path over row-major weights, for the few rows of a decoding step: bandwidth, not arithmetic, is
// the limit. Each thread owns a contiguous range of columns and walks the weight rows in order, four at a time,
// so every weight byte is read once in long sequential runs; the running sums of its columns stay in L1. Per
// element this is again the FMA chain k = 0..K-1 from zero, then + bias, then + out, as in the other paths.
template <class WR>
inline void streaming_columns(float* out, const float* inp, const typename WR::T* weight, const float* bias,
                              int M, int K, int ldi, int ldo, int ldw, int c0, int c1,
                              bool accumulate, float* ybuf) {
  const int width = c1 - c0;
  for (int64_t i = 0; i < static_cast<int64_t>(M) * width; ++i) ybuf[i] = 0.0f;
  for (int k = 0; k < K; k += 4) {
    const int kk = K - k < 4 ? K - k : 4;
    const typename WR::T* w0 = weight + static_cast<int64_t>(k) * ldw + c0;
    for (int m = 0; m < M; ++m) {
      const float* x = inp + static_cast<int64_t>(m) * ldi + k;
      float* y = ybuf + static_cast<int64_t>(m) * width;
      if (kk == 4) {
        const R x0 = Vec::set1(x[0]), x1 = Vec::set1(x[1]), x2 = Vec::set1(x[2]), x3 = Vec::set1(x[3]);
        const typename WR::T *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
        int j = 0;
        // Four columns vectors at a time: four independent FMA chains in flight, since each chain itself
        // must stay in k order.
        for (; j + 4 * W <= width; j += 4 * W) {
          R a0 = Vec::load(y + j), a1 = Vec::load(y + j + W), a2 = Vec::load(y + j + 2 * W), a3 = Vec::load(y + j + 3 * W);
          a0 = Vec::fma(x0, WR::load(w0 + j), a0);
          a1 = Vec::fma(x0, WR::load(w0 + j + W), a1);
          a2 = Vec::fma(x0, WR::load(w0 + j + 2 * W), a2);
          a3 = Vec::fma(x0, WR::load(w0 + j + 3 * W), a3);
          a0 = Vec::fma(x1, WR::load(w1 + j), a0);
          a1 = Vec::fma(x1, WR::load(w1 + j + W), a1);
          a2 = Vec::fma(x1, WR::load(w1 + j + 2 * W), a2);
          a3 = Vec::fma(x1, WR::load(w1 + j + 3 * W), a3);
          a0 = Vec::fma(x2, WR::load(w2 + j), a0);
          a1 = Vec::fma(x2, WR::load(w2 + j + W), a1);
          a2 = Vec::fma(x2, WR::load(w2 + j + 2 * W), a2);
          a3 = Vec::fma(x2, WR::load(w2 + j + 3 * W), a3);
          a0 = Vec::fma(x3, WR::load(w3 + j), a0);
          a1 = Vec::fma(x3, WR::load(w3 + j + W), a1);
          a2 = Vec::fma(x3, WR::load(w3 + j + 2 * W), a2);
          a3 = Vec::fma(x3, WR::load(w3 + j + 3 * W), a3);
          Vec::store(y + j, a0);
          Vec::store(y + j + W, a1);
          Vec::store(y + j + 2 * W, a2);
          Vec::store(y + j + 3 * W, a3);
        }
        for (; j + W <= width; j += W) {
          R acc = Vec::load(y + j);
          acc = Vec::fma(x0, WR::load(w0 + j), acc);
          acc = Vec::fma(x1, WR::load(w1 + j), acc);
          acc = Vec::fma(x2, WR::load(w2 + j), acc);
          acc = Vec::fma(x3, WR::load(w3 + j), acc);
          Vec::store(y + j, acc);
        }
        if (j < width) {
          const int rem = width - j;
          R acc = Vec::load_partial(y + j, rem);
          acc = Vec::fma(x0, WR::load_partial(w0 + j, rem), acc);
          acc = Vec::fma(x1, WR::load_partial(w1 + j, rem), acc);
          acc = Vec::fma(x2, WR::load_partial(w2 + j, rem), acc);
          acc = Vec::fma(x3, WR::load_partial(w3 + j, rem), acc);
          Vec::store_partial(y + j, acc, rem);
        }
      } else {
        for (int q = 0; q < kk; ++q) {
          const R xq = Vec::set1(x[q]);
          const typename WR::T* wq = w0 + static_cast<int64_t>(q) * ldw;
          int j = 0;
          for (; j + W <= width; j += W) Vec::store(y + j, Vec::fma(xq, WR::load(wq + j), Vec::load(y + j)));
          if (j < width) {
            const int rem = width - j;
            Vec::store_partial(y + j, Vec::fma(xq, WR::load_partial(wq + j, rem), Vec::load_partial(y + j, rem)), rem);
          }
        }
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    float* o = out + static_cast<int64_t>(m) * ldo + c0;
    const float* y = ybuf + static_cast<int64_t>(m) * width;
    const float* bb = bias ? bias + c0 : nullptr;
    int j = 0;
    for (; j + W <= width; j += W) {
      R r = Vec::load(y + j);
      if (bb) r = Vec::add(r, Vec::load(bb + j));
      if (accumulate) r = Vec::add(Vec::load(o + j), r);
      Vec::store(o + j, r);
    }
    if (j < width) {
      const int rem = width - j;
      R r = Vec::load_partial(y + j, rem);
      if (bb) r = Vec::add(r, Vec::load_partial(bb + j, rem));
      if (accumulate) r = Vec::add(Vec::load_partial(o + j, rem), r);
      Vec::store_partial(o + j, r, rem);
    }
  }
}

}  // namespace matmul_detail

namespace matmul_detail {

// bf16 weights where the CPU multiplies bf16 pairs (BDot::available: the avx512-bf16 level). The activations are
// rounded to bf16 once per call (nearest even: a relative error of at most 2^-9 each), and every output element
// is the chain of vdpbf16ps over the k pairs (0, 1), (2, 3), ... from zero (an odd K's last k paired with a
// zero), then + bias, then + out. An instruction does twice the products of an FMA, which is what prefill and
// batches are bound by. As in the float paths a row's result does not depend on the tile, thread or batch that
// computes it; unlike them the activations are rounded, which takes the outlier test model's bf16 logit error
// from 0.38% to 0.48% of the logits' RMS (tests/test_dtypes.py; the format's bound is 0.5%).
// Weights are read where they are, [K][N] row-major (ldw apart) or blocked, a 64-column block at a time: a tile
// is ROWS rows of out against the block's 64 columns, each k pair's two weight rows interleaved in registers
// (row-major) or loaded as stored (blocked: the pairs are the layout, kernels.h's kBf16Rows).
// Where a tile's weights come from: rows of a row-major matrix (rows_edge: its last block, columns from ncols on
// not there), interleaved into pairs in registers; or the blocked layout's stored pairs, loaded as they are.
enum class Bf16Src { rows, rows_edge, pairs };

// The four pair registers of 64 columns at weight rows k, k + 1 (row0, row1; row1 null past an odd K's end).
// From rows they come in BDot::pairs' column order, from stored pairs in column order.
template <class D, Bf16Src SRC>
inline void bf16_pair_rows(const uint16_t* row0, const uint16_t* row1, int ncols, typename D::preg* b) {
  if constexpr (SRC == Bf16Src::pairs) {  // row0: the stored row of the pair (an odd K's last one zero-padded)
    for (int j = 0; j < 4; ++j) b[j] = D::load(row0 + 32 * j);
  } else if constexpr (SRC == Bf16Src::rows_edge) {
    D::pairs_partial(row0, row1, ncols, b[0], b[1]);
    D::pairs_partial(row0 + 32, row1 ? row1 + 32 : nullptr, ncols - 32, b[2], b[3]);
  } else {
    D::pairs(row0, row1, b[0], b[1]);
    D::pairs(row0 + 32, row1 ? row1 + 32 : nullptr, b[2], b[3]);
  }
}

// ldb: the distance of weight row k + 1 from row k (stored pairs: BLOCK_COLS, half a stored row).
template <class D, int ROWS, Bf16Src SRC>
inline void bf16_dot_tile(float* out, const uint16_t* a16, int lda, const uint16_t* w, int64_t ldb, int K,
                          const float* bias, int ldo, int n0, int ncols, bool accumulate) {
  static_assert(!D::available || (BLOCK_COLS == 64 && W == 16), "a tile is one 64-column block: four registers of 16 sums");
  R acc[ROWS][4];
  for (int i = 0; i < ROWS; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = Vec::zero();
  typename D::preg b[4];
  const uint16_t* wp = w;
  int k = 0;
#pragma GCC unroll 4
  for (; k + 2 <= K; k += 2, wp += 2 * ldb) {
    bf16_pair_rows<D, SRC>(wp, wp + ldb, ncols, b);
    for (int i = 0; i < ROWS; ++i) {
      const typename D::preg x = D::bcast(a16 + static_cast<int64_t>(i) * lda + k);
      for (int j = 0; j < 4; ++j) acc[i][j] = D::dot(acc[i][j], x, b[j]);
    }
  }
  if (k < K) {  // odd K: the last row against zeros (the activations' pair is padded with a zero too)
    bf16_pair_rows<D, SRC>(wp, nullptr, ncols, b);
    for (int i = 0; i < ROWS; ++i) {
      const typename D::preg x = D::bcast(a16 + static_cast<int64_t>(i) * lda + k);
      for (int j = 0; j < 4; ++j) acc[i][j] = D::dot(acc[i][j], x, b[j]);
    }
  }
  for (int i = 0; i < ROWS; ++i) {
    if constexpr (SRC != Bf16Src::pairs) {
      D::columns(acc[i][0], acc[i][1]);
      D::columns(acc[i][2], acc[i][3]);
    }
    store_sums<4>(out + static_cast<int64_t>(i) * ldo, acc[i], bias, n0, ncols, accumulate);
  }
}

template <class D, int ROWS, Bf16Src SRC>
inline void bf16_dot_rows(int rows, float* out, const uint16_t* a16, int lda, const uint16_t* w, int64_t ldb, int K,
                          const float* bias, int ldo, int n0, int ncols, bool accumulate) {
  int m = 0;
  for (; m + ROWS <= rows; m += ROWS)
    bf16_dot_tile<D, ROWS, SRC>(out + static_cast<int64_t>(m) * ldo, a16 + static_cast<int64_t>(m) * lda, lda, w,
                                ldb, K, bias, ldo, n0, ncols, accumulate);
  if constexpr (ROWS > 1) {
    if (m < rows)
      bf16_dot_rows<D, ROWS - 1, SRC>(rows - m, out + static_cast<int64_t>(m) * ldo,
                                      a16 + static_cast<int64_t>(m) * lda, lda, w, ldb, K, bias, ldo, n0, ncols,
                                      accumulate);
  }
}

// Rows of inp rounded to bf16 into a16 (lda apart, an odd K padded with a zero), rows m0..m1-1.
template <class D>
inline void bf16_round_rows(uint16_t* a16, int lda, const float* inp, int ldi, int K, int m0, int m1) {
  for (int m = m0; m < m1; ++m) {
    D::round_row(a16 + static_cast<int64_t>(m) * lda, inp + static_cast<int64_t>(m) * ldi, K);
    if (K & 1) a16[static_cast<int64_t>(m) * lda + K] = 0;
  }
}

// 6 rows x 64 columns: 24 sums + 4 pair registers + a broadcast within the 32 ZMM registers.
constexpr int BF16_DOT_ROWS = 6;

template <class D>
void bf16_dot_matmul(float* out, const float* inp, const uint16_t* weight, bool blocked, const float* bias, int M,
                     int K, int N, int ldi, int ldo, int ldw, bool accumulate, bool team) {
  const int lda = (K + 1) & ~1;
  // Shared by the team (slot 2, as the int8 activations). A few rows are rounded before the team starts (a
  // barrier would cost a decoding step more than the rounding), many by each thread its share, then a barrier.
  uint16_t* a16 = reinterpret_cast<uint16_t*>(scratch_floats(static_cast<int64_t>(M) * lda / 2, 2));
  const bool round_first = static_cast<int64_t>(M) * K <= 65536;
  if (round_first) bf16_round_rows<D>(a16, lda, inp, ldi, K, 0, M);
  const int nb = (N + BLOCK_COLS - 1) / BLOCK_COLS;
  const bool parallel = team && static_cast<int64_t>(M) * K * N > 32768;
  // Whole blocks per thread, decoding steps with stealing (STEAL_MAX_M).
  StealingRanges ranges(nb, M <= STEAL_MAX_M ? 2 : nb, parallel ? next_team_size() : 1);
  parallel_region_if(parallel, [&](int t, int nt) {
    if (!round_first) {
      bf16_round_rows<D>(a16, lda, inp, ldi, K, static_cast<int>(static_cast<int64_t>(M) * t / nt),
                         static_cast<int>(static_cast<int64_t>(M) * (t + 1) / nt));
      if (nt > 1) {
#pragma omp barrier
      }
    }
    ranges.run(t, nt, [&](int64_t b0, int64_t b1) {
      for (int b = static_cast<int>(b0); b < b1; ++b) {
        const int n0 = b * BLOCK_COLS, ncols = N - n0 < BLOCK_COLS ? N - n0 : BLOCK_COLS;
        if (blocked) {  // stored pairs, the last block zero-padded
          const uint16_t* w = weight + static_cast<int64_t>(b) * kBf16Rows(K) * BLOCK_COLS;
          bf16_dot_rows<D, BF16_DOT_ROWS, Bf16Src::pairs>(M, out, a16, lda, w, BLOCK_COLS, K, bias, ldo, n0, ncols,
                                                          accumulate);
        } else if (ncols == BLOCK_COLS) {
          bf16_dot_rows<D, BF16_DOT_ROWS, Bf16Src::rows>(M, out, a16, lda, weight + n0, ldw, K, bias, ldo, n0, ncols,
                                                         accumulate);
        } else {
          bf16_dot_rows<D, BF16_DOT_ROWS, Bf16Src::rows_edge>(M, out, a16, lda, weight + n0, ldw, K, bias, ldo, n0,
                                                              ncols, accumulate);
        }
      }
    });
  });
}

// bf16 weights on the avx512-amx level: the same rounded activations as bf16_dot_matmul, multiplied by AMX tiles
// (cpu/tiles_amx.h) at every M, decoding included, so that a row's result still does not depend on what it is
// batched with. Each output element is the sum over k chunks of 32 in order from zero, each chunk's 32
// products added by tdpbf16ps (which sums a chunk more exactly than a chain of vdpbf16ps: its bits differ from
// bf16_dot_matmul's, its error against float64 was a quarter of theirs), then + bias, then + out. Each thread
// takes whole 64-column blocks, and 16 rows x 64 columns of sums in four tiles (Tiles::bf16_chunk_rows16). A
// blocked matrix's stored pairs are the weight tiles as they are (16 stored rows of a 32-k chunk, 256 bytes
// apart, columns in order): the tiles load them in place, and only a K that is not a multiple of 32 has its last
// chunk copied out with zeros after it. A row-major matrix is laid out in k pairs in the thread's scratch
// (Tiles::pack_bf16_chunk, in vpunpck's column order). Up to 16 rows, a chunk at a time just before its products
// (decoding: reading the weights overlaps the chunk before); more rows, the whole block once, then blocked for
// the caches (TILE_KB). Partial sums stored and reloaded between chunks are exact: every blocking gives the same
// bits. The activations are zero-padded to a multiple of 16 rows and of 32 k; up to 16 rows, the tiles are
// configured with M rows (a product's time grows with them).
// Loading the stored pairs in place instead of laying out each chunk: gpt2 bf16 decode 99.6 -> 113.5-114.1 tok/s,
// batch-16 935-948 -> 1,012-1,019, pp512 4,659-4,830 -> 4,880-4,949 (Intel Xeon, 2 threads, builds alternating).
// Blocking of the AMX bf16 path for more than 16 rows: chunks of 32 k TILE_KB at a time (a block's 64 columns
// of them are 32 KB, which stay in L1 while every 16 rows of the pass run against them, the partial sums going
// through memory between), in passes of as many rows as TILE_PASS_BYTES of activations (which stay in L2 through
// the pass's chunks). Against 2 x 2 tiles of 32 rows x 32 columns over all of K (each product loading 1 KB of
// tiles from L2), 512-row gpt2 matmuls on an Intel Xeon, 2 threads, builds alternating: 768 x 2304 1,900 ->
// 2,200-2,300 GFLOP/s, 768 x 3072 1,800 -> 2,100, 3072 x 768 even at 1,850 (passes of 512 KB: 1,680; 128 KB:
// 1,700; without passes 1,450 and software prefetch of the next rows slower still); gpt2 bf16 pp512 5,170-5,260
// -> 5,450-5,680 tok/s.
constexpr int TILE_KB = 8;
constexpr int64_t TILE_PASS_BYTES = 256 * 1024;

template <class TL, class D>
void bf16_tile_matmul(float* out, const float* inp, const uint16_t* weight, bool blocked, const float* bias, int M,
                      int K, int N, int ldi, int ldo, int ldw, bool accumulate, bool team) {
  const int K32 = (K + 31) & ~31, chunks = K32 / 32, M16 = (M + 15) & ~15;
  const int full_chunks = kBf16Rows(K) / 32;  // of a blocked matrix's stored pairs
  // Tiles load a blocked matrix in place where it is aligned to cache lines (every block then is): a tile's 64-byte
  // rows would otherwise each span two lines (gpt2 512 x 768 x 2304, 16 bytes off: 1,500 -> 1,300 GFLOP/s).
  const bool in_place = blocked && (reinterpret_cast<uintptr_t>(weight) & 63) == 0;
  const int lda = K32;
  uint16_t* a16 = reinterpret_cast<uint16_t*>(scratch_floats(static_cast<int64_t>(M16) * lda / 2, 2));
  auto round_rows = [&](int m0, int m1) {  // rows from M on are padding: all zeros, as is every row past K
    bf16_round_rows<D>(a16, lda, inp, ldi, K, m0, m1 < M ? m1 : M);
    for (int m = m0; m < m1; ++m) {
      const int from = m < M ? K : 0;
      std::memset(a16 + static_cast<int64_t>(m) * lda + from, 0, (lda - from) * sizeof(uint16_t));
    }
  };
  const bool round_first = static_cast<int64_t>(M) * K <= 65536;
  if (round_first) round_rows(0, M16);
  // Rows m0 .. m0 + rows - 1 of out, the block's columns n0 .. n0 + ncols - 1, from the tiles' sums c [16][64],
  // + bias, + out where accumulating.
  auto store_rows = [&](const float* c, int m0, int rows, int n0, int ncols) {
    for (int i = 0; i < rows; ++i) {
      R acc[4];
      for (int j = 0; j < 4; ++j) acc[j] = Vec::load(c + i * BLOCK_COLS + j * W);
      if (!blocked) {  // packed rows: the weight tiles in vpunpck's column order
        D::columns(acc[0], acc[1]);
        D::columns(acc[2], acc[3]);
      }
      store_sums<4>(out + static_cast<int64_t>(m0 + i) * ldo, acc, bias, n0, ncols, accumulate);
    }
  };
  const int nb = (N + BLOCK_COLS - 1) / BLOCK_COLS;
  const bool parallel = team && static_cast<int64_t>(M) * K * N > 32768;
  // Whole blocks per thread, decoding steps with stealing (STEAL_MAX_M).
  StealingRanges ranges(nb, M <= STEAL_MAX_M ? 2 : nb, parallel ? next_team_size() : 1);
  parallel_region_if(parallel, [&](int t, int nt) {
    if (!round_first) {
      round_rows(static_cast<int>(static_cast<int64_t>(M16) * t / nt),
                 static_cast<int>(static_cast<int64_t>(M16) * (t + 1) / nt));
      if (nt > 1) {
#pragma omp barrier
      }
    }
    // Slot 0 (matmul internals): the laid-out block, a tile of sums (16 x 64 floats), then for more than 16 rows
    // the partial sums between k blocks.
    float* scratch = scratch_floats(static_cast<int64_t>(K32) * BLOCK_COLS / 2 + 16 * 64 + (M16 > 16 ? M16 * 64 : 0), 0);
    uint16_t* wpack = reinterpret_cast<uint16_t*>(scratch);
    float* cbuf = scratch + static_cast<int64_t>(K32) * BLOCK_COLS / 2;
    float* parts = cbuf + 16 * 64;  // [M16][64] partial sums between k blocks
    const int rows_per_pass = std::max(16, static_cast<int>(TILE_PASS_BYTES / (static_cast<int64_t>(lda) * 2)) & ~15);
    TL::configure(M16 == 16 ? M : 16);
    ranges.run(t, nt, [&](int64_t b0, int64_t b1) {
      for (int b = static_cast<int>(b0); b < b1; ++b) {
        const int n0 = b * BLOCK_COLS, ncols = N - n0 < BLOCK_COLS ? N - n0 : BLOCK_COLS;
        const uint16_t* w = blocked ? weight + static_cast<int64_t>(b) * kBf16Rows(K) * BLOCK_COLS : weight + n0;
        // Chunk ch of the block as weight tiles: in place where it may be, else laid out at dst.
        auto weight_tiles = [&](int ch, uint16_t* dst) -> const uint16_t* {
          const uint16_t* stored = w + static_cast<int64_t>(ch) * 32 * BLOCK_COLS;
          if (!blocked) {
            TL::pack_bf16_chunk(dst, w, ldw, ch * 32, K, ncols);
            return dst;
          }
          const int pairs = ch < full_chunks ? 16 : (kBf16Rows(K) - ch * 32) / 2;  // the last chunk may be part of one
          if (pairs == 16 && in_place) return stored;
          std::memcpy(dst, stored, static_cast<size_t>(pairs) * 2 * BLOCK_COLS * sizeof(uint16_t));
          std::memset(dst + pairs * 2 * BLOCK_COLS, 0, static_cast<size_t>(16 - pairs) * 2 * BLOCK_COLS * sizeof(uint16_t));
          return dst;
        };
        if (M16 == 16) {
          // One tile of rows (decoding, batches up to 16), a chunk at a time: reading the weights from memory
          // overlaps the tile products of the chunk before.
          TL::zero_sums();
          for (int ch = 0; ch < chunks; ++ch) {
            if (blocked) prefetch_ahead(w + static_cast<int64_t>(ch) * 32 * BLOCK_COLS, 32 * BLOCK_COLS * 2);
            TL::bf16_chunk_rows16(a16 + ch * 32, lda, weight_tiles(ch, wpack));
          }
          TL::store_rows16(cbuf);
          store_rows(cbuf, 0, M, n0, ncols);
          continue;
        }
        // Every chunk's tiles, one after the other (16 x 128 values each): the stored pairs as they are, or all
        // laid out (where any chunk must be, the whole block goes, so that the chunks stay one after the other).
        const uint16_t* wtiles = w;
        if (!in_place || full_chunks < chunks) {
          for (int ch = 0; ch < chunks; ++ch) {
            uint16_t* dst = wpack + static_cast<int64_t>(ch) * 16 * 128;
            const uint16_t* src = weight_tiles(ch, dst);
            if (src != dst) std::memcpy(dst, src, 16 * 128 * sizeof(uint16_t));  // an in-place chunk beside a tail
          }
          wtiles = wpack;
        }
        // Passes of rows_per_pass rows, each through the chunks TILE_KB at a time, each 16 rows at a time.
        for (int p0 = 0; p0 < M16; p0 += rows_per_pass) {
          const int p1 = M16 - p0 < rows_per_pass ? M16 : p0 + rows_per_pass;
          for (int kb0 = 0; kb0 < chunks; kb0 += TILE_KB) {
            const int kb1 = chunks - kb0 < TILE_KB ? chunks : kb0 + TILE_KB;
            for (int m = p0; m < p1; m += 16) {
              float* part = parts + static_cast<int64_t>(m) * BLOCK_COLS;
              if (kb0 == 0)
                TL::zero_sums();
              else
                TL::load_rows16(part);
              for (int ch = kb0; ch < kb1; ++ch)
                TL::bf16_chunk_rows16(a16 + static_cast<int64_t>(m) * lda + ch * 32, lda,
                                      wtiles + static_cast<int64_t>(ch) * 16 * 128);
              if (kb1 < chunks) {
                TL::store_rows16(part);
              } else {
                TL::store_rows16(cbuf);
                store_rows(cbuf, m, M - m < 16 ? M - m : 16, n0, ncols);
              }
            }
          }
        }
      }
    });
    TL::release();
  });
}

// The LM head over a row-major bf16 table [N, K] (matmul_nt_forward) with bf16 pairs: each element a dot
// product along k in lanes of 16 pairs, reduced in a fixed order, from activations rounded as above.
template <class D>
void bf16_dot_nt(float* out, const float* inp, const uint16_t* weight, int M, int K, int N, int ldo) {
  const int lda = (K + 1) & ~1;
  uint16_t* a16 = reinterpret_cast<uint16_t*>(scratch_floats(static_cast<int64_t>(M) * lda / 2, 2));
  bf16_round_rows<D>(a16, lda, inp, K, K, 0, M);
  constexpr int NR = 4;
  parallel_for_if(static_cast<int64_t>(M) * K * N > 32768, (N + NR - 1) / NR, [&](int64_t blk) {
    const int n0 = static_cast<int>(blk) * NR, nrows = N - n0 < NR ? N - n0 : NR;
    for (int m = 0; m < M; ++m) {
      const uint16_t* a = a16 + static_cast<int64_t>(m) * lda;
      R acc[NR];
      for (int j = 0; j < NR; ++j) acc[j] = Vec::zero();
      for (int k = 0; k < K; k += 32) {
        const int rem = K - k;
        const typename D::preg x = rem >= 32 ? D::load(a + k) : D::load_partial(a + k, rem);
        for (int j = 0; j < nrows; ++j) {
          const uint16_t* w = weight + static_cast<int64_t>(n0 + j) * K + k;
          acc[j] = D::dot(acc[j], x, rem >= 32 ? D::load(w) : D::load_partial(w, rem));
        }
      }
      for (int j = 0; j < nrows; ++j) out[static_cast<int64_t>(m) * ldo + n0 + j] = Vec::reduce_add(acc[j]);
    }
  });
}

// team: false when called by one thread of a team already at work (attention's units, each on its own thread):
// the product then runs on the calling thread alone, without entering the OpenMP runtime. A nested region
// would run on one thread anyway, and libgomp's start and end of it cost more than a 64 x 64 x 64 product
// (a 512-token prompt makes about 10,000 of them).
template <class WR>
void matmul_impl(float* out, const float* inp, const typename WR::T* weight, bool blocked, const float* bias,
                 int M, int K, int N, int ldi, int ldo, int ldw, bool accumulate, bool team = true) {
  if constexpr (std::is_same_v<WR, BF16W> && Tiles::available)
    return bf16_tile_matmul<Tiles, BDot>(out, inp, weight, blocked, bias, M, K, N, ldi, ldo, ldw, accumulate, team);
  else if constexpr (std::is_same_v<WR, BF16W> && BDot::available)
    return bf16_dot_matmul<BDot>(out, inp, weight, blocked, bias, M, K, N, ldi, ldo, ldw, accumulate, team);
  constexpr int NB = NV * W;
  const int nblocks = (N + NB - 1) / NB;
  // The blocked layout is read in place by the direct path (see blocked_direct); row-major weights are packed.
  if (M >= PACK_MIN_M && !blocked) {
    parallel_region_if(team, [&](int t, int nt) {
      const int b0 = static_cast<int>(static_cast<int64_t>(nblocks) * t / nt);
      const int b1 = static_cast<int>(static_cast<int64_t>(nblocks) * (t + 1) / nt);
      if (M <= WIDE_PACK_MAX_M) {
        if (b1 > b0)
          packed_wide<WR>(out, inp, weight, bias, M, K, N, ldi, ldo, ldw, b0, b1, accumulate);
      } else if (nblocks >= 2 * nt) {
        if (b1 > b0)
          packed_blocks<WR>(out, inp, weight, bias, M, K, N, ldi, ldo, ldw, b0, b1, accumulate);
      } else {
        // Too few column blocks to keep every thread busy (many threads, narrow matrix): split the rows as
        // well, into groups of whole MR tiles. A row's arithmetic does not depend on its group.
        const int mgroups = (2 * nt + nblocks - 1) / nblocks;
        const int tiles = (M + MR - 1) / MR;
        const int tasks = nblocks * mgroups;
        for (int task = t; task < tasks; task += nt) {
          const int b = task % nblocks, g = task / nblocks;
          const int m0 = static_cast<int>(static_cast<int64_t>(tiles) * g / mgroups) * MR;
          const int m1 = (M < static_cast<int>(static_cast<int64_t>(tiles) * (g + 1) / mgroups) * MR ? M : static_cast<int>(static_cast<int64_t>(tiles) * (g + 1) / mgroups) * MR);
          if (m1 > m0)
            packed_blocks<WR>(out + static_cast<int64_t>(m0) * ldo, inp + static_cast<int64_t>(m0) * ldi, weight,
                              bias, m1 - m0, K, N, ldi, ldo, ldw, b, b + 1, accumulate);
        }
      }
    });
    return;
  }
  const bool parallel = team && static_cast<int64_t>(M) * K * N > 32768;
  if (blocked) {  // threads split the column blocks, decoding steps with stealing (see STEAL_MAX_M)
    const int nb = (N + BLOCK_COLS - 1) / BLOCK_COLS;
    StealingRanges ranges(nb, M <= STEAL_MAX_M ? 2 : nb);
    parallel_region_if(parallel, [&](int t, int nt) {
      ranges.run(t, nt, [&](int64_t b0, int64_t b1) {
        blocked_direct<BlockedW<WR>>(out, inp, weight, bias, M, K, N, ldi, ldo, static_cast<int>(b0),
                                     static_cast<int>(b1), accumulate);
      });
    });
    return;
  }
  // Few rows: threads split the columns into contiguous ranges of whole cache lines.
  parallel_region_if(parallel, [&](int t, int nt) {
    const int lines = (N + 15) / 16;
    const int c0 = static_cast<int>(static_cast<int64_t>(lines) * t / nt) * 16;
    const int c1 = t + 1 == nt ? N : static_cast<int>(static_cast<int64_t>(lines) * (t + 1) / nt) * 16;
    if (c1 > c0)
      streaming_columns<WR>(out, inp, weight, bias, M, K, ldi, ldo, ldw, c0, c1, accumulate,
                        scratch_floats(static_cast<int64_t>(M) * (c1 - c0), 0));
  });
}

}  // namespace matmul_detail

void q8_matmul_forward(float* out, const float* inp, WeightView w, const float* bias, int M, int K, int N, int ldi,
                       int ldo, bool accumulate);  // qmatmul.inl

void matmul_forward(float* out, const float* inp, WeightView w, const float* bias, int M, int K, int N, int ldi,
                    int ldo, int ldw, bool accumulate) {
  using namespace matmul_detail;
  switch (w.dtype) {
    case DType::f32:
      return matmul_impl<F32W>(out, inp, static_cast<const float*>(w.data), w.blocked, bias, M, K, N, ldi, ldo, ldw, accumulate);
    case DType::f16:
      return matmul_impl<F16W>(out, inp, static_cast<const uint16_t*>(w.data), w.blocked, bias, M, K, N, ldi, ldo, ldw, accumulate);
    case DType::bf16:
      return matmul_impl<BF16W>(out, inp, static_cast<const uint16_t*>(w.data), w.blocked, bias, M, K, N, ldi, ldo, ldw, accumulate);
    case DType::q8:
    case DType::q4:
    case DType::q6:
      return q8_matmul_forward(out, inp, w, bias, M, K, N, ldi, ldo, accumulate);
  }
}

namespace matmul_detail {

template <class WR, int MR2, int NR>
inline void nt_tile(float* out, const float* inp, const typename WR::T* weight, int K, int ldo, int n0) {
  R acc[MR2][NR];
  for (int i = 0; i < MR2; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = Vec::zero();
  int k = 0;
  for (; k + W <= K; k += W) {
    R b[NR];
    for (int j = 0; j < NR; ++j) b[j] = WR::load(weight + static_cast<int64_t>(n0 + j) * K + k);
    for (int i = 0; i < MR2; ++i) {
      R a = Vec::load(inp + static_cast<int64_t>(i) * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = Vec::fma(a, b[j], acc[i][j]);
    }
  }
  if (k < K) {
    const int rem = K - k;
    R b[NR];
    for (int j = 0; j < NR; ++j) b[j] = WR::load_partial(weight + static_cast<int64_t>(n0 + j) * K + k, rem);
    for (int i = 0; i < MR2; ++i) {
      R a = Vec::load_partial(inp + static_cast<int64_t>(i) * K + k, rem);
      for (int j = 0; j < NR; ++j) acc[i][j] = Vec::fma(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR2; ++i)
    for (int j = 0; j < NR; ++j) {
      out[static_cast<int64_t>(i) * ldo + n0 + j] = Vec::reduce_add(acc[i][j]);
    }
}

constexpr int NT_MR = W == 16 ? 4 : 2;
constexpr int NT_NR = 4;

template <class WR, int mr>
inline void nt_rows(float* out, const float* inp, const typename WR::T* weight, int K, int ldo,
                    int n0, int nrows) {
  if (nrows == NT_NR) {
    nt_tile<WR, mr, NT_NR>(out, inp, weight, K, ldo, n0);
  } else {
    for (int j = 0; j < nrows; ++j) nt_tile<WR, mr, 1>(out, inp, weight, K, ldo, n0 + j);
  }
}

template <class WR>
void matmul_nt_impl(float* out, const float* inp, const typename WR::T* weight, int M, int K, int N,
                    int ldo) {
  if constexpr (std::is_same_v<WR, BF16W> && BDot::available)
    return bf16_dot_nt<BDot>(out, inp, weight, M, K, N, ldo);
  const int nblocks = (N + NT_NR - 1) / NT_NR;
  parallel_for_if(static_cast<int64_t>(M) * K * N > 32768, nblocks, [&](int64_t b) {
    const int n0 = static_cast<int>(b) * NT_NR, nrows = (N - n0 < NT_NR ? N - n0 : NT_NR);
    int m = 0;
    for (; m + NT_MR <= M; m += NT_MR)
      nt_rows<WR, NT_MR>(out + static_cast<int64_t>(m) * ldo, inp + static_cast<int64_t>(m) * K, weight, K, ldo,
                         n0, nrows);
    for (; m < M; ++m)
      nt_rows<WR, 1>(out + static_cast<int64_t>(m) * ldo, inp + static_cast<int64_t>(m) * K, weight, K, ldo, n0,
                     nrows);
  });
}

}  // namespace matmul_detail

void matmul_nt_forward(float* out, const float* inp, WeightView w, int M, int K, int N, int ldo) {
  using namespace matmul_detail;
  switch (w.dtype) {
    case DType::f32: return matmul_nt_impl<F32W>(out, inp, static_cast<const float*>(w.data), M, K, N, ldo);
    case DType::f16: return matmul_nt_impl<F16W>(out, inp, static_cast<const uint16_t*>(w.data), M, K, N, ldo);
    case DType::bf16: return matmul_nt_impl<BF16W>(out, inp, static_cast<const uint16_t*>(w.data), M, K, N, ldo);
    case DType::q8:
    case DType::q4:
    case DType::q6: break;  // stored transposed, [n_embd, vocab]: the model calls matmul_forward
  }
}
