// Tests for peftfw/data/batching: tokenisation with prompt masking and EOS,
// truncation reports, padded and packed layouts on hand-made examples (every
// buffer written out by hand), and the seeded, resumable batch order.
#include "peftfw/data/batching.hpp"

#include <algorithm>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace peftfw::data {
namespace {

// Granite 4.0's chat format, as the granite_hybrid plugin supplies it.
const ChatFormat kGraniteChat{"granite", "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>\n",
                              "Granite 4.0 role tokens"};
PromptTemplate granite_template(std::string system = kDefaultSystemPrompt) {
  return PromptTemplate::chat(kGraniteChat, std::move(system));
}

constexpr int64_t X = kIgnoreIndex;
constexpr int64_t kEot = 100257;  // Granite's <|end_of_text|> id

// A stand-in with the Tokenizer interface's encode(): one token per byte,
// "<|end_of_text|>" as one special token, and "ab" merged into token 500 (a
// merge that crosses a segment boundary when the text is split there).
class FakeTokenizer {
 public:
  std::vector<int64_t> encode(std::string_view text, bool allow_special = true) const {
    std::vector<int64_t> ids;
    const std::string_view eot = "<|end_of_text|>";
    for (std::size_t i = 0; i < text.size();) {
      if (allow_special && text.substr(i, eot.size()) == eot) {
        ids.push_back(kEot);
        i += eot.size();
      } else if (text.substr(i, 2) == "ab") {
        ids.push_back(500);
        i += 2;
      } else {
        ids.push_back(static_cast<unsigned char>(text[i]));
        ++i;
      }
    }
    return ids;
  }
};

RenderedExample two_part(const std::string& prompt, const std::string& response) {
  RenderedExample r;
  r.segments.push_back({prompt, false});
  r.segments.push_back({response, true});
  return r;
}

TokenizedExample ex(std::vector<int64_t> ids, std::vector<int64_t> labels) {
  return {std::move(ids), std::move(labels)};
}

// ---------------------------------------------------------------------------
// Tokenisation.

TEST(Tokenize, AllTrainsEveryTokenAndAppendsEos) {
  const FakeTokenizer tok;
  const auto t = tokenize_example(two_part("xy", "z"), encoder_of(tok), {LossOn::All, 7});
  EXPECT_EQ(t.ids, (std::vector<int64_t>{'x', 'y', 'z', 7}));
  EXPECT_EQ(t.labels, (std::vector<int64_t>{'x', 'y', 'z', 7}));
}

TEST(Tokenize, ResponseMasksThePrompt) {
  const FakeTokenizer tok;
  const auto t = tokenize_example(two_part("xy", "z"), encoder_of(tok), {LossOn::Response, 7});
  EXPECT_EQ(t.ids, (std::vector<int64_t>{'x', 'y', 'z', 7}));
  EXPECT_EQ(t.labels, (std::vector<int64_t>{X, X, 'z', 7}));
}

TEST(Tokenize, AllEncodesTheJointTextResponseEncodesSegments) {
  const FakeTokenizer tok;
  // "a" + "b": jointly one token (500); split at the mask boundary, two.
  const auto all = tokenize_example(two_part("a", "b"), encoder_of(tok), {LossOn::All, {}});
  EXPECT_EQ(all.ids, (std::vector<int64_t>{500}));
  const auto resp =
      tokenize_example(two_part("a", "b"), encoder_of(tok), {LossOn::Response, {}});
  EXPECT_EQ(resp.ids, (std::vector<int64_t>{'a', 'b'}));
  EXPECT_EQ(resp.labels, (std::vector<int64_t>{X, 'b'}));
}

TEST(Tokenize, EosIsNotDoubledAndCanBeOff) {
  const FakeTokenizer tok;
  const auto ends_with_eos =
      tokenize_example(two_part("q", "r<|end_of_text|>"), encoder_of(tok), {LossOn::All, kEot});
  EXPECT_EQ(ends_with_eos.ids, (std::vector<int64_t>{'q', 'r', kEot}));
  const auto no_eos = tokenize_example(two_part("q", "r"), encoder_of(tok), {LossOn::All, {}});
  EXPECT_EQ(no_eos.ids, (std::vector<int64_t>{'q', 'r'}));
}

TEST(Tokenize, GraniteTrainingTextEndsLikeTrl) {
  // The study's text ends "<|end_of_text|>\n"; TRL then appends EOS.
  const FakeTokenizer tok;
  const std::vector<Example> examples = {Example{InstructionExample{"I", "", "O"}, 1}};
  const auto t = tokenize_examples(examples, granite_template(""), encoder_of(tok),
                                   {LossOn::Response, kEot});
  ASSERT_EQ(t.size(), 1u);
  // <|start_of_role|>user<|end_of_role|>I<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>
  // is 17+4+15+1 byte tokens, the special token, then 1+17+9+15: 80 prompt tokens.
  const auto& ids = t[0].ids;
  ASSERT_EQ(ids.size(), 80u + 4u);
  EXPECT_EQ(std::vector<int64_t>(ids.end() - 4, ids.end()),
            (std::vector<int64_t>{'O', kEot, '\n', kEot}));
  EXPECT_EQ(std::count(t[0].labels.begin(), t[0].labels.end(), X), 80);
  EXPECT_EQ(std::vector<int64_t>(t[0].labels.end() - 4, t[0].labels.end()),
            (std::vector<int64_t>{'O', kEot, '\n', kEot}));
}

TEST(Tokenize, LossOnNames) {
  EXPECT_EQ(loss_on_from_name("all"), LossOn::All);
  EXPECT_EQ(loss_on_from_name("response"), LossOn::Response);
  EXPECT_EQ(loss_on_from_name("prompt"), std::nullopt);
}

// ---------------------------------------------------------------------------
// Truncation.

TEST(Truncation, CountsExamplesAndTokens) {
  std::vector<TokenizedExample> examples = {
      ex({1, 2, 3}, {1, 2, 3}),
      ex({1, 2, 3, 4, 5, 6, 7, 8}, {X, X, X, X, X, X, 7, 8}),  // loses its only labels
      ex({1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}),
      ex({5, 6}, {5, 6}),
  };
  const auto r = truncate_examples(examples, 5);
  EXPECT_EQ(r.max_length, 5);
  EXPECT_EQ(r.examples, 4);
  EXPECT_EQ(r.truncated, 2);
  EXPECT_EQ(r.dropped_tokens, 3 + 5);
  EXPECT_EQ(r.longest, 10);
  EXPECT_EQ(r.without_loss_tokens, 1);
  EXPECT_EQ(examples[2].ids, (std::vector<int64_t>{1, 2, 3, 4, 5}));
  EXPECT_EQ(examples[1].labels, (std::vector<int64_t>{X, X, X, X, X}));
  EXPECT_EQ(examples[0].ids.size(), 3u);
  EXPECT_EQ(r.summary(),
            "truncated 2 of 4 examples to max_length 5 tokens (8 tokens dropped; longest example "
            "10 tokens); 1 of 4 examples have no token to learn after truncation (they add "
            "nothing to the loss; is the prompt longer than max_length?)");
}

TEST(Truncation, NothingToReport) {
  std::vector<TokenizedExample> examples = {ex({1, 2}, {1, 2})};
  const auto r = truncate_examples(examples, 2);
  EXPECT_EQ(r.truncated, 0);
  EXPECT_EQ(r.summary(), "");
}

// ---------------------------------------------------------------------------
// Layouts.

const std::vector<TokenizedExample> kExamples = {
    ex({11, 12, 13}, {11, 12, 13}),
    ex({21, 22}, {X, 22}),
    ex({31, 32, 33, 34, 35}, {X, X, 33, 34, 35}),
    ex({41}, {41}),
};

TEST(Padded, RightPaddedWithMaskAndIgnoredLabels) {
  const Batch b = pad_batch(kExamples, {0, 1, 2}, 0);
  EXPECT_EQ(b.shape(), (std::vector<int64_t>{3, 5}));
  EXPECT_EQ(b.input_ids, (std::vector<int64_t>{11, 12, 13, 0, 0,  //
                                               21, 22, 0, 0, 0,    //
                                               31, 32, 33, 34, 35}));
  EXPECT_EQ(b.attention_mask, (std::vector<int64_t>{1, 1, 1, 0, 0,  //
                                                    1, 1, 0, 0, 0,  //
                                                    1, 1, 1, 1, 1}));
  EXPECT_EQ(b.labels, (std::vector<int64_t>{X, 12, 13, X, X,  //
                                            X, 22, X, X, X,    //
                                            X, X, 33, 34, 35}));
  EXPECT_TRUE(b.seq_ids.empty());
  EXPECT_EQ(b.examples, (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(b.tokens, 10);
  EXPECT_EQ(b.loss_tokens, 6);
}

TEST(Packed, WholeExamplesInRowsWithSequenceIds) {
  const Batch b = pack_batch(kExamples, {0, 1, 2}, 6, 0);
  // 3 + 2 fit in row 0; 5 more would not (10 > 6), so row 1.
  EXPECT_EQ(b.shape(), (std::vector<int64_t>{2, 5}));
  EXPECT_EQ(b.input_ids, (std::vector<int64_t>{11, 12, 13, 21, 22,  //
                                               31, 32, 33, 34, 35}));
  EXPECT_EQ(b.attention_mask, std::vector<int64_t>(10, 1));
  EXPECT_EQ(b.seq_ids, (std::vector<int64_t>{0, 0, 0, 1, 1,  //
                                             0, 0, 0, 0, 0}));
  EXPECT_EQ(b.labels, (std::vector<int64_t>{X, 12, 13, X, 22,  //
                                            X, X, 33, 34, 35}));
  EXPECT_EQ(b.examples, (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(b.tokens, 10);
  EXPECT_EQ(b.loss_tokens, 6);
}

TEST(Packed, FirstFitFillsEarlierRowsAndPadsWithTheirOwnId) {
  const Batch b = pack_batch(kExamples, {2, 0, 1, 3}, 7, 9);
  // 2 (5) -> row 0; 0 (3) does not fit row 0 (8 > 7) -> row 1; 1 (2) fits row 0
  // (7); 3 (1) no longer fits row 0 -> row 1.
  EXPECT_EQ(b.shape(), (std::vector<int64_t>{2, 7}));
  EXPECT_EQ(b.input_ids, (std::vector<int64_t>{31, 32, 33, 34, 35, 21, 22,  //
                                               11, 12, 13, 41, 9, 9, 9}));
  EXPECT_EQ(b.attention_mask, (std::vector<int64_t>{1, 1, 1, 1, 1, 1, 1,  //
                                                    1, 1, 1, 1, 0, 0, 0}));
  EXPECT_EQ(b.seq_ids, (std::vector<int64_t>{0, 0, 0, 0, 0, 1, 1,  //
                                             0, 0, 0, 1, 2, 2, 2}));
  EXPECT_EQ(b.labels, (std::vector<int64_t>{X, X, 33, 34, 35, X, 22,  //
                                            X, 12, 13, X, X, X, X}));
  EXPECT_EQ(b.examples, (std::vector<int64_t>{2, 1, 0, 3}));
  EXPECT_EQ(b.tokens, 11);
  EXPECT_EQ(b.loss_tokens, 6);
}

std::multiset<int64_t> loss_labels(const Batch& b) {
  std::multiset<int64_t> out;
  for (int64_t l : b.labels) {
    if (l != X) out.insert(l);
  }
  return out;
}

TEST(Packed, SameLabelTokensAsPadded) {
  const std::vector<int64_t> order = {2, 0, 1, 3};
  const Batch padded = pad_batch(kExamples, order, 0);
  const Batch packed = pack_batch(kExamples, order, 7, 0);
  EXPECT_EQ(loss_labels(padded), (std::multiset<int64_t>{12, 13, 22, 33, 34, 35}));
  EXPECT_EQ(loss_labels(packed), loss_labels(padded));
  EXPECT_EQ(packed.loss_tokens, padded.loss_tokens);
  EXPECT_EQ(packed.tokens, padded.tokens);

  // And on a larger set: per example, the label following each position is
  // the same in both layouts (what the shifted loss sees).
  std::vector<TokenizedExample> many;
  SplitMix64 rng(3);
  for (int i = 0; i < 40; ++i) {
    TokenizedExample e;
    const int64_t len = rng.between(1, 12);
    for (int64_t t = 0; t < len; ++t) {
      const int64_t id = 1000 * i + t;
      e.ids.push_back(id);
      e.labels.push_back(rng.chance(1, 3) ? X : id);
    }
    many.push_back(e);
  }
  std::vector<int64_t> all(40);
  for (int i = 0; i < 40; ++i) all[static_cast<std::size_t>(i)] = i;
  const Batch p = pad_batch(many, all, 0);
  const Batch q = pack_batch(many, all, 16, 0);
  EXPECT_LT(q.rows, p.rows);
  EXPECT_EQ(loss_labels(q), loss_labels(p));
  auto shifted_pairs = [](const Batch& b) {
    std::multiset<std::pair<int64_t, int64_t>> out;  // (input id, next label)
    for (int64_t r = 0; r < b.rows; ++r) {
      for (int64_t c = 0; c + 1 < b.cols; ++c) {
        const auto at = static_cast<std::size_t>(r * b.cols + c);
        if (b.labels[at + 1] != X) out.insert({b.input_ids[at], b.labels[at + 1]});
      }
    }
    return out;
  };
  EXPECT_EQ(shifted_pairs(q), shifted_pairs(p));
}

TEST(Layouts, RejectBadInput) {
  EXPECT_THROW(pack_batch(kExamples, {2}, 4, 0), std::invalid_argument);  // 5 tokens > 4
  EXPECT_THROW(pad_batch(kExamples, {4}, 0), std::invalid_argument);
  EXPECT_THROW(pad_batch(kExamples, {}, 0), std::invalid_argument);
  EXPECT_THROW(pad_batch({ex({1, 2}, {1})}, {0}, 0), std::invalid_argument);
}

// ---------------------------------------------------------------------------
// Batch order and resume.

std::vector<TokenizedExample> singletons(int n) {
  std::vector<TokenizedExample> out;
  for (int i = 0; i < n; ++i) out.push_back(ex({100 + i}, {100 + i}));
  return out;
}

TEST(BatchStream, EpochOrderIsTheDerivedSeedPermutation) {
  BatchOptions o;
  o.batch_size = 2;
  o.max_length = 8;
  o.seed = 42;
  const BatchStream s(singletons(5), o);
  EXPECT_EQ(s.batches_per_epoch(), 3);
  // Python oracle: permutation of 5 under derive_seed(42, epoch).
  EXPECT_EQ(s.epoch_order(0), (std::vector<int64_t>{0, 3, 1, 2, 4}));
  EXPECT_EQ(s.epoch_order(1), (std::vector<int64_t>{3, 0, 4, 1, 2}));
  EXPECT_EQ(s.batch_examples({0, 0}), (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(s.batch_examples({0, 2}), (std::vector<int64_t>{4}));
  EXPECT_EQ(s.batch_examples({1, 1}), (std::vector<int64_t>{4, 1}));
  const Batch b = s.batch({1, 0});
  EXPECT_EQ(b.input_ids, (std::vector<int64_t>{103, 100}));
  EXPECT_EQ(b.shape(), (std::vector<int64_t>{2, 1}));
}

TEST(BatchStream, NextAndBounds) {
  BatchOptions o;
  o.batch_size = 4;
  const BatchStream s(singletons(10), o);
  EXPECT_EQ(s.batches_per_epoch(), 3);
  EXPECT_EQ(s.next({0, 0}), (DataPosition{0, 1}));
  EXPECT_EQ(s.next({0, 2}), (DataPosition{1, 0}));
  EXPECT_THROW(s.batch_examples({0, 3}), std::out_of_range);
  EXPECT_THROW(s.batch_examples({-1, 0}), std::out_of_range);
  EXPECT_EQ(to_string(DataPosition{1, 7}), "epoch 1, batch 7");

  o.drop_last = true;
  const BatchStream dropped(singletons(10), o);
  EXPECT_EQ(dropped.batches_per_epoch(), 2);
  EXPECT_THROW(BatchStream(singletons(3), o), std::invalid_argument);
  o.drop_last = false;
  EXPECT_THROW(BatchStream({}, o), std::invalid_argument);
  o.batch_size = 0;
  EXPECT_THROW(BatchStream(singletons(3), o), std::invalid_argument);
}

TEST(BatchStream, NoShuffleKeepsFileOrder) {
  BatchOptions o;
  o.batch_size = 3;
  o.shuffle = false;
  const BatchStream s(singletons(4), o);
  EXPECT_EQ(s.epoch_order(5), (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(s.batch_examples({2, 1}), (std::vector<int64_t>{3}));
}

TEST(BatchStream, ResumedRunContinuesAtTheExactBatch) {
  std::vector<TokenizedExample> data;
  for (int i = 0; i < 11; ++i) {
    data.push_back(ex(std::vector<int64_t>(static_cast<std::size_t>(1 + i % 4), i),
                      std::vector<int64_t>(static_cast<std::size_t>(1 + i % 4), i)));
  }
  BatchOptions o;
  o.batch_size = 3;
  o.max_length = 6;
  o.layout = BatchLayout::Packed;
  o.seed = 1234;
  const BatchStream first(data, o);

  // Run 10 batches in one go.
  std::vector<Batch> straight;
  DataPosition pos;
  for (int step = 0; step < 10; ++step) {
    straight.push_back(first.batch(pos));
    pos = first.next(pos);
  }
  // Stop after 6 batches, save the position, rebuild everything, continue.
  DataPosition saved;
  for (int step = 0; step < 6; ++step) saved = first.next(saved);
  EXPECT_EQ(saved, (DataPosition{1, 2}));  // 4 batches per epoch
  const BatchStream resumed(data, o);
  DataPosition p = saved;
  for (int step = 6; step < 10; ++step) {
    const Batch b = resumed.batch(p);
    const Batch& want = straight[static_cast<std::size_t>(step)];
    EXPECT_EQ(b.examples, want.examples) << "step " << step;
    EXPECT_EQ(b.input_ids, want.input_ids) << "step " << step;
    EXPECT_EQ(b.labels, want.labels) << "step " << step;
    EXPECT_EQ(b.seq_ids, want.seq_ids) << "step " << step;
    p = resumed.next(p);
  }
  // Every epoch visits every example once.
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    std::vector<int64_t> seen;
    for (int64_t bi = 0; bi < first.batches_per_epoch(); ++bi) {
      const auto idx = first.batch_examples({epoch, bi});
      seen.insert(seen.end(), idx.begin(), idx.end());
    }
    std::sort(seen.begin(), seen.end());
    EXPECT_EQ(seen, (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
  }
  EXPECT_NE(first.epoch_order(0), first.epoch_order(1));
}

TEST(BatchStream, TruncatesOnceAndReports) {
  BatchOptions o;
  o.batch_size = 2;
  o.max_length = 3;
  o.layout = BatchLayout::Packed;
  const BatchStream s({ex({1, 2, 3, 4, 5}, {1, 2, 3, 4, 5}), ex({6}, {6})}, o);
  EXPECT_EQ(s.truncation().truncated, 1);
  EXPECT_EQ(s.truncation().dropped_tokens, 2);
  EXPECT_EQ(s.examples()[0].ids, (std::vector<int64_t>{1, 2, 3}));
  const Batch b = s.batch({0, 0});
  EXPECT_LE(b.cols, 3);
}

}  // namespace
}  // namespace peftfw::data
