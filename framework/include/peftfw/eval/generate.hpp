// Text generation on top of a model's GenerationCache: batched prompts are
// left-padded and prefilled in one forward, then every row advances one token
// per step until it stops or max_new_tokens is reached.
//
// Decoding follows transformers' GenerationMixin (tests/oracles/
// generate_oracle.py checks greedy ids against model.generate): greedy is
// torch.argmax (ties go to the lowest id); sampling divides the logits by the
// temperature, then keeps the nucleus as TopPLogitsWarper does (the smallest
// set of tokens whose probability sums to at least top_p, never fewer than
// one) and draws with torch.multinomial. Sampling always runs on a CPU
// generator seeded with `seed`, so a seed gives the same draws whatever the
// model's device.
//
// Unlike transformers, a stop id is not part of the output, and a finished
// row's output is frozen (transformers appends pad ids after the eos).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace peftfw {
class CausalLM;
namespace data {
class Tokenizer;
}
}  // namespace peftfw

namespace peftfw::eval {

struct GenerateOptions {
  int64_t max_new_tokens = 256;
  double temperature = 0.0;  // 0 = greedy
  double top_p = 1.0;        // nucleus sampling; 1 = off. Only used when temperature > 0
  uint64_t seed = 0;         // sampling generator seed
  std::vector<int64_t> stop_ids;         // e.g. eos; the stop token is left out of the output
  std::vector<std::string> stop_strings;  // checked on the decoded text of the new tokens
};

using DecodeFn = std::function<std::string(const std::vector<int64_t>&)>;

// The new tokens of each prompt (prompts are token ids, each non-empty).
// A row ends at a stop id (not included), when the decoded text of its new
// tokens contains a stop string (the ids end with the token that completed
// it; cut the text with find_stop_string), or after max_new_tokens.
// stop_strings need `decode`. Runs in eval mode without gradients, on the
// device of the model's parameters. InputError for an empty prompt, a
// negative max_new_tokens or temperature, a top_p outside (0, 1], an empty
// stop string, or stop strings without `decode`.
std::vector<std::vector<int64_t>> generate_ids(CausalLM& model,
                                               const std::vector<std::vector<int64_t>>& prompts,
                                               const GenerateOptions& options,
                                               const DecodeFn& decode = nullptr);

// Encodes the prompts (tokenizer.encode with special tokens allowed, then
// add_template_tokens), generates with the tokenizer's eos added to the stop
// ids, decodes the new tokens with skip_special and cuts each text before the
// first stop string it contains.
std::vector<std::string> generate_text(CausalLM& model, const data::Tokenizer& tokenizer,
                                       const std::vector<std::string>& prompts,
                                       GenerateOptions options);

// Position of the earliest occurrence of any stop string in `text` (the
// earliest start; empty stop strings never match), or nullopt.
std::optional<size_t> find_stop_string(std::string_view text,
                                       const std::vector<std::string>& stop_strings);

}  // namespace peftfw::eval
