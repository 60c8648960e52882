// The avx2-vnni kernel set: the avx2 sources built with AVX-VNNI, so that int8 dot products are vpdpbusd.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "kernels/kernels.h"

#define GPTCPP_ISA_NS avx2_vnni
#define GPTCPP_ISA_LEVEL Isa::avx2_vnni
#define GPTCPP_KERNEL_TABLE avx2_vnni_kernels
#include "cpu/vec_avx2.h"
#include "cpu/vec_math.h"
#include "kernels/kernel_set.inc"
