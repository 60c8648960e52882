// Memory read probe, written once against `Vec`: sums n floats with eight independent accumulators so that
// loads, not the add latency, set the pace. The benchmark runs it on every thread over a buffer much larger
// than the last-level cache to measure the machine's read bandwidth, the limit of batch-1 decoding.

float read_sum(const float* x, int64_t n) {
  constexpr int W = Vec::width;
  Vec::reg a0 = Vec::zero(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  int64_t i = 0;
  for (; i + 8 * W <= n; i += 8 * W) {
    a0 = Vec::add(a0, Vec::load(x + i));
    a1 = Vec::add(a1, Vec::load(x + i + W));
    a2 = Vec::add(a2, Vec::load(x + i + 2 * W));
    a3 = Vec::add(a3, Vec::load(x + i + 3 * W));
    a4 = Vec::add(a4, Vec::load(x + i + 4 * W));
    a5 = Vec::add(a5, Vec::load(x + i + 5 * W));
    a6 = Vec::add(a6, Vec::load(x + i + 6 * W));
    a7 = Vec::add(a7, Vec::load(x + i + 7 * W));
  }
  float total = Vec::reduce_add(Vec::add(Vec::add(Vec::add(a0, a1), Vec::add(a2, a3)),
                                         Vec::add(Vec::add(a4, a5), Vec::add(a6, a7))));
  for (; i < n; ++i) total += x[i];
  return total;
}
