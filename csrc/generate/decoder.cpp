#include "generate/decoder.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace gptcpp {

namespace {

// Independent random streams of one sequence, so that plain sampling draws exactly what it drew before
// speculation existed, and the speculative draws never reuse those numbers.
constexpr uint64_t kDraftStream = 1ull << 40, kAcceptStream = 2ull << 40, kResidualStream = 3ull << 40;

bool is_eos(const SamplingOptions& o, int32_t t) {
  return std::find(o.eos_token_ids.begin(), o.eos_token_ids.end(), t) != o.eos_token_ids.end();
}

}  // namespace

// ---- prefix cache ---------------------------------------------------------------------------------------

int PrefixCache::restore(const std::vector<int32_t>& prompt, int max_len, KVCache& cache) {
  std::lock_guard<std::mutex> lock(mu_);
  auto best = lru_.end();
  int best_len = 0;
  for (auto it = lru_.begin(); it != lru_.end(); ++it) {
    const int n = std::min<int>(static_cast<int>(it->tokens.size()), max_len);
    int match = 0;
    while (match < n && it->tokens[match] == prompt[match]) ++match;
    if (match > best_len) {
      best_len = match;
      best = it;
    }
  }
  if (best == lru_.end()) return 0;
  cache.share_prefix_from(*best->cache, best_len);
  lru_.splice(lru_.begin(), lru_, best);  // most recently used
  return best_len;
}

void PrefixCache::insert(const std::vector<int32_t>& prompt, int n, const KVCache& cache) {
  if (n <= 0 || n > budget_) return;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = lru_.begin(); it != lru_.end(); ++it) {
    if (static_cast<int>(it->tokens.size()) >= n && std::equal(prompt.begin(), prompt.begin() + n, it->tokens.begin())) {
      lru_.splice(lru_.begin(), lru_, it);  // already covered by a longer or equal entry
      return;
    }
  }
  Entry e;
  e.tokens.assign(prompt.begin(), prompt.begin() + n);
  e.cache = std::make_unique<KVCache>(config_, n);
  e.cache->share_prefix_from(cache, n);
  // An entry that is a prefix of the new one is now redundant.
  lru_.remove_if([&](const Entry& x) {
    const bool redundant = x.tokens.size() < e.tokens.size() && std::equal(x.tokens.begin(), x.tokens.end(), e.tokens.begin());
    if (redundant) used_ -= static_cast<int64_t>(x.tokens.size());
    return redundant;
  });
  used_ += n;
  lru_.push_front(std::move(e));
  while (used_ > budget_ && !lru_.empty()) {
    used_ -= static_cast<int64_t>(lru_.back().tokens.size());
    lru_.pop_back();
  }
}

int64_t PrefixCache::cached_tokens() const {
  std::lock_guard<std::mutex> lock(mu_);
  return used_;
}

size_t PrefixCache::entries() const {
  std::lock_guard<std::mutex> lock(mu_);
  return lru_.size();
}

// ---- decoder ------------------------------------------------------------------------------------------

int64_t Decoder::add(std::vector<int32_t> prompt, const SamplingOptions& options, int max_new_tokens, int logprobs,
                     uint64_t stream, const SpeculationOptions& spec) {
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
  if (spec.mode == Speculation::draft && draft_ == nullptr)
    throw std::invalid_argument("draft speculation needs a draft model");
  if (spec.num_tokens < 0) throw std::invalid_argument("num_assistant_tokens must be >= 0");
  Sequence s;
  s.n_prompt = static_cast<int>(prompt.size());
  // The last chosen token is never fed back, so the cache needs prompt + max_new_tokens - 1 positions
  // (verification never writes past that: proposals are capped by the tokens still allowed).
  const int64_t want = static_cast<int64_t>(s.n_prompt) + max_new_tokens - 1;
  const int capacity = static_cast<int>(std::max<int64_t>(s.n_prompt, std::min<int64_t>(want, c.n_positions)));
  s.cache = std::make_unique<KVCache>(c, capacity);
  if (spec.mode == Speculation::draft) s.draft_cache = std::make_unique<KVCache>(draft_->config(), capacity);
  s.tokens = std::move(prompt);
  if (prefix_cache_) {
    // Keep at least one prompt token to feed: its logits start the generation.
    const int n = prefix_cache_->restore(s.tokens, s.n_prompt - 1, *s.cache);
    s.n_fed = n;
    prefix_hits_ += n;
  }
  s.max_new_tokens = max_new_tokens;
  s.logprobs = logprobs;
  s.stream = stream;
  s.options = options;
  s.spec = spec;
  s.k = spec.mode == Speculation::none ? 0 : spec.num_tokens;
  const int64_t id = next_id_++;
  seqs_.emplace(id, std::move(s));
  return id;
}

