// The one dispatch point: maps the selected instruction-set level to its kernel table.
#include <cstdlib>
#include <new>
#include <stdexcept>

#include "cpu/parallel.h"
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
#ifndef GPTCPP_NO_AMX
extern const KernelTable avx512_amx_kernels;
#endif
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
#ifndef GPTCPP_NO_AMX
    case Isa::avx512_amx: return avx512_amx_kernels;
#endif
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

StealingRanges::StealingRanges(int64_t n, int64_t chunk, int team)
    : n_(n), chunk_(chunk < 1 ? 1 : chunk), team_(team) {
  if (team_ > kMaxTeam || n >= (int64_t{1} << 32)) team_ = 0;
  for (int t = 0; t < team_; ++t) slot(t).store(pack(n * t / team_, n * (t + 1) / team_), std::memory_order_relaxed);
}

bool StealingRanges::claim(int t, int nt, int64_t& begin, int64_t& end) {
  for (;;) {
    uint64_t v = slot(t).load(std::memory_order_relaxed);
    while (front(v) < back(v)) {  // our own range, from the front
      const int64_t e = front(v) + chunk_ < back(v) ? front(v) + chunk_ : back(v);
      if (slot(t).compare_exchange_weak(v, pack(e, back(v)), std::memory_order_relaxed)) {
        begin = front(v);
        end = e;
        return true;
      }
    }
    bool stole = false;
    for (int i = 1; i < nt && !stole; ++i) {  // the back half of the next range with units left
      std::atomic<uint64_t>& other = slot((t + i) % nt);
      uint64_t o = other.load(std::memory_order_relaxed);
      while (front(o) < back(o)) {
        const int64_t mid = back(o) - (back(o) - front(o) + 1) / 2;
        if (other.compare_exchange_weak(o, pack(front(o), mid), std::memory_order_relaxed)) {
          // Ours is empty, and a thief leaves an empty range alone: nobody else writes it meanwhile.
          slot(t).store(pack(mid, back(o)), std::memory_order_relaxed);
          stole = true;
          break;
        }
      }
    }
    if (!stole) return false;
  }
}

}  // namespace gptcpp
