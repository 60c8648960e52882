// Matrix multiplication, written once against `Vec` (included by each kernels_<isa>.cpp).
//
// matmul_forward: out[M,N] (+)= inp[M,K] @ weight[K,N] + bias. The register tile is MR rows x NV vectors
// of columns: for each k, NV vectors of weight row k are loaded once and multiplied by MR broadcast inputs.
// Every output element is one fused multiply-add chain over k = 0..K-1 from zero, then + bias, then + out;
// the same chain whatever MR the row lands in and however columns are split between threads, so a row's
// result is bit-identical alone or in a batch. Threads take disjoint column blocks.
//
// matmul_nt_forward: out[M,N] = inp[M,K] @ weight[N,K]^T, each element a vector dot product along k
// reduced in a fixed order; used for the LM head, whose weight is the token embedding table [vocab, n_embd].

namespace matmul_detail {

using R = Vec::reg;
constexpr int W = Vec::width;

template <int MR, int NV>
inline void tile(float* out, const float* inp, const float* weight, const float* bias, int K, int N, int ldi,
                 int ldo, int n0, int ncols, bool accumulate) {
  R acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = Vec::zero();
  const bool full = ncols == NV * W;
  const float* wp = weight + n0;
  for (int k = 0; k < K; ++k, wp += N) {
    R b[NV];
    if (full) {
      for (int j = 0; j < NV; ++j) b[j] = Vec::load(wp + j * W);
    } else {
      for (int j = 0; j < NV; ++j) {
        int rem = ncols - j * W;
        b[j] = rem >= W ? Vec::load(wp + j * W) : (rem > 0 ? Vec::load_partial(wp + j * W, rem) : Vec::zero());
      }
    }
    for (int i = 0; i < MR; ++i) {
      R a = Vec::set1(inp[static_cast<int64_t>(i) * ldi + k]);
      for (int j = 0; j < NV; ++j) acc[i][j] = Vec::fma(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* o = out + static_cast<int64_t>(i) * ldo + n0;
    for (int j = 0; j < NV; ++j) {
      int rem = ncols - j * W;
      if (rem <= 0) break;
      R r = acc[i][j];
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

// Register budget: MR*NV accumulators + NV weight vectors + 1 broadcast must fit the register file
// (16 YMM for AVX2, 32 ZMM for AVX-512).
constexpr int NV = W == 16 ? 4 : 2;
constexpr int MR = W == 16 ? 6 : 6;

template <int mr>
inline void tile_rows(float* out, const float* inp, const float* weight, const float* bias, int K, int N, int ldi,
                      int ldo, int n0, int ncols, bool accumulate) {
  tile<mr, NV>(out, inp, weight, bias, K, N, ldi, ldo, n0, ncols, accumulate);
}

inline void column_block(float* out, const float* inp, const float* weight, const float* bias, int M, int K, int N,
                         int ldi, int ldo, int n0, int ncols, bool accumulate) {
  int m = 0;
  for (; m + MR <= M; m += MR)
    tile_rows<MR>(out + static_cast<int64_t>(m) * ldo, inp + static_cast<int64_t>(m) * ldi, weight, bias, K, N, ldi,
                  ldo, n0, ncols, accumulate);
  float* o = out + static_cast<int64_t>(m) * ldo;
  const float* a = inp + static_cast<int64_t>(m) * ldi;
  switch (M - m) {
    case 0: break;
    case 1: tile_rows<1>(o, a, weight, bias, K, N, ldi, ldo, n0, ncols, accumulate); break;
    case 2: tile_rows<2>(o, a, weight, bias, K, N, ldi, ldo, n0, ncols, accumulate); break;
    case 3: tile_rows<3>(o, a, weight, bias, K, N, ldi, ldo, n0, ncols, accumulate); break;
    case 4: tile_rows<4>(o, a, weight, bias, K, N, ldi, ldo, n0, ncols, accumulate); break;
    default: tile_rows<5>(o, a, weight, bias, K, N, ldi, ldo, n0, ncols, accumulate); break;
  }
}

}  // namespace matmul_detail

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int M, int K, int N,
                    int ldi, int ldo, bool accumulate) {
  using namespace matmul_detail;
  constexpr int NB = NV * W;
  const int nblocks = (N + NB - 1) / NB;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * K * N > 32768)
  for (int b = 0; b < nblocks; ++b) {
    const int n0 = b * NB;
    column_block(out, inp, weight, bias, M, K, N, ldi, ldo, n0, (N - n0 < NB ? N - n0 : NB), accumulate);
  }
}

namespace matmul_detail {

template <int MR2, int NR>
inline void nt_tile(float* out, const float* inp, const float* weight, int K, int ldo, int n0) {
  R acc[MR2][NR];
  for (int i = 0; i < MR2; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = Vec::zero();
  int k = 0;
  for (; k + W <= K; k += W) {
    R b[NR];
    for (int j = 0; j < NR; ++j) b[j] = Vec::load(weight + static_cast<int64_t>(n0 + j) * K + k);
    for (int i = 0; i < MR2; ++i) {
      R a = Vec::load(inp + static_cast<int64_t>(i) * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = Vec::fma(a, b[j], acc[i][j]);
    }
  }
  if (k < K) {
    const int rem = K - k;
    R b[NR];
    for (int j = 0; j < NR; ++j) b[j] = Vec::load_partial(weight + static_cast<int64_t>(n0 + j) * K + k, rem);
    for (int i = 0; i < MR2; ++i) {
      R a = Vec::load_partial(inp + static_cast<int64_t>(i) * K + k, rem);
      for (int j = 0; j < NR; ++j) acc[i][j] = Vec::fma(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR2; ++i)
    for (int j = 0; j < NR; ++j) out[static_cast<int64_t>(i) * ldo + n0 + j] = Vec::reduce_add(acc[i][j]);
}

constexpr int NT_MR = W == 16 ? 4 : 2;
constexpr int NT_NR = 4;

template <int mr>
inline void nt_rows(float* out, const float* inp, const float* weight, int K, int N, int ldo, int n0, int nrows) {
  if (nrows == NT_NR) {
    nt_tile<mr, NT_NR>(out, inp, weight, K, ldo, n0);
  } else {
    for (int j = 0; j < nrows; ++j) nt_tile<mr, 1>(out, inp, weight, K, ldo, n0 + j);
  }
}

}  // namespace matmul_detail

void matmul_nt_forward(float* out, const float* inp, const float* weight, int M, int K, int N, int ldo) {
  using namespace matmul_detail;
  const int nblocks = (N + NT_NR - 1) / NT_NR;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * K * N > 32768)
  for (int b = 0; b < nblocks; ++b) {
    const int n0 = b * NT_NR, nrows = (N - n0 < NT_NR ? N - n0 : NT_NR);
    int m = 0;
    for (; m + NT_MR <= M; m += NT_MR)
      nt_rows<NT_MR>(out + static_cast<int64_t>(m) * ldo, inp + static_cast<int64_t>(m) * K, weight, K, N, ldo, n0,
                     nrows);
    for (; m < M; ++m)
      nt_rows<1>(out + static_cast<int64_t>(m) * ldo, inp + static_cast<int64_t>(m) * K, weight, K, N, ldo, n0, nrows);
  }
}