void Decoder::propose_by_lookup(Sequence& s, int k) const {
  const auto& t = s.tokens;
  const int n_tok = static_cast<int>(t.size());
  for (int n = std::min(s.spec.max_ngram, n_tok - 1); n >= 1; --n) {
    const int32_t* pattern = t.data() + n_tok - n;
    // The most recent earlier occurrence of the last n tokens; propose what followed it.
    for (int start = n_tok - n - 1; start >= 0; --start) {
      if (std::equal(pattern, pattern + n, t.data() + start)) {
        for (int j = start + n; j < n_tok && static_cast<int>(s.proposals.size()) < k; ++j) s.proposals.push_back(t[j]);
        return;
      }
    }
  }
}

void Decoder::propose_by_draft(std::vector<Sequence*>& seqs, const std::vector<int>& ks) {
  const int V = draft_->config().vocab_size;
  const int rounds = *std::max_element(ks.begin(), ks.end());
  std::vector<std::vector<int32_t>> pending(seqs.size());
  std::vector<float> logits;
  for (int r = 0; r < rounds; ++r) {
    std::vector<ForwardItem> items;
    std::vector<size_t> who;
    for (size_t i = 0; i < seqs.size(); ++i) {
      Sequence& s = *seqs[i];
      if (r >= ks[i]) continue;
      // Everything the draft has not seen yet: the tail of the sequence, then this step's proposals.
      pending[i].clear();
      const int total = static_cast<int>(s.tokens.size()) + r;
      for (int j = s.n_draft_fed; j < total; ++j)
        pending[i].push_back(j < static_cast<int>(s.tokens.size()) ? s.tokens[j] : s.proposals[j - s.tokens.size()]);
      items.push_back({s.draft_cache.get(), pending[i].data(), static_cast<int>(pending[i].size()), 1});
      who.push_back(i);
    }
    if (items.empty()) break;
    logits.resize(items.size() * static_cast<size_t>(V));
    draft_->forward(items, logits.data());
    for (size_t w = 0; w < who.size(); ++w) {
      Sequence& s = *seqs[who[w]];
      s.n_draft_fed = static_cast<int>(s.tokens.size()) + r;
      float* row = logits.data() + w * static_cast<size_t>(V);
      std::vector<int32_t> ctx(s.tokens);
      ctx.insert(ctx.end(), s.proposals.begin(), s.proposals.end());
      apply_penalties(row, V, ctx.data(), static_cast<int>(ctx.size()), s.n_prompt, s.options);
      int32_t tok;
      if (s.options.do_sample) {
        apply_warpers(row, V, s.options);
        std::vector<float> q;
        softmax_probs(row, V, q);
        tok = sample_weights(q.data(), V, uniform(s.options.seed, s.stream + kDraftStream, ctx.size() - s.n_prompt));
        s.proposal_probs.push_back(std::move(q));
      } else {
        tok = argmax(row, V);
      }
      s.proposals.push_back(tok);
    }
  }
}

