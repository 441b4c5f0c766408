// Tokenised examples and the batches the trainer feeds the model.
//
// Torch-free: a Batch is row-major std::vector<int64_t> buffers plus its
// shape; the trainer wraps them into the ModelBatch tensors (input_ids,
// attention_mask, seq_ids, labels; see peftfw/model/causal_lm.hpp).
//
// Two layouts of the same examples:
//   padded  one example per row, right-padded with pad_id to the longest
//           example of the batch; attention_mask 1/0; labels -100 on pads;
//           no seq_ids (one sequence per row).
//   packed  whole examples placed greedily first-fit, in batch order, into
//           rows of at most max_length tokens; seq_ids number the examples of
//           a row 0, 1, 2, ..., and the row's padding gets the next id;
//           attention_mask 1 on tokens, 0 on padding; labels -100 on padding.
//           Rows are as long as the fullest row (never longer than max_length).
// In both layouts the first token of every example has label -100. The loss
// shifts labels left (position t predicts label t+1), so no position of the
// example predicts its first token: padded, the shift drops it; packed, it
// would be predicted from the previous example's last token, across the
// boundary that seq_ids close. With that rule the two layouts hold exactly
// the same label tokens, and the same loss.
//
// Batch order: each epoch is a seeded permutation of the examples
// (seeded_permutation(n, derive_seed(seed, epoch)), see dataset.hpp), cut into
// consecutive batches of batch_size examples. A DataPosition {epoch,
// batch_index} names one batch; BatchStream::batch(position) is a pure
// function of it, so a resumed run continues at exactly the batch it stopped
// before.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "peftfw/data/dataset.hpp"

namespace peftfw::data {

// transformers' ignore index.
inline constexpr int64_t kIgnoreIndex = -100;

enum class LossOn { All, Response };
// "all", "response" (the recipe's data.loss_on).
std::optional<LossOn> loss_on_from_name(std::string_view name);

struct TokenizedExample {
  std::vector<int64_t> ids;
  std::vector<int64_t> labels;  // ids.size() entries; kIgnoreIndex where nothing is learned
};

// Text -> token ids, with special tokens (the role tokens) recognised.
using EncodeFn = std::function<std::vector<int64_t>(std::string_view)>;

// An EncodeFn for a peftfw::data::Tokenizer (tokenizer.hpp), or anything with
// the same encode(text, allow_special). The tokenizer must outlive the result.
template <typename TokenizerLike>
EncodeFn encoder_of(const TokenizerLike& tokenizer) {
  return [&tokenizer](std::string_view text) { return tokenizer.encode(text, true); };
}

struct TokenizeOptions {
  LossOn loss_on = LossOn::All;
  // Appended unless the ids already end with it, as TRL's SFTTrainer does
  // ("Adding EOS to train dataset"); it belongs to the response. nullopt
  // appends nothing.
  std::optional<int64_t> eos_id;
};

// loss_on = all: the whole text is encoded in one call (exactly the study's
// tokenisation of its text field) and every token is a label.
// loss_on = response: each segment is encoded on its own, so that the mask
// boundary is a token boundary, and prompt tokens get kIgnoreIndex. For the
// built-in templates the segment boundaries are special tokens or newlines,
// where a BPE pre-tokenizer splits anyway; a custom template that puts
// {output} right after a letter or colon may tokenise differently at that
// boundary than the joint text would.
TokenizedExample tokenize_example(const RenderedExample& rendered, const EncodeFn& encode,
                                  const TokenizeOptions& options);

// template.render + tokenize_example for each example.
std::vector<TokenizedExample> tokenize_examples(const std::vector<Example>& examples,
                                                const PromptTemplate& prompt_template,
                                                const EncodeFn& encode,
                                                const TokenizeOptions& options);

// What truncation to max_length did; the trainer prints summary().
struct TruncationReport {
  int64_t max_length = 0;
  int64_t examples = 0;
  int64_t truncated = 0;       // examples longer than max_length
  int64_t dropped_tokens = 0;  // tokens cut off in total
  int64_t longest = 0;         // longest example before truncation
  // Examples left with no label to learn (after truncation; the first token
  // never counts), e.g. loss_on = response with a prompt longer than max_length.
  int64_t without_loss_tokens = 0;

