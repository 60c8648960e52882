// The one dispatch point: maps the selected instruction-set level to its kernel table.
#include <cstdlib>
#include <new>
#include <stdexcept>

#include "kernels/kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gptcpp {

extern const KernelTable generic_kernels;
#if defined(__x86_64__) || defined(_M_X64)
extern const KernelTable avx2_kernels;
extern const KernelTable avx2_vnni_kernels;
extern const KernelTable avx512_kernels;
extern const KernelTable avx512_vnni_kernels;
extern const KernelTable avx512_bf16_kernels;
extern const KernelTable avx512_amx_kernels;
#endif

const KernelTable& kernels_for(Isa isa) {
  switch (isa) {
    case Isa::generic: return generic_kernels;
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::avx2: return avx2_kernels;
    case Isa::avx2_vnni: return avx2_vnni_kernels;
    case Isa::avx512: return avx512_kernels;
    case Isa::avx512_vnni: return avx512_vnni_kernels;
    case Isa::avx512_bf16: return avx512_bf16_kernels;
    case Isa::avx512_amx: return avx512_amx_kernels;
#endif
    default: break;
  }
  throw std::runtime_error(std::string("no kernels were built for ") + isa_name(isa));
}

const KernelTable& kernels() { return kernels_for(selected_isa()); }

#ifdef _OPENMP
int thread_count() { return omp_get_num_threads(); }
int thread_index() { return omp_get_thread_num(); }
int next_team_size() { return omp_in_parallel() ? 1 : omp_get_max_threads(); }
#else
int thread_count() { return 1; }
int thread_index() { return 0; }
int next_team_size() { return 1; }
#endif

float* scratch_floats(int64_t n, int slot) {
  struct Buffer {
    float* data = nullptr;
    int64_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer bufs[3];
  Buffer& buf = bufs[slot];
  if (buf.size < n) {
    std::free(buf.data);
    buf.data = static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64));
    if (!buf.data) throw std::bad_alloc();
    buf.size = n;
  }
  return buf.data;
}

}  // namespace gptcpp
