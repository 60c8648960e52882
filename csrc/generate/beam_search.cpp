// Beam search following transformers' vectorised implementation step for step (GenerationMixin._beam_search):
// scores are log_softmax then the logits processors, 2*num_beams (or (1 + n_eos)*num_beams) candidates are
// kept per step, candidates that end (EOS or max length) enter the finished set only when they rank among
// the first num_beams, and the same -1e9 masking in float32 decides ties the same way.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

#include "generate/decoder.h"

namespace gptcpp {

namespace {

// Indices of the k largest values, best first (ties: lower index first).
std::vector<int64_t> top_k_indices(const std::vector<float>& v, int k) {
  std::vector<int64_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0);
  k = std::min<int>(k, static_cast<int>(v.size()));
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  idx.resize(k);
  return idx;
}

}  // namespace

std::vector<BeamHypothesis> beam_search(const GPT2Model& model, const std::vector<int32_t>& prompt,
                                        const SamplingOptions& options, int num_beams, int max_new_tokens,
                                        float length_penalty, EarlyStopping early_stopping, int num_return) {
  const GPT2Config& c = model.config();
  const int V = c.vocab_size;
  if (num_beams < 1) throw std::invalid_argument("num_beams must be at least 1");
  if (num_return < 1 || num_return > num_beams)
    throw std::invalid_argument("num_return_sequences must be between 1 and num_beams");
  if (prompt.empty()) throw std::invalid_argument("empty prompt");
  for (int32_t t : prompt)
    if (t < 0 || t >= V) throw std::invalid_argument("token id " + std::to_string(t) + " is outside the vocabulary");
  const int P = static_cast<int>(prompt.size());
  if (P > c.n_positions) throw std::length_error("prompt exceeds n_positions");
  const int max_length = std::min(P + max_new_tokens, c.n_positions);
  const int n_eos = static_cast<int>(options.eos_token_ids.size());
  const int keep = std::max(2, 1 + n_eos) * num_beams;

  struct Beam {
    std::vector<int32_t> tokens;
    float score;
    bool finished;
  };
  std::vector<Beam> running(num_beams, Beam{prompt, -1.0e9f, false});
  running[0].score = 0.0f;
  std::vector<Beam> done(num_beams, Beam{prompt, -1.0e9f, false});
  bool heuristic_unsatisfied = true;

  const int capacity = std::max(P, std::min(max_length - 1, c.n_positions));
  std::vector<std::unique_ptr<KVCache>> caches, spare;
  for (int b = 0; b < num_beams; ++b) {
    caches.push_back(std::make_unique<KVCache>(c, capacity));
    spare.push_back(std::make_unique<KVCache>(c, capacity));
  }
  std::vector<float> logits(static_cast<size_t>(num_beams) * V);
  // Prefill once; every beam starts from the same prompt cache.
  {
    std::vector<ForwardItem> items{{caches[0].get(), prompt.data(), P, 1}};
    model.forward(items, logits.data());
    for (int b = 1; b < num_beams; ++b) {
      caches[b]->share_prefix_from(*caches[0], P);
      std::copy(logits.begin(), logits.begin() + V, logits.begin() + static_cast<int64_t>(b) * V);
    }
  }
  int cur_len = P;
  uint64_t step = 0;
  while (true) {
    // Accumulated log-probabilities of every (beam, token) continuation.
    std::vector<float> acc(static_cast<size_t>(num_beams) * V);
    for (int b = 0; b < num_beams; ++b) {
      float* row = logits.data() + static_cast<int64_t>(b) * V;
      float mx, lse;
      kernels().logsumexp(row, V, &mx, &lse);
      for (int v = 0; v < V; ++v) row[v] = row[v] - mx - lse;
      const auto& toks = running[b].tokens;
      apply_penalties(row, V, toks.data(), static_cast<int>(toks.size()), P, options);
      if (options.do_sample) apply_warpers(row, V, options);
      float* a = acc.data() + static_cast<int64_t>(b) * V;
      for (int v = 0; v < V; ++v) a[v] = row[v] + running[b].score;
    }
    std::vector<int64_t> cand;
    if (options.do_sample) {
      // Sampling without replacement in proportion to exp(acc): Gumbel-top-k with the counter-based stream.
      std::vector<float> keyed(acc.size());
      for (size_t i = 0; i < acc.size(); ++i) {
        const double u = std::max(uniform(options.seed, step, i), 1e-300);
        keyed[i] = std::isinf(acc[i]) ? acc[i] : acc[i] - static_cast<float>(std::log(-std::log(u)));
      }
      cand = top_k_indices(keyed, keep);
      std::stable_sort(cand.begin(), cand.end(), [&](int64_t x, int64_t y) { return acc[x] > acc[y]; });
    } else {
      cand = top_k_indices(acc, keep);
    }
    std::vector<Beam> topk(cand.size());
    std::vector<int> parent(cand.size());
    std::vector<char> hits(cand.size());
    for (size_t j = 0; j < cand.size(); ++j) {
      parent[j] = static_cast<int>(cand[j] / V);
      const int32_t tok = static_cast<int32_t>(cand[j] % V);
      topk[j].tokens = running[parent[j]].tokens;
      topk[j].tokens.push_back(tok);
      topk[j].score = acc[cand[j]];
      hits[j] = (std::find(options.eos_token_ids.begin(), options.eos_token_ids.end(), tok) !=
                 options.eos_token_ids.end()) ||
                cur_len + 1 >= max_length;
    }
    // Next running beams: the best candidates that did not end.
    std::vector<float> run_scores(cand.size());
    for (size_t j = 0; j < cand.size(); ++j) run_scores[j] = topk[j].score + (hits[j] ? -1.0e9f : 0.0f);
    const auto next = top_k_indices(run_scores, num_beams);
    // Finished set: merge the old one with the candidates that ended among the first num_beams.
    bool all_done = std::all_of(done.begin(), done.end(), [](const Beam& b) { return b.finished; });
    const float lp = static_cast<float>(std::pow(static_cast<double>(cur_len + 1 - P), length_penalty));
    std::vector<float> merged_scores;
    for (const auto& d : done) merged_scores.push_back(d.score);
    for (size_t j = 0; j < cand.size(); ++j) {
      const bool just_finished = hits[j] && static_cast<int>(j) < num_beams;
      float s = topk[j].score / lp;
      s += (all_done && early_stopping == EarlyStopping::on) ? -1.0e9f : 0.0f;
      s += heuristic_unsatisfied ? 0.0f : -1.0e9f;
      s += just_finished ? 0.0f : -1.0e9f;
      merged_scores.push_back(s);
    }
    const auto best = top_k_indices(merged_scores, num_beams);
    std::vector<Beam> new_done;
    for (int64_t m : best) {
      if (m < num_beams) {
        new_done.push_back(done[m]);
      } else {
        const int j = static_cast<int>(m - num_beams);
        new_done.push_back(Beam{topk[j].tokens, merged_scores[m], hits[j] && j < num_beams});
      }
    }
    done = std::move(new_done);
    std::vector<Beam> new_running;
    std::vector<int> new_parent;
    for (int64_t j : next) {
      new_running.push_back(Beam{topk[j].tokens, run_scores[j], false});
      new_parent.push_back(parent[j]);
    }
    running = std::move(new_running);
    ++cur_len;
    ++step;
    // Early-stop heuristic and loop condition, as _check_early_stop_heuristic / _beam_search_has_unfinished.
    {
      const int best_len = (early_stopping == EarlyStopping::never && length_penalty > 0.0f) ? max_length - P : cur_len - P;
      const float best_possible = running[0].score / static_cast<float>(std::pow(static_cast<double>(best_len), length_penalty));
      const bool every_done = std::all_of(done.begin(), done.end(), [](const Beam& b) { return b.finished; });
      float worst = done[0].score;  // torch.min over every slot's score, finished or not
      for (const auto& d : done) worst = std::min(worst, d.score);
      // torch.where per beam: unfinished slots compare against -1e9.
      bool any_better = false;
      for (const auto& d : done) any_better |= best_possible > (d.finished ? worst : -1.0e9f);
      heuristic_unsatisfied = heuristic_unsatisfied && any_better;
      const bool exists_open = !(every_done && early_stopping == EarlyStopping::on);
      const bool valid = !std::all_of(hits.begin(), hits.end(), [](char h) { return h != 0; });
      if (!(heuristic_unsatisfied && exists_open && valid)) break;
    }
    // Reorder caches to the new beams' parents: each takes its parent's blocks, shared; the old caches let
    // go of theirs, so that a parent's only child writes its next position in place and siblings copy the one
    // block they write into (KVCache::prepare_append). Then feed the last tokens.
    for (int b = 0; b < num_beams; ++b) spare[b]->share_prefix_from(*caches[new_parent[b]], cur_len - 1);
    std::swap(caches, spare);
    for (auto& old : spare) old->clear();
    std::vector<ForwardItem> items;
    for (int b = 0; b < num_beams; ++b) items.push_back({caches[b].get(), &running[b].tokens.back(), 1, 1});
    model.forward(items, logits.data());
  }
  std::vector<BeamHypothesis> out;
  for (int i = 0; i < num_return; ++i)
    out.push_back({std::vector<int32_t>(done[i].tokens.begin() + P, done[i].tokens.end()), done[i].score});
  return out;
}

}  // namespace gptcpp
