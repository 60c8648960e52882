// The batched decoding step: sequences with their own prompts, options and KV caches advance together,
// one forward pass per step for all live sequences; new sequences may join between steps (continuous
// batching). Each step returns one chosen token per live sequence; logits never leave C++.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
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
};

class Decoder {
 public:
  explicit Decoder(const GPT2Model& model) : model_(model) {}
  // Adds a sequence; it is prefilled on the next step. stream separates the random streams of sequences
  // that share a seed (num_return_sequences). logprobs < 0: none; n >= 0: chosen token plus top n.
  int64_t add(std::vector<int32_t> prompt, const SamplingOptions& options, int max_new_tokens, int logprobs,
              uint64_t stream);
  // One forward pass over all live sequences; finished sequences are removed after reporting.
  std::vector<StepOutput> step();
  // Drops a sequence (a stop string matched, or its client went away).
  void cancel(int64_t id) { seqs_.erase(id); }
  size_t live() const { return seqs_.size(); }

 private:
  struct Sequence {
    std::unique_ptr<KVCache> cache;
    std::vector<int32_t> tokens;  // prompt + generated
    int n_prompt = 0;
    int n_fed = 0;  // tokens already in the cache
    int max_new_tokens = 0;
    int logprobs = -1;
    uint64_t stream = 0;
    SamplingOptions options;
  };
  const GPT2Model& model_;
  std::map<int64_t, Sequence> seqs_;  // ordered by id, so the batch order is the arrival order
  int64_t next_id_ = 0;
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
