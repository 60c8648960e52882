// Logits processing and token choice for one sequence, in the order transformers' generate() applies them:
// logit_bias, repetition_penalty, presence/frequency penalties (OpenAI semantics, generated tokens only),
// no_repeat_ngram_size, bad_words_ids, min_new_tokens; then, when sampling, temperature, top_k, top_p,
// min_p, typical_p. Everything works in place on a row of `vocab` floats; filtered entries become -inf.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace gptcpp {

struct SamplingOptions {
  bool do_sample = false;
  float temperature = 1.0f;
  int top_k = 0;          // 0: off
  float top_p = 1.0f;     // 1: off
  float min_p = 0.0f;     // 0: off
  float typical_p = 1.0f; // 1: off
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int no_repeat_ngram_size = 0;
  std::vector<std::vector<int32_t>> bad_words_ids;
  std::vector<std::pair<int32_t, float>> logit_bias;
  int min_new_tokens = 0;
  std::vector<int32_t> eos_token_ids;
  uint64_t seed = 0;
  int min_tokens_to_keep = 1;  // warpers never keep fewer (beam sampling raises it, as transformers does)
};

// The processors that come before the sampling warpers (always applied, greedy included).
// tokens: prompt + generated so far; n_prompt of them are the prompt.
void apply_penalties(float* logits, int vocab, const int32_t* tokens, int n_tokens, int n_prompt,
                     const SamplingOptions& opt);
// temperature, top_k, top_p, min_p, typical_p (only meaningful when sampling).
void apply_warpers(float* logits, int vocab, const SamplingOptions& opt);

// Individual warpers, exposed for tests against transformers' LogitsWarpers.
void temperature_warp(float* logits, int vocab, float temperature);
void top_k_warp(float* logits, int vocab, int top_k, int min_keep);
void top_p_warp(float* logits, int vocab, float top_p, int min_keep);
void min_p_warp(float* logits, int vocab, float min_p, int min_keep);
void typical_warp(float* logits, int vocab, float mass, int min_keep);

// Counter-based random numbers: the same (seed, stream, counter) always gives the same value, so a
// sequence's draws do not depend on what else runs or on threads. Uniform in [0, 1).
double uniform(uint64_t seed, uint64_t stream, uint64_t counter);

int32_t argmax(const float* logits, int vocab);
// softmax(logits) into probs (entries at -inf give 0).
void softmax_probs(const float* logits, int vocab, std::vector<float>& probs);
// Draws index i with probability weights[i] / sum(weights) using u in [0, 1); weights >= 0.
int32_t sample_weights(const float* weights, int vocab, double u);
// Draws from softmax(logits) with the uniform number u.
int32_t sample_token(const float* logits, int vocab, double u);

// log_softmax of a raw row at the chosen token, and the top-n (token, logprob) pairs, best first.
struct TokenLogprobs {
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;
};
TokenLogprobs token_logprobs(const float* logits, int vocab, int32_t token, int top_n);

}  // namespace gptcpp
