#include "generate/decoder.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace gptcpp {

int64_t Decoder::add(std::vector<int32_t> prompt, const SamplingOptions& options, int max_new_tokens, int logprobs,
                     uint64_t stream) {
  const GPT2Config& c = model_.config();
  if (prompt.empty()) throw std::invalid_argument("empty prompt");
  if (static_cast<int>(prompt.size()) > c.n_positions)
    throw std::length_error("prompt of " + std::to_string(prompt.size()) + " tokens exceeds n_positions (" +
                            std::to_string(c.n_positions) + ")");
  if (max_new_tokens < 1) throw std::invalid_argument("max_new_tokens must be at least 1");
  for (int32_t t : prompt)
    if (t < 0 || t >= c.vocab_size)
      throw std::invalid_argument("token id " + std::to_string(t) + " is outside the vocabulary (0.." +
                                  std::to_string(c.vocab_size - 1) + ")");
  Sequence s;
  s.n_prompt = static_cast<int>(prompt.size());
  // The last chosen token is never fed back, so the cache needs prompt + max_new_tokens - 1 positions.
  const int64_t want = static_cast<int64_t>(s.n_prompt) + max_new_tokens - 1;
  const int capacity = static_cast<int>(std::max<int64_t>(s.n_prompt, std::min<int64_t>(want, c.n_positions)));
  s.cache = std::make_unique<KVCache>(c, capacity);
  s.tokens = std::move(prompt);
  s.max_new_tokens = max_new_tokens;
  s.logprobs = logprobs;
  s.stream = stream;
  s.options = options;
  const int64_t id = next_id_++;
  seqs_.emplace(id, std::move(s));
  return id;
}

std::vector<StepOutput> Decoder::step() {
  std::vector<StepOutput> out;
  if (seqs_.empty()) return out;
  const int V = model_.config().vocab_size;
  std::vector<ForwardItem> items;
  std::vector<std::pair<const int64_t, Sequence>*> order;
  for (auto& kv : seqs_) {
    Sequence& s = kv.second;
    items.push_back({s.cache.get(), s.tokens.data() + s.n_fed, static_cast<int>(s.tokens.size()) - s.n_fed, false});
    order.push_back(&kv);
  }
  logits_.resize(static_cast<size_t>(items.size()) * V);
  model_.forward(items, logits_.data());
  out.resize(order.size());
  const int n = static_cast<int>(order.size());
#pragma omp parallel for schedule(dynamic, 1) if (n > 1)
  for (int i = 0; i < n; ++i) {
    Sequence& s = order[i]->second;
    s.n_fed = static_cast<int>(s.tokens.size());
    float* row = logits_.data() + static_cast<int64_t>(i) * V;
    StepOutput& o = out[i];
    o.id = order[i]->first;
    std::vector<float> raw;
    if (s.logprobs >= 0) raw.assign(row, row + V);
    apply_penalties(row, V, s.tokens.data(), static_cast<int>(s.tokens.size()), s.n_prompt, s.options);
    const int n_generated = static_cast<int>(s.tokens.size()) - s.n_prompt;
    if (s.options.do_sample) {
      apply_warpers(row, V, s.options);
      o.token = sample_token(row, V, uniform(s.options.seed, s.stream, static_cast<uint64_t>(n_generated)));
    } else {
      o.token = argmax(row, V);
    }
    if (s.logprobs >= 0) {
      o.has_logprobs = true;
      o.logprobs = token_logprobs(raw.data(), V, o.token, s.logprobs);
    }
    s.tokens.push_back(o.token);
    const auto& eos = s.options.eos_token_ids;
    if (std::find(eos.begin(), eos.end(), o.token) != eos.end())
      o.finish = FinishReason::eos;
    else if (n_generated + 1 >= s.max_new_tokens || static_cast<int>(s.tokens.size()) >= model_.config().n_positions)
      o.finish = FinishReason::length;
  }
  for (const auto& o : out)
    if (o.finish != FinishReason::none) seqs_.erase(o.id);
  return out;
}

}  // namespace gptcpp
