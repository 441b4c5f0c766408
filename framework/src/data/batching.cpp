// Tokenisation of rendered examples, truncation, padded and packed batch
// layouts, and the seeded per-epoch batch order.
#include "peftfw/data/batching.hpp"

#include <algorithm>
#include <sstream>
#include <stdexcept>

namespace peftfw::data {

std::optional<LossOn> loss_on_from_name(std::string_view name) {
  if (name == "all") return LossOn::All;
  if (name == "response") return LossOn::Response;
  return std::nullopt;
}

TokenizedExample tokenize_example(const RenderedExample& rendered, const EncodeFn& encode,
                                  const TokenizeOptions& options) {
  TokenizedExample out;
  if (options.loss_on == LossOn::All) {
    out.ids = encode(rendered.text());
    out.labels = out.ids;
  } else {
    for (const auto& segment : rendered.segments) {
      const auto ids = encode(segment.text);
      out.ids.insert(out.ids.end(), ids.begin(), ids.end());
      if (segment.response) {
        out.labels.insert(out.labels.end(), ids.begin(), ids.end());
      } else {
        out.labels.insert(out.labels.end(), ids.size(), kIgnoreIndex);
      }
    }
  }
  if (options.eos_id && (out.ids.empty() || out.ids.back() != *options.eos_id)) {
    out.ids.push_back(*options.eos_id);
    out.labels.push_back(*options.eos_id);
  }
  return out;
}

std::vector<TokenizedExample> tokenize_examples(const std::vector<Example>& examples,
                                                const PromptTemplate& prompt_template,
                                                const EncodeFn& encode,
                                                const TokenizeOptions& options) {
  std::vector<TokenizedExample> out;
  out.reserve(examples.size());
  for (const auto& ex : examples) {
    out.push_back(tokenize_example(prompt_template.render(ex), encode, options));
  }
  return out;
}

namespace {

// Whether any label after the first token is learned (the first is never
// predicted; see batching.hpp).
bool has_loss_token(const TokenizedExample& ex) {
  if (ex.labels.size() < 2) return false;
  return std::any_of(ex.labels.begin() + 1, ex.labels.end(),
                     [](int64_t l) { return l != kIgnoreIndex; });
}

const TokenizedExample& example_at(const std::vector<TokenizedExample>& examples, int64_t index) {
  if (index < 0 || index >= static_cast<int64_t>(examples.size())) {
    throw std::invalid_argument("batch: example index " + std::to_string(index) + " outside " +
                                std::to_string(examples.size()) + " examples");
  }
  const auto& ex = examples[static_cast<std::size_t>(index)];
  if (ex.ids.size() != ex.labels.size()) {
    throw std::invalid_argument("batch: example " + std::to_string(index) + " has " +
                                std::to_string(ex.ids.size()) + " ids but " +
                                std::to_string(ex.labels.size()) + " labels");
  }
  return ex;
}

// Copies one example into row `row` from column `col`, first label ignored.
void place(Batch& b, const TokenizedExample& ex, int64_t row, int64_t col) {
  const std::size_t base = static_cast<std::size_t>(row * b.cols + col);
  for (std::size_t i = 0; i < ex.ids.size(); ++i) {
    b.input_ids[base + i] = ex.ids[i];
    b.attention_mask[base + i] = 1;
    b.labels[base + i] = i == 0 ? kIgnoreIndex : ex.labels[i];
    if (b.labels[base + i] != kIgnoreIndex) ++b.loss_tokens;
  }
  b.tokens += static_cast<int64_t>(ex.ids.size());
}

void allocate(Batch& b, int64_t pad_id) {
  const auto n = static_cast<std::size_t>(b.rows * b.cols);
  b.input_ids.assign(n, pad_id);
  b.attention_mask.assign(n, 0);
  b.labels.assign(n, kIgnoreIndex);
}

}  // namespace

std::string TruncationReport::summary() const {
  std::ostringstream s;
  if (truncated > 0) {
    s << "truncated " << truncated << " of " << examples << " examples to max_length "
      << max_length << " tokens (" << dropped_tokens << " tokens dropped; longest example "
      << longest << " tokens)";
  }
  if (without_loss_tokens > 0) {
    if (truncated > 0) s << "; ";
    s << without_loss_tokens << " of " << examples << " examples have no token to learn"
      << (truncated > 0 ? " after truncation" : "")
      << " (they add nothing to the loss; is the prompt longer than max_length?)";
  }
  return s.str();
}

TruncationReport truncate_examples(std::vector<TokenizedExample>& examples, int64_t max_length) {
  if (max_length < 1) throw std::invalid_argument("truncate_examples: max_length must be >= 1");
  TruncationReport r;
  r.max_length = max_length;
  r.examples = static_cast<int64_t>(examples.size());
  for (auto& ex : examples) {
    const auto length = static_cast<int64_t>(ex.ids.size());
    r.longest = std::max(r.longest, length);
    if (length > max_length) {
      ++r.truncated;
      r.dropped_tokens += length - max_length;
      ex.ids.resize(static_cast<std::size_t>(max_length));
      ex.labels.resize(static_cast<std::size_t>(max_length));
    }
    if (!has_loss_token(ex)) ++r.without_loss_tokens;
  }
  return r;
}

Batch pad_batch(const std::vector<TokenizedExample>& examples, const std::vector<int64_t>& indices,
                int64_t pad_id) {
  if (indices.empty()) throw std::invalid_argument("pad_batch: no examples");
  Batch b;
  b.rows = static_cast<int64_t>(indices.size());
  for (int64_t i : indices) {
    b.cols = std::max(b.cols, static_cast<int64_t>(example_at(examples, i).ids.size()));
  }
  allocate(b, pad_id);
  for (int64_t r = 0; r < b.rows; ++r) {
    const int64_t index = indices[static_cast<std::size_t>(r)];
    place(b, examples[static_cast<std::size_t>(index)], r, 0);
    b.examples.push_back(index);
  }
  return b;
}

Batch pack_batch(const std::vector<TokenizedExample>& examples, const std::vector<int64_t>& indices,
                 int64_t max_length, int64_t pad_id) {
  if (indices.empty()) throw std::invalid_argument("pack_batch: no examples");
  // First-fit over rows of capacity max_length.
  std::vector<std::vector<int64_t>> rows;
  std::vector<int64_t> fill;
  for (int64_t i : indices) {
    const auto length = static_cast<int64_t>(example_at(examples, i).ids.size());
    if (length > max_length) {
      throw std::invalid_argument("pack_batch: example " + std::to_string(i) + " has " +
                                  std::to_string(length) + " tokens, more than max_length " +
                                  std::to_string(max_length) + " (truncate first)");
    }
    std::size_t r = 0;
    while (r < rows.size() && fill[r] + length > max_length) ++r;
    if (r == rows.size()) {
      rows.emplace_back();
      fill.push_back(0);
    }
    rows[r].push_back(i);
    fill[r] += length;
  }
  Batch b;
  b.rows = static_cast<int64_t>(rows.size());
  b.cols = *std::max_element(fill.begin(), fill.end());
  allocate(b, pad_id);
  b.seq_ids.assign(b.input_ids.size(), 0);
  for (int64_t r = 0; r < b.rows; ++r) {
    const auto& row = rows[static_cast<std::size_t>(r)];
    int64_t col = 0;
    for (std::size_t k = 0; k < row.size(); ++k) {
      const auto& ex = examples[static_cast<std::size_t>(row[k])];
      place(b, ex, r, col);
      std::fill_n(b.seq_ids.begin() + r * b.cols + col, ex.ids.size(), static_cast<int64_t>(k));
      col += static_cast<int64_t>(ex.ids.size());
      b.examples.push_back(row[k]);
    }
    // The row's padding is a sequence of its own.
    std::fill(b.seq_ids.begin() + r * b.cols + col, b.seq_ids.begin() + (r + 1) * b.cols,
              static_cast<int64_t>(row.size()));
  }
  return b;
}

std::string to_string(const DataPosition& position) {
  return "epoch " + std::to_string(position.epoch) + ", batch " +
         std::to_string(position.batch_index);
}

BatchStream::BatchStream(std::vector<TokenizedExample> examples, BatchOptions options)
    : examples_(std::move(examples)), options_(options) {
  if (options_.batch_size < 1) throw std::invalid_argument("BatchStream: batch_size must be >= 1");
  if (options_.max_length < 1) throw std::invalid_argument("BatchStream: max_length must be >= 1");
  truncation_ = truncate_examples(examples_, options_.max_length);
  if (batches_per_epoch() == 0) {
    throw std::invalid_argument("BatchStream: " + std::to_string(examples_.size()) +
                                " examples make no batch of " +
                                std::to_string(options_.batch_size) +
                                (options_.drop_last ? " (drop_last)" : ""));
  }
}

int64_t BatchStream::batches_per_epoch() const {
  const int64_t n = size();
  const int64_t bs = options_.batch_size;
  return options_.drop_last ? n / bs : (n + bs - 1) / bs;
}

std::vector<int64_t> BatchStream::epoch_order(int64_t epoch) const {
  if (epoch < 0) throw std::out_of_range("BatchStream: negative epoch");
  if (options_.shuffle) {
    return seeded_permutation(size(), derive_seed(options_.seed, static_cast<uint64_t>(epoch)));
  }
  std::vector<int64_t> order(examples_.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  return order;
}

std::vector<int64_t> BatchStream::batch_examples(const DataPosition& position) const {
  if (position.batch_index < 0 || position.batch_index >= batches_per_epoch()) {
    throw std::out_of_range("BatchStream: no batch at " + to_string(position) + " (" +
                            std::to_string(batches_per_epoch()) + " batches per epoch)");
  }
  const auto order = epoch_order(position.epoch);
  const int64_t begin = position.batch_index * options_.batch_size;
  const int64_t end = std::min(begin + options_.batch_size, size());
  return std::vector<int64_t>(order.begin() + begin, order.begin() + end);
}

Batch BatchStream::batch(const DataPosition& position) const {
  const auto indices = batch_examples(position);
  if (options_.layout == BatchLayout::Packed) {
    return pack_batch(examples_, indices, options_.max_length, options_.pad_id);
  }
  return pad_batch(examples_, indices, options_.pad_id);
}

DataPosition BatchStream::next(const DataPosition& position) const {
  if (position.batch_index + 1 < batches_per_epoch()) {
    return {position.epoch, position.batch_index + 1};
  }
  return {position.epoch + 1, 0};
}

}  // namespace peftfw::data
