// The generic kernel set: the ISA-neutral kernel sources compiled against vec_generic.h.
// Only the kernel sources are included inside the namespace; standard headers come first, outside it.
#include <cmath>
#include <cstdint>


#include "kernels/kernels.h"

#define GPTCPP_ISA_NS generic
#include "cpu/vec_generic.h"
#include "cpu/vec_math.h"

namespace gptcpp {
namespace generic {

#include "kernels/matmul.inl"
#include "kernels/norms.inl"
#include "kernels/attention.inl"
#include "kernels/sampling.inl"
#include "kernels/probe.inl"

}  // namespace generic

extern const KernelTable generic_kernels;
const KernelTable generic_kernels = {Isa::generic,          generic::matmul_forward,    generic::matmul_nt_forward,
                                    generic::layernorm_forward, generic::activation_forward, generic::attention_forward,
                                    generic::logsumexp,         generic::read_sum};

}  // namespace gptcpp