std::vector<StepOutput> Decoder::step() {
  std::vector<StepOutput> out;
  if (seqs_.empty()) return out;
  const GPT2Config& c = model_.config();
  const int V = c.vocab_size;
  std::vector<std::pair<const int64_t, Sequence>*> order;
  for (auto& kv : seqs_) order.push_back(&kv);
  const int n = static_cast<int>(order.size());

  // 1. Proposals.
  std::vector<Sequence*> drafting;
  std::vector<int> draft_ks;
  for (auto* kv : order) {
    Sequence& s = kv->second;
    s.proposals.clear();
    s.proposal_probs.clear();
    if (s.spec.mode == Speculation::none) continue;
    if (s.cooldown > 0) {
      --s.cooldown;
      continue;
    }
    const int generated = static_cast<int>(s.tokens.size()) - s.n_prompt;
    // Never propose past what may still be emitted (the model's own token always comes last) or past the
    // context, so the verification pass never writes beyond the cache.
    const int k = std::min({s.k, s.max_new_tokens - generated - 1, c.n_positions - static_cast<int>(s.tokens.size())});
    if (k <= 0) continue;
    if (s.spec.mode == Speculation::prompt_lookup) {
      propose_by_lookup(s, k);
    } else {
      drafting.push_back(&s);
      draft_ks.push_back(k);
    }
  }
  if (!drafting.empty()) propose_by_draft(drafting, draft_ks);

  // 2. One forward pass: each sequence's unfed tokens plus its proposals, logits for the proposals' rows.
  std::vector<std::vector<int32_t>> feed(n);
  std::vector<ForwardItem> items;
  int64_t rows = 0;
  for (int i = 0; i < n; ++i) {
    Sequence& s = order[i]->second;
    feed[i].assign(s.tokens.begin() + s.n_fed, s.tokens.end());
    feed[i].insert(feed[i].end(), s.proposals.begin(), s.proposals.end());
    const int n_logits = 1 + static_cast<int>(s.proposals.size());
    items.push_back({s.cache.get(), feed[i].data(), static_cast<int>(feed[i].size()), n_logits});
    rows += n_logits;
  }
  logits_.resize(static_cast<size_t>(rows) * V);
  model_.forward(items, logits_.data());
  std::vector<int64_t> row0(n);
  for (int i = 0, r = 0; i < n; ++i) {
    row0[i] = r;
    r += items[i].n_logits;
  }

  // 3. Accept, per sequence.
  std::vector<std::vector<StepOutput>> emitted(n);
  std::vector<int> n_accepted(n, 0);
  auto accept = [&](int i) {
    Sequence& s = order[i]->second;
    const int n_before = static_cast<int>(s.tokens.size());
    const int P = static_cast<int>(s.proposals.size());
    std::vector<float> raw, p;
    for (int j = 0; j <= P; ++j) {
      float* row = logits_.data() + (row0[i] + j) * static_cast<int64_t>(V);
      if (s.logprobs >= 0) raw.assign(row, row + V);
      apply_penalties(row, V, s.tokens.data(), static_cast<int>(s.tokens.size()), s.n_prompt, s.options);
      const uint64_t g = static_cast<uint64_t>(s.tokens.size() - s.n_prompt);
      int32_t tok;
      bool accepted = false;
      if (!s.options.do_sample) {
        tok = argmax(row, V);
        accepted = j < P && tok == s.proposals[j];
      } else {
        apply_warpers(row, V, s.options);
        if (j < P) {
          const int32_t x = s.proposals[j];
          softmax_probs(row, V, p);
          const float qx = s.proposal_probs.empty() ? 1.0f : s.proposal_probs[j][x];
          const double u = uniform(s.options.seed, s.stream + kAcceptStream, g);
          accepted = qx > 0.0f && u < std::min(1.0, static_cast<double>(p[x]) / qx);
          if (accepted) {
            tok = x;
          } else {  // draw from the residual max(0, p - q)
            if (s.proposal_probs.empty()) {
              p[x] = 0.0f;
            } else {
              for (int v = 0; v < V; ++v) p[v] = std::max(0.0f, p[v] - s.proposal_probs[j][v]);
            }
            tok = sample_weights(p.data(), V, uniform(s.options.seed, s.stream + kResidualStream, g));
          }
        } else {
          tok = sample_token(row, V, uniform(s.options.seed, s.stream, g));
        }
      }
      StepOutput o;
      o.id = order[i]->first;
      o.token = tok;
      if (s.logprobs >= 0) {
        o.has_logprobs = true;
        o.logprobs = token_logprobs(raw.data(), V, tok, s.logprobs);
      }
      s.tokens.push_back(tok);
      const int generated = static_cast<int>(s.tokens.size()) - s.n_prompt;
      if (is_eos(s.options, tok))
        o.finish = FinishReason::eos;
      else if (generated >= s.max_new_tokens || static_cast<int>(s.tokens.size()) >= c.n_positions)
        o.finish = FinishReason::length;
      emitted[i].push_back(o);
      if (j < P && accepted) ++n_accepted[i];
      if (o.finish != FinishReason::none || !accepted) break;
    }
    // Keep the cache rows of the tokens that stand: the unfed tail and the accepted proposals.
    s.n_fed = n_before + n_accepted[i];
    s.cache->truncate(s.n_fed);
    if (s.draft_cache) {
      s.n_draft_fed = std::min(s.n_draft_fed, s.n_fed);
      s.draft_cache->truncate(s.n_draft_fed);
    }
    if (P > 0 && s.spec.adaptive) {
      // transformers' heuristic (+2 after full acceptance, -1 otherwise), except that a step that accepted
      // nothing halves K: a draft that does not agree stops costing draft tokens sooner (4, 2, 1 instead of 4,
      // 3, 2, 1). When K reaches 0 the proposals rest, longer each time, then one is tried again.
      if (n_accepted[i] == P) {
        s.k = std::min(s.k + 2, 32);
      } else {
        s.k = n_accepted[i] == 0 ? s.k / 2 : s.k - 1;
        if (s.k <= 0) {
          s.k = 1;
          s.cooldown = 8 << std::min(s.failures++, 5);
        }
      }
      if (n_accepted[i] > 0) s.failures = 0;
    }
  };
  if (n > 1) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n; ++i) accept(i);
  } else if (n == 1) {  // outside the OpenMP runtime: see cpu/parallel.h
    accept(0);
  }
  for (int i = 0; i < n; ++i) {
    Sequence& s = order[i]->second;
    proposed_ += static_cast<int64_t>(s.proposals.size());
    accepted_ += n_accepted[i];
    s.n_proposed += static_cast<int>(s.proposals.size());
    s.n_accepted += n_accepted[i];
    for (auto& o : emitted[i]) {
      o.proposed = s.n_proposed;
      o.accepted = s.n_accepted;
    }
    if (prefix_cache_ && !s.prefix_saved) {  // the prompt's KV is complete after the first step
      s.prefix_saved = true;
      prefix_cache_->insert(s.tokens, s.n_prompt, *s.cache);
    }
    for (auto& o : emitted[i]) out.push_back(std::move(o));
  }
  for (const auto& o : out)
    if (o.finish != FinishReason::none) seqs_.erase(o.id);
  return out;
}

}  // namespace gptcpp