  // "" when nothing was truncated and every example has a label, else e.g.
  // "truncated 2 of 10 examples to max_length 8 tokens (5 tokens dropped;
  // longest example 11 tokens)".
  std::string summary() const;
};

// Cuts every example to its first max_length tokens (max_length >= 1).
TruncationReport truncate_examples(std::vector<TokenizedExample>& examples, int64_t max_length);

enum class BatchLayout { Padded, Packed };

struct Batch {
  int64_t rows = 0;
  int64_t cols = 0;
  // Row-major [rows, cols].
  std::vector<int64_t> input_ids;
  std::vector<int64_t> attention_mask;
  std::vector<int64_t> labels;
  std::vector<int64_t> seq_ids;  // packed only; empty for padded
  // The example indices in layout order (row by row, left to right).
  std::vector<int64_t> examples;
  int64_t tokens = 0;       // real (non-padding) tokens
  int64_t loss_tokens = 0;  // labels != kIgnoreIndex

  std::vector<int64_t> shape() const { return {rows, cols}; }
};

// `examples[indices[i]]` become row i. Throws std::invalid_argument for an
// index out of range or an empty index list.
Batch pad_batch(const std::vector<TokenizedExample>& examples, const std::vector<int64_t>& indices,
                int64_t pad_id);
// First-fit: each example, in `indices` order, goes into the first row with
// room for all of it, else into a new row. Throws std::invalid_argument for
// an example longer than max_length (truncate first), an index out of range
// or an empty index list.
Batch pack_batch(const std::vector<TokenizedExample>& examples, const std::vector<int64_t>& indices,
                 int64_t max_length, int64_t pad_id);

// Where a run is in its data: the next batch to train on.
struct DataPosition {
  int64_t epoch = 0;
  int64_t batch_index = 0;

  bool operator==(const DataPosition& o) const {
    return epoch == o.epoch && batch_index == o.batch_index;
  }
  bool operator!=(const DataPosition& o) const { return !(*this == o); }
};
std::string to_string(const DataPosition& position);  // "epoch 1, batch 7"

struct BatchOptions {
  int64_t batch_size = 1;  // examples per batch
  int64_t max_length = 1280;
  BatchLayout layout = BatchLayout::Padded;
  int64_t pad_id = 0;
  bool shuffle = true;     // false: file order every epoch (evaluation)
  uint64_t seed = 0;       // of the per-epoch order
  bool drop_last = false;  // drop the last batch when it is short
};

// The examples of one split, truncated once at construction, served as
// batches by position.
class BatchStream {
 public:
  // Throws std::invalid_argument for batch_size or max_length < 1, or when
  // there is no batch at all (no examples; drop_last with fewer examples than
  // batch_size).
  BatchStream(std::vector<TokenizedExample> examples, BatchOptions options);

  const BatchOptions& options() const { return options_; }
  const TruncationReport& truncation() const { return truncation_; }
  const std::vector<TokenizedExample>& examples() const { return examples_; }
  int64_t size() const { return static_cast<int64_t>(examples_.size()); }
  int64_t batches_per_epoch() const;

  // The order of the examples in `epoch` (epoch >= 0).
  std::vector<int64_t> epoch_order(int64_t epoch) const;
  // The example indices of the batch at `position` (std::out_of_range when
  // batch_index >= batches_per_epoch or either field is negative).
  std::vector<int64_t> batch_examples(const DataPosition& position) const;
  Batch batch(const DataPosition& position) const;
  // The position after `position`: the next batch, or batch 0 of the next epoch.
  DataPosition next(const DataPosition& position) const;

 private:
  std::vector<TokenizedExample> examples_;
  BatchOptions options_;
  TruncationReport truncation_;
};

}  // namespace peftfw::data
