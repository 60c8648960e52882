// The avx512-vnni kernel set: the avx512 sources built with AVX512-VNNI, so that int8 dot products are vpdpbusd.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "kernels/kernels.h"

#define GPTCPP_ISA_NS avx512_vnni
#define GPTCPP_ISA_LEVEL Isa::avx512_vnni
#define GPTCPP_KERNEL_TABLE avx512_vnni_kernels
#include "cpu/vec_avx512.h"
#include "cpu/vec_math.h"
#include "kernels/kernel_set.inc"
