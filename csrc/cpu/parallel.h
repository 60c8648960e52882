#pragma once
// Parallel loops and regions that stay out of the OpenMP runtime when they are to run on one thread. libgomp
// ends every region, a one-thread one (an `if` clause that is false) included, at a barrier whose last thread
// makes a futex system call, about 0.25 us here; a 12-layer decoding step had about 150 such regions when its
// matrices are too small to split (layer norms, GELU, KV cache writes, small matmuls). A body may be called
// from inside another region (attention's products run inside the attention's team), so it is told its
// thread index and team size instead of asking the runtime, which would answer for the enclosing team.
#include <cstdint>

namespace gptcpp {

// body(i) for i in [0, n), split statically over the team when `parallel`.
template <class F>
inline void parallel_for_if(bool parallel, int64_t n, F&& body) {
  if (!parallel) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) body(i);
}

int thread_count();
int thread_index();

// body(t, nt) once per thread t of a team of nt when `parallel`, else body(0, 1) in the calling thread (a
// body that synchronises its team does so only when nt > 1).
template <class F>
inline void parallel_region_if(bool parallel, F&& body) {
  if (!parallel) {
    body(0, 1);
    return;
  }
#pragma omp parallel
  body(thread_index(), thread_count());
}

}  // namespace gptcpp
