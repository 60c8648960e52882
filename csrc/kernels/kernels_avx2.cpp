// The avx2 kernel set: the ISA-neutral kernel sources compiled against vec_avx2.h.
// Only the kernel sources are included inside the namespace; standard headers come first, outside it.
#include <cmath>
#include <cstdint>
#include <immintrin.h>

#include "kernels/kernels.h"

#define GPTCPP_ISA_NS avx2
#include "cpu/vec_avx2.h"
#include "cpu/vec_math.h"

namespace gptcpp {
namespace avx2 {

#include "kernels/matmul.inl"
#include "kernels/norms.inl"
#include "kernels/attention.inl"
#include "kernels/sampling.inl"
#include "kernels/probe.inl"

}  // namespace avx2

extern const KernelTable avx2_kernels;
const KernelTable avx2_kernels = {Isa::avx2,          avx2::matmul_forward,    avx2::matmul_nt_forward,
                                    avx2::layernorm_forward, avx2::activation_forward, avx2::attention_forward,
                                    avx2::logsumexp,         avx2::read_sum};

}  // namespace gptcpp
