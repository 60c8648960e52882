// The avx512-amx kernel set: the avx512-bf16 sources built with AMX as well, so that bf16 weights are multiplied
// by tiles (cpu/tiles_amx.h; matmul.inl, bf16_tile_matmul).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "kernels/kernels.h"

#define GPTCPP_ISA_NS avx512_amx
#define GPTCPP_ISA_LEVEL Isa::avx512_amx
#define GPTCPP_KERNEL_TABLE avx512_amx_kernels
#include "cpu/vec_avx512.h"
#include "cpu/vec_math.h"
#include "kernels/kernel_set.inc"
