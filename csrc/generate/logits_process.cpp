#include "generate/logits_process.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <unordered_map>

#include "kernels/kernels.h"

namespace gptcpp {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace

// Softmax of a row into probs (float, as torch computes it), -inf entries giving 0.
void softmax_probs(const float* logits, int vocab, std::vector<float>& probs) {
  float mx, lse;
  kernels().logsumexp(logits, vocab, &mx, &lse);
  probs.resize(vocab);
  const float shift = mx + lse;
  for (int i = 0; i < vocab; ++i) probs[i] = std::exp(logits[i] - shift);
}

int32_t sample_weights(const float* weights, int vocab, double u) {
  double total = 0.0;
  for (int i = 0; i < vocab; ++i) total += weights[i];
  const double target = u * total;
  double cum = 0.0;
  int32_t last_valid = 0;
  for (int i = 0; i < vocab; ++i) {
    if (weights[i] <= 0.0f) continue;
    cum += weights[i];
    last_valid = i;
    if (cum > target) return i;
  }
  return last_valid;
}

void apply_penalties(float* logits, int vocab, const int32_t* tokens, int n_tokens, int n_prompt,
                     const SamplingOptions& opt) {
  for (const auto& [tok, bias] : opt.logit_bias)
    if (tok >= 0 && tok < vocab) logits[tok] += bias;

  if (opt.repetition_penalty != 1.0f) {
    // transformers gathers then scatters, so a token seen twice is penalised once.
    std::vector<char> seen(vocab, 0);
    for (int i = 0; i < n_tokens; ++i) {
      const int32_t t = tokens[i];
      if (t < 0 || t >= vocab || seen[t]) continue;
      seen[t] = 1;
      float& s = logits[t];
      s = s < 0 ? s * opt.repetition_penalty : s / opt.repetition_penalty;
    }
  }

  if (opt.presence_penalty != 0.0f || opt.frequency_penalty != 0.0f) {
    std::unordered_map<int32_t, int> counts;
    for (int i = n_prompt; i < n_tokens; ++i) counts[tokens[i]]++;
    for (const auto& [t, n] : counts)
      if (t >= 0 && t < vocab) logits[t] -= opt.presence_penalty + opt.frequency_penalty * static_cast<float>(n);
  }

  const int n = opt.no_repeat_ngram_size;
  if (n > 0 && n_tokens + 1 >= n) {
    // Ban every token that would complete an n-gram already present (prefix = the last n-1 tokens).
    const int32_t* prefix = tokens + n_tokens - (n - 1);
    for (int start = 0; start + n <= n_tokens; ++start) {
      if (std::equal(tokens + start, tokens + start + n - 1, prefix)) {
        const int32_t banned = tokens[start + n - 1];
        if (banned >= 0 && banned < vocab) logits[banned] = kNegInf;
      }
    }
  }

  for (const auto& word : opt.bad_words_ids) {
    if (word.empty()) continue;
    if (word.size() == 1 && std::find(opt.eos_token_ids.begin(), opt.eos_token_ids.end(), word[0]) !=
                                opt.eos_token_ids.end())
      continue;  // transformers never bans EOS through bad_words_ids
    const int plen = static_cast<int>(word.size()) - 1;
    if (plen > n_tokens) continue;
    if (std::equal(word.begin(), word.end() - 1, tokens + n_tokens - plen)) {
      const int32_t banned = word.back();
      if (banned >= 0 && banned < vocab) logits[banned] = kNegInf;
    }
  }

  if (n_tokens - n_prompt < opt.min_new_tokens)
    for (int32_t e : opt.eos_token_ids)
      if (e >= 0 && e < vocab) logits[e] = kNegInf;
}

void temperature_warp(float* logits, int vocab, float temperature) {
  if (temperature == 1.0f) return;
  for (int i = 0; i < vocab; ++i) logits[i] /= temperature;
}

void top_k_warp(float* logits, int vocab, int top_k, int min_keep) {
  const int k = std::min(std::max(top_k, min_keep), vocab);
  if (k <= 0 || k >= vocab) return;
  std::vector<float> vals(logits, logits + vocab);
  std::nth_element(vals.begin(), vals.begin() + (k - 1), vals.end(), std::greater<float>());
  const float kth = vals[k - 1];
  for (int i = 0; i < vocab; ++i)
    if (logits[i] < kth) logits[i] = kNegInf;  // ties with the k-th value stay, as in transformers
}

void top_p_warp(float* logits, int vocab, float top_p, int min_keep) {
  if (top_p >= 1.0f) return;
  std::vector<float> probs;
  softmax_probs(logits, vocab, probs);
  // transformers sorts ascending and removes tokens whose cumulative probability is <= 1 - top_p.
  // Equivalently: walk from the most likely token down, keeping tokens while the mass strictly above
  // them, counted from the low end, exceeds 1 - top_p. The low-end sum is done in the ascending order.
  std::vector<int> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] < logits[b]; });
  float cum = 0.0f;
  const float limit = 1.0f - top_p;
  for (int r = 0; r < vocab - min_keep; ++r) {
    cum += probs[order[r]];
    if (cum <= limit) logits[order[r]] = kNegInf; else break;
  }
}

