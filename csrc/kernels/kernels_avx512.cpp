// The avx512 kernel set (F + BW + VL + DQ); int8 dot products through vpmaddubsw.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "kernels/kernels.h"

#define GPTCPP_ISA_NS avx512
#define GPTCPP_ISA_LEVEL Isa::avx512
#define GPTCPP_KERNEL_TABLE avx512_kernels
#include "cpu/vec_avx512.h"
#include "cpu/vec_math.h"
#include "kernels/kernel_set.inc"
