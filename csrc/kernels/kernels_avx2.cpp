// The avx2 kernel set (AVX2 + FMA + F16C); int8 dot products through vpmaddubsw.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "kernels/kernels.h"

#define GPTCPP_ISA_NS avx2
#define GPTCPP_ISA_LEVEL Isa::avx2
#define GPTCPP_KERNEL_TABLE avx2_kernels
#include "cpu/vec_avx2.h"
#include "cpu/vec_math.h"
#include "kernels/kernel_set.inc"