void min_p_warp(float* logits, int vocab, float min_p, int min_keep) {
  if (min_p <= 0.0f) return;
  std::vector<float> probs;
  softmax_probs(logits, vocab, probs);
  const float threshold = min_p * *std::max_element(probs.begin(), probs.end());
  std::vector<int> removed;
  int kept = 0;
  for (int i = 0; i < vocab; ++i) {
    if (probs[i] < threshold) removed.push_back(i); else ++kept;
  }
  if (kept < min_keep) {  // keep the best min_keep regardless
    std::sort(removed.begin(), removed.end(), [&](int a, int b) { return logits[a] > logits[b]; });
    removed.erase(removed.begin(), removed.begin() + std::min<size_t>(removed.size(), min_keep - kept));
  }
  for (int i : removed) logits[i] = kNegInf;
}

void typical_warp(float* logits, int vocab, float mass, int min_keep) {
  if (mass >= 1.0f) return;
  float mx, lse;
  kernels().logsumexp(logits, vocab, &mx, &lse);
  std::vector<float> logp(vocab);
  float ent = 0.0f;
  for (int i = 0; i < vocab; ++i) {
    logp[i] = logits[i] - mx - lse;
    const float p = std::exp(logp[i]);
    if (p > 0.0f) ent -= logp[i] * p;
  }
  std::vector<float> shifted(vocab);
  for (int i = 0; i < vocab; ++i) shifted[i] = std::fabs(-logp[i] - ent);
  std::vector<int> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return shifted[a] < shifted[b]; });
  float cum = 0.0f;
  int last = 0;
  for (int r = 0; r < vocab; ++r) {
    cum += std::exp(logp[order[r]]);
    if (cum < mass) last = r + 1; else break;
  }
  last = std::min(last, vocab - 1);
  const float cutoff = shifted[order[last]];
  for (int r = std::max(min_keep, 0); r < vocab; ++r)
    if (shifted[order[r]] > cutoff) logits[order[r]] = kNegInf;
}

void apply_warpers(float* logits, int vocab, const SamplingOptions& opt) {
  const int keep = std::max(1, opt.min_tokens_to_keep);
  temperature_warp(logits, vocab, opt.temperature);
  if (opt.top_k > 0) top_k_warp(logits, vocab, opt.top_k, keep);
  if (opt.top_p < 1.0f) top_p_warp(logits, vocab, opt.top_p, keep);
  if (opt.min_p > 0.0f) min_p_warp(logits, vocab, opt.min_p, keep);
  if (opt.typical_p < 1.0f) typical_warp(logits, vocab, opt.typical_p, keep);
}

double uniform(uint64_t seed, uint64_t stream, uint64_t counter) {
  // splitmix64 finaliser over a combination of the three inputs: a counter-based generator.
  auto mix = [](uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  };
  const uint64_t z = mix(mix(mix(seed) ^ stream) ^ counter);
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);
}

int32_t argmax(const float* logits, int vocab) {
  int32_t best = 0;
  for (int i = 1; i < vocab; ++i)
    if (logits[i] > logits[best]) best = i;
  return best;
}

int32_t sample_token(const float* logits, int vocab, double u) {
  std::vector<float> p;
  softmax_probs(logits, vocab, p);
  return sample_weights(p.data(), vocab, u);
}

TokenLogprobs token_logprobs(const float* logits, int vocab, int32_t token, int top_n) {
  float mx, lse;
  kernels().logsumexp(logits, vocab, &mx, &lse);
  TokenLogprobs out;
  out.logprob = logits[token] - mx - lse;
  if (top_n > 0) {
    top_n = std::min(top_n, vocab);
    std::vector<int> idx(vocab);
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + top_n, idx.end(), [&](int a, int b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    for (int i = 0; i < top_n; ++i) out.top.emplace_back(idx[i], logits[idx[i]] - mx - lse);
  }
  return out;
}

}  // namespace gptcpp
