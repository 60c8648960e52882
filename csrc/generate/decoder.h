// The batched decoding step: sequences with their own prompts, options and KV caches advance together,
// one forward pass per step for all live sequences; new sequences may join between steps (continuous
// batching). Each step returns the tokens chosen for each live sequence; logits never leave C++.
//
// With speculation a step first gathers proposed tokens for each sequence (from a draft model, run batched
// over the sequences, or from n-gram matches in the sequence itself), then verifies all of them in the same
// single forward pass of the model and keeps the longest accepted prefix plus one token of the model's own.
// Greedy acceptance compares with the model's own choice (so output is token-identical to plain greedy);
// sampling uses the speculative-sampling rule (accept with min(1, p/q), else draw from max(0, p - q)), so
// the output distribution is the model's.
#pragma once
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "generate/logits_process.h"
#include "model/gpt2.h"

namespace gptcpp {

enum class FinishReason { none = 0, length = 1, stop = 2, eos = 3 };

struct StepOutput {
  int64_t id;
  int32_t token;
  FinishReason finish = FinishReason::none;
  bool has_logprobs = false;
  TokenLogprobs logprobs;
  int proposed = 0, accepted = 0;  // speculative tokens of this sequence so far
};

enum class Speculation { none = 0, draft = 1, prompt_lookup = 2 };

struct SpeculationOptions {
  Speculation mode = Speculation::none;
  int num_tokens = 5;    // proposals per step (the starting value when adaptive)
  bool adaptive = true;  // grow after full acceptance, shrink after a rejection
  int max_ngram = 3;     // prompt lookup: longest suffix n-gram matched
};

// Key/value caches of recent prompt prefixes within a budget of cached tokens, least recently used
// evicted first. Shared by all decoders of a model; thread-safe.
class PrefixCache {
 public:
  PrefixCache(const GPT2Config& config, int64_t budget_tokens) : config_(config), budget_(budget_tokens) {}
  // Gives cache the longest cached prefix of prompt (at most max_len tokens), its blocks shared with the
  // entry (not copied); returns its length.
  int restore(const std::vector<int32_t>& prompt, int max_len, KVCache& cache);
  // Remembers the first n positions of cache as the KV of prompt[0:n].
  void insert(const std::vector<int32_t>& prompt, int n, const KVCache& cache);
  int64_t cached_tokens() const;
  int64_t budget() const { return budget_; }
  size_t entries() const;

 private:
  struct Entry {
    std::vector<int32_t> tokens;
    std::unique_ptr<KVCache> cache;
  };
  GPT2Config config_;
  int64_t budget_, used_ = 0;
  std::list<Entry> lru_;  // most recently used first
  mutable std::mutex mu_;
};

class Decoder {
 public:
  explicit Decoder(const GPT2Model& model, const GPT2Model* draft = nullptr, PrefixCache* prefix_cache = nullptr)
      : model_(model), draft_(draft), prefix_cache_(prefix_cache) {}
  // Adds a sequence; it is prefilled on the next step. stream separates the random streams of sequences
  // that share a seed (num_return_sequences). logprobs < 0: none; n >= 0: chosen token plus top n.
  int64_t add(std::vector<int32_t> prompt, const SamplingOptions& options, int max_new_tokens, int logprobs,
              uint64_t stream, const SpeculationOptions& spec = {});
  // One forward pass over all live sequences (plus the draft's passes when speculating). Returns each
  // emitted token in order, several per sequence when proposals were accepted; finished sequences are
  // removed after reporting.
  std::vector<StepOutput> step();
  // Drops a sequence (a stop string matched, or its client went away).
  void cancel(int64_t id) { seqs_.erase(id); }
  size_t live() const { return seqs_.size(); }
  // Proposed and accepted speculative tokens so far, over all sequences this decoder has run.
  int64_t proposed() const { return proposed_; }
  int64_t accepted() const { return accepted_; }
  // Prompt tokens that were served from the prefix cache instead of being computed.
  int64_t prefix_hits() const { return prefix_hits_; }

 private:
  struct Sequence {
    std::unique_ptr<KVCache> cache, draft_cache;
    std::vector<int32_t> tokens;  // prompt + generated
    int n_prompt = 0;
    int n_fed = 0;        // tokens already in the cache
    int n_draft_fed = 0;  // tokens already in the draft's cache
    int max_new_tokens = 0;
    int logprobs = -1;
    uint64_t stream = 0;
    SamplingOptions options;
    SpeculationOptions spec;
    int k = 0;         // current number of proposals
    int cooldown = 0;  // steps left without speculation after proposals kept failing
    int failures = 0;  // consecutive rests; each doubles the next (8, 16, ... 256 steps)
    bool prefix_saved = false;
    int n_proposed = 0, n_accepted = 0;
    std::vector<int32_t> proposals;
    std::vector<std::vector<float>> proposal_probs;  // draft's sampling distribution per proposal
  };
  void propose_by_lookup(Sequence& s, int k) const;
  void propose_by_draft(std::vector<Sequence*>& seqs, const std::vector<int>& ks);
  const GPT2Model& model_;
  const GPT2Model* draft_;
  PrefixCache* prefix_cache_;
  std::map<int64_t, Sequence> seqs_;  // ordered by id, so the batch order is the arrival order
  int64_t next_id_ = 0, proposed_ = 0, accepted_ = 0, prefix_hits_ = 0;
  std::vector<float> logits_;
};

// Beam search for one prompt, as transformers' generate(num_beams=...) does it (same candidate selection,
// length penalty, early_stopping modes and stopping rules). Returns the best num_return hypotheses, best
// first: generated tokens (EOS included when it ended one) and score.
enum class EarlyStopping { heuristic = 0, on = 1, never = 2 };
struct BeamHypothesis {
  std::vector<int32_t> tokens;
  float score;
};
std::vector<BeamHypothesis> beam_search(const GPT2Model& model, const std::vector<int32_t>& prompt,
                                        const SamplingOptions& options, int num_beams, int max_new_tokens,
                                        float length_penalty, EarlyStopping early_stopping, int num_return);

}  // namespace gptcpp
