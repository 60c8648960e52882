// The avx512-bf16 kernel set: the avx512-vnni sources built with AVX512-BF16 as well, so that bf16 weights are
// multiplied by vdpbf16ps (matmul.inl, bf16_dot_matmul).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "kernels/kernels.h"

#define GPTCPP_ISA_NS avx512_bf16
#define GPTCPP_ISA_LEVEL Isa::avx512_bf16
#define GPTCPP_KERNEL_TABLE avx512_bf16_kernels
#include "cpu/vec_avx512.h"
#include "cpu/vec_math.h"
#include "kernels/kernel_set.inc"
