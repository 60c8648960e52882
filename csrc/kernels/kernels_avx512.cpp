// The avx512 kernel set: the ISA-neutral kernel sources compiled against vec_avx512.h.
// Only the kernel sources are included inside the namespace; standard headers come first, outside it.
#include <cmath>
#include <cstdint>
#include <immintrin.h>

#include "kernels/kernels.h"

#define GPTCPP_ISA_NS avx512
#include "cpu/vec_avx512.h"
#include "cpu/vec_math.h"

namespace gptcpp {
namespace avx512 {

#include "kernels/matmul.inl"
#include "kernels/norms.inl"
#include "kernels/attention.inl"
#include "kernels/sampling.inl"
#include "kernels/probe.inl"

}  // namespace avx512

extern const KernelTable avx512_kernels;
const KernelTable avx512_kernels = {Isa::avx512,          avx512::matmul_forward,    avx512::matmul_nt_forward,
                                    avx512::layernorm_forward, avx512::activation_forward, avx512::attention_forward,
                                    avx512::logsumexp,         avx512::read_sum};

}  // namespace gptcpp
