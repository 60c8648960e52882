// The generic kernel set: portable loops for any CPU (built with -ffp-contract=off: its fma is a*b+c rounded twice).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/kernels.h"

#define GPTCPP_ISA_NS generic
#define GPTCPP_ISA_LEVEL Isa::generic
#define GPTCPP_KERNEL_TABLE generic_kernels
#include "cpu/vec_generic.h"
#include "cpu/vec_math.h"
#include "kernels/kernel_set.inc"
