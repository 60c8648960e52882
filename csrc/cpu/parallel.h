#pragma once
// Parallel loops and regions that stay out of the OpenMP runtime when they are to run on one thread. libgomp
// ends every region, a one-thread one (an `if` clause that is false) included, at a barrier whose last thread
// makes a futex system call, about 0.25 us here; a 12-layer decoding step had about 150 such regions when its
// matrices are too small to split (layer norms, GELU, KV cache writes, small matmuls). A body may be called
// from inside another region (attention's products run inside the attention's team), so it is told its
// thread index and team size instead of asking the runtime, which would answer for the enclosing team.
#include <atomic>
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
int next_team_size();

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

// Units [0, n) shared by the `team` threads of the region about to start: one contiguous range per thread,
// which the thread works through from the front `chunk` units at a time; a thread whose range has run out takes
// the back half of what is left of another's (whose front goes on as before) and carries on with that. Each
// thread still streams long runs of memory, and a slower core's work moves to the faster one. On the shared
// hosts measured here one core of two was often 10-15% slower than the other for the length of a process:
// where the work is arithmetic, as in a batch of decoding steps, the faster thread otherwise waited for the
// slower at every matrix (numbers where it is used). A region whose team is not that size splits statically.
class StealingRanges {
 public:
  static constexpr int kMaxTeam = 64;
  // (The constructor and claim() are defined in portable code, kernels/dispatch.cpp: compiled inline into a
  // kernel file, a copy with that file's instructions could be the one the linker keeps for every caller.)
  StealingRanges(int64_t n, int64_t chunk, int team = next_team_size());
  // body(begin, end) for each range of units thread t of the team of nt takes on.
  template <class F>
  void run(int t, int nt, F&& body) {
    if (nt != team_) {
      const int64_t b = n_ * t / nt, e = n_ * (t + 1) / nt;
      if (e > b) body(b, e);
      return;
    }
    for (int64_t b, e; claim(t, nt, b, e);) body(b, e);
  }

 private:
  bool claim(int t, int nt, int64_t& begin, int64_t& end);
  static uint64_t pack(int64_t f, int64_t b) { return static_cast<uint64_t>(f) | static_cast<uint64_t>(b) << 32; }
  static int64_t front(uint64_t v) { return static_cast<int64_t>(v & 0xffffffffu); }
  static int64_t back(uint64_t v) { return static_cast<int64_t>(v >> 32); }
  std::atomic<uint64_t>& slot(int t) { return ranges_[t].v; }

  struct alignas(64) Slot {  // a cache line each: its owner writes it at every claim
    std::atomic<uint64_t> v;
  };
  Slot ranges_[kMaxTeam];
  int64_t n_, chunk_;
  int team_;
};

}  // namespace gptcpp
