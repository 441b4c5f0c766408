// Batched generation: left-padded prefill, one-token decode steps, greedy or
// temperature + top-p sampling, stop ids and stop strings per row.
#include "peftfw/eval/generate.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/utils.h>

#include <algorithm>
#include <limits>
#include <sstream>

#include "peftfw/data/tokenizer.hpp"
#include "peftfw/error.hpp"
#include "peftfw/model/causal_lm.hpp"

namespace peftfw::eval {

namespace {

// Fed at left padding and for finished rows. Those positions are masked (pads)
// or their logits are ignored (finished rows), so any valid id would do; 0 is
// in every vocabulary.
constexpr int64_t kPadId = 0;

void check_options(const std::vector<std::vector<int64_t>>& prompts,
                   const GenerateOptions& options, const DecodeFn& decode) {
  std::ostringstream errors;
  for (size_t i = 0; i < prompts.size(); ++i)
    if (prompts[i].empty())
      errors << "\n  prompt " << i << " is empty: generation needs at least one prompt token";
  if (options.max_new_tokens < 0)
    errors << "\n  max_new_tokens is " << options.max_new_tokens << "; expected >= 0";
  if (!(options.temperature >= 0.0))
    errors << "\n  temperature is " << options.temperature << "; expected >= 0 (0 = greedy)";
  if (!(options.top_p > 0.0 && options.top_p <= 1.0))
    errors << "\n  top_p is " << options.top_p << "; expected a value in (0, 1] (1 = off)";
  for (size_t i = 0; i < options.stop_strings.size(); ++i)
    if (options.stop_strings[i].empty())
      errors << "\n  stop_strings[" << i << "] is empty; it would stop every row at once";
  if (!options.stop_strings.empty() && !decode)
    errors << "\n  stop_strings are set but no decode function was given to generate_ids";
  const std::string text = errors.str();
  if (!text.empty()) throw InputError("generate: invalid request:" + text);
}

torch::Device model_device(CausalLM& model) {
  for (const auto& p : model.parameters()) return p.device();
  for (const auto& b : model.buffers()) return b.device();
  return torch::Device(torch::kCPU);
}

// TopPLogitsWarper: sort ascending, drop the low tail whose cumulative
// probability is <= 1 - top_p, always keep the most likely token.
torch::Tensor top_p_filter(const torch::Tensor& scores, double top_p) {
  auto sorted = scores.sort(-1, /*descending=*/false);
  const auto& sorted_scores = std::get<0>(sorted);
  const auto& sorted_ids = std::get<1>(sorted);
  auto cumulative = sorted_scores.softmax(-1).cumsum(-1);
  auto remove_sorted = cumulative.le(1.0 - top_p);
  remove_sorted.narrow(-1, scores.size(-1) - 1, 1).fill_(false);
  auto remove = remove_sorted.scatter(1, sorted_ids, remove_sorted);
  return scores.masked_fill(remove, -std::numeric_limits<float>::infinity());
}

// Next token of each row from the last position's logits [B,V]; a CPU int64 [B].
torch::Tensor next_tokens(const torch::Tensor& logits, const GenerateOptions& options,
                          at::Generator& generator) {
  auto scores = logits.to(torch::kFloat32);
  if (options.temperature == 0.0) return scores.argmax(-1).to(torch::kCPU);
  scores = scores.to(torch::kCPU) / options.temperature;
  if (options.top_p < 1.0) scores = top_p_filter(scores, options.top_p);
  auto probs = scores.softmax(-1);
  return at::multinomial(probs, 1, /*replacement=*/false, generator).squeeze(1);
}

}  // namespace

std::optional<size_t> find_stop_string(std::string_view text,
                                       const std::vector<std::string>& stop_strings) {
  std::optional<size_t> best;
  for (const auto& stop : stop_strings) {
    if (stop.empty()) continue;
    const size_t at = text.find(stop);
    if (at != std::string_view::npos && (!best || at < *best)) best = at;
  }
  return best;
}

std::vector<std::vector<int64_t>> generate_ids(CausalLM& model,
                                               const std::vector<std::vector<int64_t>>& prompts,
                                               const GenerateOptions& options,
                                               const DecodeFn& decode) {
  check_options(prompts, options, decode);
  const auto B = static_cast<int64_t>(prompts.size());
  std::vector<std::vector<int64_t>> outputs(prompts.size());
  if (B == 0 || options.max_new_tokens == 0) return outputs;

  torch::NoGradGuard no_grad;
  model.eval();
  const torch::Device device = model_device(model);

  // Left padding: every row's last prompt token sits at the last position, so
  // one column of logits gives the first new token of all rows.
  size_t longest = 0;
  for (const auto& p : prompts) longest = std::max(longest, p.size());
  const auto T = static_cast<int64_t>(longest);
  auto ids = torch::full({B, T}, kPadId, torch::kLong);
  auto mask = torch::zeros({B, T}, torch::kLong);
  for (int64_t b = 0; b < B; ++b) {
    const auto& p = prompts[static_cast<size_t>(b)];
    const auto n = static_cast<int64_t>(p.size());
    ids[b].narrow(0, T - n, n).copy_(torch::tensor(p, torch::kLong));
    mask[b].narrow(0, T - n, n).fill_(1);
  }

  auto cache = model.make_cache(B);
  ModelBatch batch;
  batch.input_ids = ids.to(device);
  batch.attention_mask = mask.to(device);
  auto logits = model.forward(batch, cache.get()).logits.select(1, T - 1);

  at::Generator generator = at::detail::createCPUGenerator(options.seed);
  std::vector<bool> finished(prompts.size(), false);
  int64_t running = B;
  for (int64_t step = 0; step < options.max_new_tokens; ++step) {
    const auto chosen = next_tokens(logits, options, generator);
    const auto* chosen_ptr = chosen.data_ptr<int64_t>();
    std::vector<int64_t> feed(prompts.size(), kPadId);
    for (size_t b = 0; b < prompts.size(); ++b) {
      if (finished[b]) continue;
      const int64_t token = chosen_ptr[b];
      const bool stop_id = std::find(options.stop_ids.begin(), options.stop_ids.end(), token) !=
                           options.stop_ids.end();
      if (!stop_id) {
        outputs[b].push_back(token);
        feed[b] = token;
      }
      // The whole new text is decoded each step: a token's text can depend on
      // its neighbours (byte-level pieces of one UTF-8 character).
      const bool stop_string = !stop_id && !options.stop_strings.empty() &&
                               find_stop_string(decode(outputs[b]), options.stop_strings);
      if (stop_id || stop_string) {
        finished[b] = true;
        --running;
      }
    }
    if (running == 0 || step + 1 == options.max_new_tokens) break;
    ModelBatch next;
    next.input_ids = torch::tensor(feed, torch::kLong).view({B, 1}).to(device);
    next.attention_mask = torch::ones({B, 1}, torch::kLong).to(device);
    logits = model.forward(next, cache.get()).logits.select(1, 0);
  }
  return outputs;
}

std::vector<std::string> generate_text(CausalLM& model, const data::Tokenizer& tokenizer,
                                       const std::vector<std::string>& prompts,
                                       GenerateOptions options) {
  if (const auto eos = tokenizer.eos_id();
      eos && std::find(options.stop_ids.begin(), options.stop_ids.end(), *eos) ==
                 options.stop_ids.end())
    options.stop_ids.push_back(*eos);
  std::vector<std::vector<int64_t>> prompt_ids;
  prompt_ids.reserve(prompts.size());
  for (const auto& prompt : prompts)
    prompt_ids.push_back(tokenizer.add_template_tokens(tokenizer.encode(prompt)));
  const DecodeFn decode = [&tokenizer](const std::vector<int64_t>& ids) {
    return tokenizer.decode(ids, /*skip_special=*/true);
  };
  const auto generated = generate_ids(model, prompt_ids, options, decode);
  std::vector<std::string> texts;
  texts.reserve(generated.size());
  for (const auto& ids : generated) {
    std::string text = decode(ids);
    if (const auto at = find_stop_string(text, options.stop_strings)) text.resize(*at);
    texts.push_back(std::move(text));
  }
  return texts;
}

}  // namespace peftfw::eval
