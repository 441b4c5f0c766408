// Hugging Face tokenizer.json: added tokens, pre-tokenizers, the BPE model,
// the decoder and the post-processor's template, each following the Rust
// `tokenizers` library (its tokenizer/added_vocabulary.rs, pre_tokenizers/,
// models/bpe/ and decoders/byte_level.rs) so that ids match it exactly.
#include <algorithm>
#include <array>
#include <cstdio>
#include <functional>
#include <limits>
#include <mutex>
#include <queue>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include <nlohmann/json.hpp>

#include "peftfw/data/tokenizer.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"
#include "tokenizer_internal.hpp"

namespace peftfw::data {
namespace {

using nlohmann::json;
using namespace detail;

// ---- JSON access with file and path in every message ---------------------------

// A string from the file (a token, a type name) or from the text being
// encoded, JSON-quoted for a message and cut to io::kMaxExcerptBytes.
std::string json_quoted(std::string_view s) {
  const io::Excerpt e = io::make_excerpt(s);
  return json(e.text).dump(-1, ' ', false, json::error_handler_t::replace) + e.note();
}

class Source {
 public:
  explicit Source(std::string file) : file_(std::move(file)) {}
  const std::string& file() const { return file_; }

  [[noreturn]] void fail(const std::string& path, const std::string& message) const {
    throw InputError(file_ + ": " + path + ": " + message);
  }

  // Present and not null.
  const json* find(const json& object, const std::string& key) const {
    const auto it = object.find(key);
    if (it == object.end() || it->is_null()) return nullptr;
    return &*it;
  }
  const json& require(const json& object, const std::string& key, const std::string& path,
                      const std::string& hint = "") const {
    const json* value = find(object, key);
    if (value == nullptr) {
      fail(join(path, key), "missing" + (hint.empty() ? "" : " (" + hint + ")"));
    }
    return *value;
  }
  const json& require_object(const json& object, const std::string& key,
                             const std::string& path) const {
    return expect_object(require(object, key, path), join(path, key));
  }
  const json& expect_object(const json& value, const std::string& path) const {
    if (!value.is_object()) fail(path, "expected an object, found " + describe(value));
    return value;
  }
  const json& expect_array(const json& value, const std::string& path) const {
    if (!value.is_array()) fail(path, "expected an array, found " + describe(value));
    return value;
  }
  std::string require_string(const json& object, const std::string& key,
                             const std::string& path) const {
    const json& value = require(object, key, path);
    if (!value.is_string()) fail(join(path, key), "expected a string, found " + describe(value));
    return value.get<std::string>();
  }
  std::optional<std::string> optional_string(const json& object, const std::string& key,
                                             const std::string& path) const {
    const json* value = find(object, key);
    if (value == nullptr) return std::nullopt;
    if (!value->is_string()) fail(join(path, key), "expected a string, found " + describe(*value));
    return value->get<std::string>();
  }
  // `fallback` is the library's default for the field.
  bool get_bool(const json& object, const std::string& key, bool fallback,
                const std::string& path) const {
    const json* value = find(object, key);
    if (value == nullptr) return fallback;
    if (!value->is_boolean()) {
      fail(join(path, key), "expected a boolean, found " + describe(*value));
    }
    return value->get<bool>();
  }
  int32_t as_id(const json& value, const std::string& path) const {
    if (!value.is_number_integer()) fail(path, "expected a token id, found " + describe(value));
    const auto id = value.get<int64_t>();
    if (id < 0 || id > std::numeric_limits<int32_t>::max()) {
      fail(path, "token id " + std::to_string(id) + " is outside 0.." +
                     std::to_string(std::numeric_limits<int32_t>::max()));
    }
    return static_cast<int32_t>(id);
  }

  static std::string join(const std::string& path, const std::string& key) {
    return path.empty() ? key : path + "." + key;
  }
  static std::string index(const std::string& path, std::size_t i) {
    return path + "[" + std::to_string(i) + "]";
  }
  static std::string describe(const json& value) { return io::describe_json_value(value); }

 private:
  std::string file_;
};

// The component's "type", checked against the supported ones.
std::string component_type(const Source& src, const json& node, const std::string& path,
                           const char* what, const char* supported) {
  if (!node.is_object()) {
    src.fail(path, std::string("expected a ") + what + " object, found " + Source::describe(node));
  }
  const json* type = src.find(node, "type");
  if (type == nullptr || !type->is_string()) {
    src.fail(Source::join(path, "type"),
             std::string("missing ") + what + " type; peftfw supports " + supported);
  }
  return type->get<std::string>();
}

[[noreturn]] void unsupported(const Source& src, const std::string& path, const char* what,
                              const std::string& type, const char* supported) {
  src.fail(Source::join(path, "type"), std::string("unsupported ") + what + " " +
                                           json_quoted(type) + "; peftfw supports " + supported);
}

// ---- Splitting with a delimiter behavior ----------------------------------------

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

struct Span {
  std::size_t start;
  std::size_t end;
  bool is_match;
};

// NormalizedString::split: `matches` (ascending, non-overlapping) become
// spans covering `text`; the behavior decides how delimiters join the
// pieces; empty pieces are dropped, as PreTokenizedString::split does.
using Matches = std::vector<std::pair<std::size_t, std::size_t>>;

void split_text(std::string_view text, const Matches& matches, bool invert, Behavior behavior,
                std::vector<std::string>& out) {
  std::vector<Span> spans;
  if (text.empty()) {
    spans.push_back({0, 0, false});
  } else {
    std::size_t previous = 0;
    for (const auto& [start, end] : matches) {
      if (previous != start) spans.push_back({previous, start, false});
      spans.push_back({start, end, true});
      previous = end;
    }
    if (previous != text.size()) spans.push_back({previous, text.size(), false});
  }
  if (invert) {
    for (Span& span : spans) span.is_match = !span.is_match;
  }

  std::vector<Span> pieces;  // is_match here means "remove"
  switch (behavior) {
    case Behavior::Isolated:
      for (const Span& span : spans) pieces.push_back({span.start, span.end, false});
      break;
    case Behavior::Removed:
      pieces = spans;
      break;
    case Behavior::Contiguous: {
      bool previous_match = false;
      for (const Span& span : spans) {
        if (span.is_match == previous_match && !pieces.empty()) {
          pieces.back().end = span.end;
        } else {
          pieces.push_back({span.start, span.end, false});
        }
        previous_match = span.is_match;
      }
      break;
    }
    case Behavior::MergedWithPrevious: {
      bool previous_match = false;
      for (const Span& span : spans) {
        if (span.is_match && !previous_match && !pieces.empty()) {
          pieces.back().end = span.end;
        } else {
          pieces.push_back({span.start, span.end, false});
        }
        previous_match = span.is_match;
      }
      break;
    }
    case Behavior::MergedWithNext: {
      bool previous_match = false;
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !previous_match && !pieces.empty()) {
          pieces.back().start = it->start;
        } else {
          pieces.push_back({it->start, it->end, false});
        }
        previous_match = it->is_match;
      }
      std::reverse(pieces.begin(), pieces.end());
      break;
    }
  }
  for (const Span& piece : pieces) {
    if (!piece.is_match && piece.end > piece.start) {
      out.emplace_back(text.substr(piece.start, piece.end - piece.start));
    }
  }
}

// ---- Pre-tokenizers -------------------------------------------------------------

using Splits = std::vector<std::string>;

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual void apply(Splits& splits) const = 0;
};

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> steps)
      : steps_(std::move(steps)) {}
  void apply(Splits& splits) const override {
    for (const auto& step : steps_) step->apply(splits);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> steps_;
};

// Split (and Digits, which is a Split on numeric characters).
class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(std::unique_ptr<Regex> regex, std::string literal, Behavior behavior,
                    bool invert)
      : regex_(std::move(regex)), literal_(std::move(literal)), behavior_(behavior),
        invert_(invert) {}

  void apply(Splits& splits) const override {
    Splits out;
    out.reserve(splits.size() * 2);
    for (const std::string& split : splits) {
      split_text(split, find(split), invert_, behavior_, out);
    }
    splits = std::move(out);
  }

 private:
  Matches find(std::string_view text) const {
    if (regex_) return regex_->find_all(text);
    Matches matches;
    std::size_t at = text.find(literal_);
    while (at != std::string_view::npos) {
      matches.emplace_back(at, at + literal_.size());
      at = text.find(literal_, at + literal_.size());
    }
    return matches;
  }

  std::unique_ptr<Regex> regex_;  // null for a literal pattern
  std::string literal_;
  Behavior behavior_;
  bool invert_;
};

// GPT-2's pattern, which ByteLevel applies when use_regex is true.
constexpr const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::unique_ptr<Regex> regex)
      : add_prefix_space_(add_prefix_space), regex_(std::move(regex)) {}

  void apply(Splits& splits) const override {
    Splits pieces;
    pieces.reserve(splits.size());
    for (std::string& split : splits) {
      if (add_prefix_space_ && split.compare(0, 1, " ") != 0) split.insert(0, 1, ' ');
      if (regex_) {
        split_text(split, regex_->find_all(split), false, Behavior::Isolated, pieces);
      } else {
        pieces.push_back(std::move(split));
      }
    }
    // Every byte becomes the character that stands for it.
    for (std::string& piece : pieces) {
      std::string mapped;
      mapped.reserve(piece.size() * 2);
      for (const char c : piece) mapped += byte_level_char(static_cast<unsigned char>(c));
      piece = std::move(mapped);
    }
    splits = std::move(pieces);
  }

 private:
  bool add_prefix_space_;
  std::unique_ptr<Regex> regex_;  // null when use_regex is false
};

constexpr const char* kSupportedPreTokenizers = "null, Sequence, Split, ByteLevel and Digits";

// Sequences nest in real files once or twice; a hostile file nesting them a
// hundred thousand deep would exhaust the stack (parsing, applying and
// destroying them all recurse).
constexpr int kMaxSequenceNesting = 32;

void check_nesting(const Source& src, const std::string& path, int depth) {
  if (depth > kMaxSequenceNesting) {
    src.fail(path, "Sequence nested more than " + std::to_string(kMaxSequenceNesting) +
                       " deep; flatten it into one Sequence");
  }
}

std::unique_ptr<PreTokenizer> parse_pre_tokenizer(const Source& src, const json& node,
                                                  const std::string& path, int depth = 0) {
  const std::string type =
      component_type(src, node, path, "pre-tokenizer", kSupportedPreTokenizers);
  if (type == "Sequence") {
    check_nesting(src, path, depth + 1);
    const std::string list_path = Source::join(path, "pretokenizers");
    const json& list = src.require(node, "pretokenizers", path);
    src.expect_array(list, list_path);
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    for (std::size_t i = 0; i < list.size(); ++i) {
      steps.push_back(parse_pre_tokenizer(src, list[i], Source::index(list_path, i), depth + 1));
    }
    return std::make_unique<SequencePreTokenizer>(std::move(steps));
  }
  if (type == "Split") {
    const std::string pattern_path = Source::join(path, "pattern");
    const json& pattern = src.require_object(node, "pattern", path);
    std::unique_ptr<Regex> regex;
    std::string literal;
    if (const auto re = src.optional_string(pattern, "Regex", pattern_path)) {
      regex = std::make_unique<Regex>(*re, src.file() + ": " + Source::join(pattern_path, "Regex"));
    } else if (const auto text = src.optional_string(pattern, "String", pattern_path)) {
      if (text->empty()) src.fail(Source::join(pattern_path, "String"), "empty split string");
      literal = *text;
    } else {
      src.fail(pattern_path, "expected {\"Regex\": ...} or {\"String\": ...}");
    }
    const std::string behavior_name = src.require_string(node, "behavior", path);
    Behavior behavior;
    if (behavior_name == "Removed") {
      behavior = Behavior::Removed;
    } else if (behavior_name == "Isolated") {
      behavior = Behavior::Isolated;
    } else if (behavior_name == "MergedWithPrevious") {
      behavior = Behavior::MergedWithPrevious;
    } else if (behavior_name == "MergedWithNext") {
      behavior = Behavior::MergedWithNext;
    } else if (behavior_name == "Contiguous") {
      behavior = Behavior::Contiguous;
    } else {
      src.fail(Source::join(path, "behavior"),
               "unknown split behavior " + json_quoted(behavior_name) +
                   "; expected Removed, Isolated, MergedWithPrevious, MergedWithNext or "
                   "Contiguous");
    }
    const bool invert = src.get_bool(node, "invert", false, path);
    return std::make_unique<SplitPreTokenizer>(std::move(regex), std::move(literal), behavior,
                                               invert);
  }
  if (type == "ByteLevel") {
    // The library's defaults for absent fields: add_prefix_space and
    // use_regex are true.
    const bool add_prefix_space = src.get_bool(node, "add_prefix_space", true, path);
    const bool use_regex = src.get_bool(node, "use_regex", true, path);
    std::unique_ptr<Regex> regex;
    if (use_regex) {
      regex = std::make_unique<Regex>(kGpt2Pattern, "GPT-2 pattern of " + src.file() + ": " + path);
    }
    return std::make_unique<ByteLevelPreTokenizer>(add_prefix_space, std::move(regex));
  }
  if (type == "Digits") {
    // Rust's char::is_numeric is the Unicode N categories; one match per
    // character, joined into runs unless individual_digits.
    const bool individual = src.get_bool(node, "individual_digits", false, path);
    auto regex = std::make_unique<Regex>("\\p{N}", src.file() + ": " + path);
    return std::make_unique<SplitPreTokenizer>(
        std::move(regex), "", individual ? Behavior::Isolated : Behavior::Contiguous, false);
  }
  unsupported(src, path, "pre-tokenizer", type, kSupportedPreTokenizers);
}

// ---- BPE model ------------------------------------------------------------------

class BpeModel {
 public:
  BpeModel(const Source& src, const json& node);

  // Appends the ids of one pre-token.
  void tokenize(const std::string& word, std::vector<int64_t>& out) const;

  std::optional<int32_t> token_to_id(const std::string& token) const {
    const auto it = vocab_.find(token);
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
  }
  const std::string* id_to_token(int32_t id) const {
    const auto it = vocab_r_.find(id);
    return it == vocab_r_.end() ? nullptr : &it->second;
  }
  std::size_t size() const { return vocab_.size(); }
  int32_t max_id() const { return max_id_; }

 private:
  struct MergeTarget {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  std::vector<int32_t> merge_word(const std::string& word) const;

  std::string file_;
  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<int32_t, std::string> vocab_r_;
  std::unordered_map<uint64_t, MergeTarget> merges_;
  int32_t max_id_ = -1;
  std::optional<int32_t> unk_id_;
  std::optional<std::string> continuing_subword_prefix_;
  std::optional<std::string> end_of_word_suffix_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  std::array<int32_t, 256> byte_ids_{};  // <0xXX> tokens for byte_fallback, -1 when absent

  // Pre-token -> ids. Bounded: once full, new words are not cached.
  static constexpr std::size_t kCacheCapacity = 65536;
  static constexpr std::size_t kMaxCachedWordBytes = 256;
  mutable std::shared_mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

BpeModel::BpeModel(const Source& src, const json& node) : file_(src.file()) {
  const std::string path = "model";
  const json& vocab = src.require_object(node, "vocab", path);
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const std::string entry_path = "model.vocab[" + json_quoted(it.key()) + "]";
    const int32_t id = src.as_id(it.value(), entry_path);
    const auto [existing, inserted] = vocab_r_.emplace(id, it.key());
    if (!inserted) {
      src.fail(entry_path, "id " + std::to_string(id) + " is also the id of " +
                               json_quoted(existing->second) + "; every token needs its own id");
    }
    vocab_.emplace(it.key(), id);
    max_id_ = std::max(max_id_, id);
  }

  if (const json* dropout = src.find(node, "dropout")) {
    if (!dropout->is_number() || dropout->get<double>() != 0.0) {
      src.fail("model.dropout", "BPE dropout (" + Source::describe(*dropout) +
                                    ") is a training-time randomisation that peftfw does not "
                                    "apply; set it to null");
    }
  }
  continuing_subword_prefix_ = src.optional_string(node, "continuing_subword_prefix", path);
  end_of_word_suffix_ = src.optional_string(node, "end_of_word_suffix", path);
  fuse_unk_ = src.get_bool(node, "fuse_unk", false, path);
  byte_fallback_ = src.get_bool(node, "byte_fallback", false, path);
  ignore_merges_ = src.get_bool(node, "ignore_merges", false, path);
  if (const auto unk = src.optional_string(node, "unk_token", path)) {
    unk_id_ = token_to_id(*unk);
    // The library only fails once an unknown character shows up; a broken
    // file is better reported when it is loaded.
    if (!unk_id_) {
      src.fail("model.unk_token", "token " + json_quoted(*unk) + " is not in model.vocab");
    }
  }
  byte_ids_.fill(-1);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    if (const auto id = token_to_id(name)) byte_ids_[static_cast<std::size_t>(b)] = *id;
  }

  const json& merges = src.require(node, "merges", path);
  src.expect_array(merges, "model.merges");
  const std::size_t prefix_length =
      continuing_subword_prefix_ ? continuing_subword_prefix_->size() : 0;
  merges_.reserve(merges.size());
  for (std::size_t rank = 0; rank < merges.size(); ++rank) {
    const std::string merge_path = Source::index("model.merges", rank);
    const json& merge = merges[rank];
    // The library reads either format, but not a mix of the two.
    if (merge.is_string() != merges[0].is_string()) {
      src.fail(merge_path, std::string("found ") + Source::describe(merge) + " in merges whose "
                           "first entry is " + Source::describe(merges[0]) + "; use either \"a b\" "
                           "strings or [\"a\", \"b\"] pairs throughout");
    }
    std::string a;
    std::string b;
    if (merge.is_string()) {
      // The older format: "a b", split at the one space (tokens never hold a
      // plain space in byte-level vocabularies).
      const std::string text = merge.get<std::string>();
      const std::size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos) {
        src.fail(merge_path, "expected \"a b\" (two tokens separated by one space) or [\"a\", "
                             "\"b\"], found " + Source::describe(merge));
      }
      a = text.substr(0, space);
      b = text.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {
      a = merge[0].get<std::string>();
      b = merge[1].get<std::string>();
    } else {
      src.fail(merge_path, "expected \"a b\" (two tokens separated by one space) or [\"a\", "
                           "\"b\"], found " + Source::describe(merge));
    }
    const auto a_id = token_to_id(a);
    const auto b_id = token_to_id(b);
    if (!a_id) src.fail(merge_path, "token " + json_quoted(a) + " is not in model.vocab");
    if (!b_id) src.fail(merge_path, "token " + json_quoted(b) + " is not in model.vocab");
    if (b.size() < prefix_length) {
      src.fail(merge_path, "token " + json_quoted(b) + " is shorter than the continuing subword "
                           "prefix " + json_quoted(*continuing_subword_prefix_));
    }
    const std::string merged = a + b.substr(prefix_length);
    const auto new_id = token_to_id(merged);
    if (!new_id) {
      src.fail(merge_path, "the merged token " + json_quoted(merged) + " is not in model.vocab");
    }
    // A repeated pair takes its last rank, as the library's HashMap collect.
    merges_[pair_key(*a_id, *b_id)] = {static_cast<int32_t>(rank), *new_id};
  }
}

std::vector<int32_t> BpeModel::merge_word(const std::string& word) const {
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool removed;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  const auto add = [&symbols](int32_t id) {
    const auto index = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, index - 1, -1, false});
    if (index > 0) symbols[static_cast<std::size_t>(index - 1)].next = index;
  };

  // Initial symbols, one per character (BPE::merge_word).
  // The unknown token waiting to be added (fused runs add it once); -1 when
  // none. (An std::optional here trips GCC 12's -Wmaybe-uninitialized.)
  int32_t pending_unk = -1;
  std::size_t i = 0;
  std::string piece;
  while (i < word.size()) {
    const std::size_t start = i;
    const uint32_t cp = next_code_point(word, i);
    piece.assign(word, start, i - start);
    if (start > 0 && continuing_subword_prefix_) piece.insert(0, *continuing_subword_prefix_);
    if (i == word.size() && end_of_word_suffix_) piece += *end_of_word_suffix_;

    if (const auto id = token_to_id(piece)) {
      if (pending_unk >= 0) {
        add(pending_unk);
        pending_unk = -1;
      }
      add(*id);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (const char c : piece) all = all && byte_ids_[static_cast<unsigned char>(c)] >= 0;
      if (all) {
        // As in the library, a pending unknown is not flushed first.
        for (const char c : piece) add(byte_ids_[static_cast<unsigned char>(c)]);
        continue;
      }
    }
    if (!unk_id_) {
      throw InputError(file_ + ": the character " + code_point_name(cp) + " (" +
                       word.substr(start, i - start) + ") in the pre-token " + json_quoted(word) +
                       " is not in the vocabulary, and the model has no unk_token or "
                       "byte_fallback for it (the tokenizers library would drop it silently)");
    }
    if (pending_unk >= 0 && !fuse_unk_) add(pending_unk);
    pending_unk = *unk_id_;
  }
  if (pending_unk >= 0) add(pending_unk);

  // Word::merge_all: always the lowest-ranked pair, the leftmost on ties.
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
    bool operator>(const Candidate& other) const {
      return rank != other.rank ? rank > other.rank : pos > other.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  const auto lookup = [this](int32_t a, int32_t b) -> const MergeTarget* {
    const auto it = merges_.find(pair_key(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  for (std::size_t k = 0; k + 1 < symbols.size(); ++k) {
    if (const MergeTarget* m = lookup(symbols[k].id, symbols[k + 1].id)) {
      queue.push({m->rank, static_cast<int32_t>(k), m->new_id});
    }
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[static_cast<std::size_t>(top.pos)];
    if (left.removed || left.next < 0) continue;
    const int32_t right_pos = left.next;
    Symbol& right = symbols[static_cast<std::size_t>(right_pos)];
    // A stale entry: this pair has changed since it was queued.
    const MergeTarget* current = lookup(left.id, right.id);
    if (current == nullptr || current->new_id != top.new_id) continue;

    left.id = top.new_id;
    left.next = right.next;
    right.removed = true;
    if (right.next >= 0) symbols[static_cast<std::size_t>(right.next)].prev = top.pos;

    if (left.prev >= 0) {
      const Symbol& prev = symbols[static_cast<std::size_t>(left.prev)];
      if (const MergeTarget* m = lookup(prev.id, left.id)) {
        queue.push({m->rank, left.prev, m->new_id});
      }
    }
    if (left.next >= 0) {
      const Symbol& next = symbols[static_cast<std::size_t>(left.next)];
      if (const MergeTarget* m = lookup(left.id, next.id)) {
        queue.push({m->rank, top.pos, m->new_id});
      }
    }
  }

  std::vector<int32_t> ids;
  for (const Symbol& s : symbols) {
    if (!s.removed) ids.push_back(s.id);
  }
  return ids;
}

void BpeModel::tokenize(const std::string& word, std::vector<int64_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    // A pre-token that is itself in the vocabulary is taken whole.
    if (const auto id = token_to_id(word)) {
      out.push_back(*id);
      return;
    }
  }
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  if (cacheable) {
    std::shared_lock<std::shared_mutex> lock(cache_mutex_);
    const auto it = cache_.find(word);
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids = merge_word(word);
  out.insert(out.end(), ids.begin(), ids.end());
  if (cacheable) {
    std::unique_lock<std::shared_mutex> lock(cache_mutex_);
    if (cache_.size() < kCacheCapacity) cache_.emplace(word, std::move(ids));
  }
}

// ---- Added tokens -----------------------------------------------------------------

struct AddedToken {
  std::string content;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = true;
  bool special = false;

  bool operator==(const AddedToken& o) const {
    return content == o.content && single_word == o.single_word && lstrip == o.lstrip &&
           rstrip == o.rstrip && normalized == o.normalized && special == o.special;
  }
};

// Leftmost-longest exact matching of a set of strings (the library's
// aho-corasick automaton with MatchKind::LeftmostLongest), as a byte trie.
class TokenTrie {
 public:
  TokenTrie() : nodes_(1) {}

  void add(const std::string& pattern, int32_t id) {
    std::size_t node = 0;
    for (const char c : pattern) {
      const auto byte = static_cast<unsigned char>(c);
      std::size_t child = 0;
      for (const auto& [b, index] : nodes_[node].children) {
        if (b == byte) child = index;
      }
      if (child == 0) {
        child = nodes_.size();
        nodes_[node].children.emplace_back(byte, child);
        nodes_.emplace_back();
      }
      node = child;
    }
    if (!nodes_[node].id) nodes_[node].id = id;  // the first of equal patterns wins
    first_bytes_[static_cast<unsigned char>(pattern[0])] = true;
    empty_ = false;
  }

  struct Match {
    std::size_t start;
    std::size_t end;
    int32_t id;
  };

  // Non-overlapping matches, left to right.
  std::vector<Match> find_all(std::string_view text) const {
    std::vector<Match> matches;
    if (empty_) return matches;
    std::size_t pos = 0;
    while (pos < text.size()) {
      if (!first_bytes_[static_cast<unsigned char>(text[pos])]) {
        ++pos;
        continue;
      }
      std::size_t node = 0;
      std::optional<Match> best;
      for (std::size_t k = pos; k < text.size(); ++k) {
        const auto byte = static_cast<unsigned char>(text[k]);
        std::size_t child = 0;
        for (const auto& [b, index] : nodes_[node].children) {
          if (b == byte) child = index;
        }
        if (child == 0) break;
        node = child;
        if (nodes_[node].id) best = Match{pos, k + 1, *nodes_[node].id};
      }
      if (best) {
        matches.push_back(*best);
        pos = best->end;
      } else {
        ++pos;
      }
    }
    return matches;
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, std::size_t>> children;
    std::optional<int32_t> id;
  };
  std::vector<Node> nodes_;
  std::array<bool, 256> first_bytes_{};
  bool empty_ = true;
};

// A piece of the input: an added token (id >= 0) or text for the model.
struct Piece {
  std::string_view text;
  int32_t id = -1;
};

class AddedVocabulary {
 public:
  AddedVocabulary()
      // Rust regex's Unicode \w (UTS #18), which single_word checks use.
      : word_start_("[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}]",
                    "added-token word check") {}

  // AddedVocabulary::add_tokens for one token; returns the id it gets, or
  // nullopt (adding nothing) when that id would be past the int32 range.
  std::optional<int32_t> add(const AddedToken& token, const BpeModel& model) {
    if (token.special && special_set_.insert(token.content).second) {
      special_tokens_.push_back(token);
    }
    // An identical token is ignored. A content keeps the id it first got, so
    // an identical token can only sit at by_content_'s id (a lookup, where a
    // scan of every added token made loading quadratic).
    int32_t id;
    if (const auto it = by_content_.find(token.content); it != by_content_.end()) {
      id = it->second;
      if (const auto same = by_id_.find(id); same != by_id_.end() && same->second == token) {
        return id;
      }
    } else if (const auto model_id = model.token_to_id(token.content)) {
      id = *model_id;
    } else {
      const int64_t next = next_id(model);
      if (next > std::numeric_limits<int32_t>::max()) return std::nullopt;
      id = static_cast<int32_t>(next);
    }
    by_content_[token.content] = id;
    by_id_[id] = token;
    max_id_ = std::max(max_id_, id);
    if (special_set_.count(token.content) == 0) classic_tokens_.push_back(token);
    return id;
  }

  // refresh_added_tokens: special tokens first, then the others; tokens
  // marked normalized are matched on the normalized text.
  void build_tries() {
    for (const auto* list : {&special_tokens_, &classic_tokens_}) {
      for (const AddedToken& token : *list) {
        const int32_t id = by_content_.at(token.content);
        (token.normalized ? normalized_trie_ : raw_trie_).add(token.content, id);
      }
    }
  }

  std::optional<int32_t> token_to_id(const std::string& content) const {
    const auto it = by_content_.find(content);
    if (it == by_content_.end()) return std::nullopt;
    return it->second;
  }
  const AddedToken* token(int32_t id) const {
    const auto it = by_id_.find(id);
    return it == by_id_.end() ? nullptr : &it->second;
  }
  bool is_special(const std::string& content) const { return special_set_.count(content) != 0; }
  int32_t max_id() const { return max_id_; }

  // extract_and_normalize: the non-normalized tokens are found on the text,
  // then the normalized ones on the pieces between them (no normalizer is
  // supported, so the normalized text is the text).
  std::vector<Piece> split(std::string_view text, bool allow_special) const {
    std::vector<Piece> first;
    find_matches(text, raw_trie_, allow_special, first);
    std::vector<Piece> out;
    for (const Piece& piece : first) {
      if (piece.id >= 0) {
        out.push_back(piece);
      } else {
        find_matches(piece.text, normalized_trie_, allow_special, out);
      }
    }
    return out;
  }

 private:
  // The id a new token gets; may be one past the int32 range.
  int64_t next_id(const BpeModel& model) const {
    const auto vocab_size = static_cast<int32_t>(model.size());
    if (by_content_.empty()) return vocab_size;
    const int32_t max = max_id();
    return max >= vocab_size || vocab_size == 0 ? int64_t{max} + 1 : vocab_size;
  }

  bool is_word_char_at(std::string_view text, std::size_t offset) const {
    return word_start_.matches_at(text, offset);
  }

  // AddedVocabulary::find_matches; appends the non-empty pieces of
  // `sentence` to `out`.
  void find_matches(std::string_view sentence, const TokenTrie& trie, bool allow_special,
                    std::vector<Piece>& out) const {
    std::size_t start_offset = 0;
    for (const TokenTrie::Match& match : trie.find_all(sentence)) {
      std::size_t start = match.start;
      std::size_t stop = match.end;
      const AddedToken& token = by_id_.at(match.id);
      if (!allow_special && special_set_.count(token.content) != 0) continue;
      if (token.single_word) {
        // Neither side may touch a word character (regex \w).
        bool start_space = true;
        if (start > 0) {
          std::size_t prev = start - 1;
          while (prev > 0 && (static_cast<unsigned char>(sentence[prev]) & 0xC0) == 0x80) --prev;
          start_space = !is_word_char_at(sentence, prev);
        }
        const bool stop_space = stop == sentence.size() || !is_word_char_at(sentence, stop);
        if (!start_space || !stop_space) continue;
      }
      if (token.lstrip) {
        std::size_t new_start = start;
        while (new_start > 0) {
          std::size_t prev = new_start - 1;
          while (prev > 0 && (static_cast<unsigned char>(sentence[prev]) & 0xC0) == 0x80) --prev;
          std::size_t at = prev;
          if (!is_unicode_whitespace(next_code_point(sentence, at))) break;
          new_start = prev;
        }
        start = std::max(new_start, start_offset);
      }
      if (token.rstrip) {
        while (stop < sentence.size()) {
          std::size_t at = stop;
          if (!is_unicode_whitespace(next_code_point(sentence, at))) break;
          stop = at;
        }
      }
      if (start_offset < start) {
        out.push_back({sentence.substr(start_offset, start - start_offset)});
      }
      out.push_back({sentence.substr(start, stop - start), match.id});
      start_offset = stop;
    }
    if (start_offset < sentence.size()) out.push_back({sentence.substr(start_offset)});
  }

  std::unordered_map<std::string, int32_t> by_content_;
  std::unordered_map<int32_t, AddedToken> by_id_;
  int32_t max_id_ = -1;  // the largest value in by_content_
  std::vector<AddedToken> special_tokens_;
  std::vector<AddedToken> classic_tokens_;
  std::unordered_set<std::string> special_set_;
  TokenTrie raw_trie_;
  TokenTrie normalized_trie_;
  Regex word_start_;  // one character of Rust regex's Unicode \w
};

// ---- The tokenizer ------------------------------------------------------------------

enum class DecoderKind { None, ByteLevel };

class HfTokenizer final : public Tokenizer {
 public:
  HfTokenizer(const std::filesystem::path& path, const json& root);

  std::vector<int64_t> encode(std::string_view text, bool allow_special) const override;
  std::string decode(const std::vector<int64_t>& ids, bool skip_special) const override;
  int64_t vocab_size() const override {
    return static_cast<int64_t>(std::max(model_->max_id(), added_.max_id())) + 1;
  }
  std::optional<int64_t> token_id(std::string_view token) const override {
    const std::string key(token);
    if (const auto id = added_.token_to_id(key)) return *id;
    if (const auto id = model_->token_to_id(key)) return *id;
    return std::nullopt;
  }
  std::optional<int64_t> bos_id() const override { return bos_; }
  std::optional<int64_t> eos_id() const override { return eos_; }
  std::optional<int64_t> pad_id() const override { return pad_; }
  std::vector<int64_t> add_template_tokens(std::vector<int64_t> ids) const override;
  std::string name() const override { return "hf:" + file_; }

 private:
  // One piece of a TemplateProcessing "single" template.
  struct TemplatePiece {
    bool sequence = false;       // $A
    std::vector<int64_t> ids;    // a special token's ids
  };

  void parse_added_tokens(const Source& src, const json& root);
  void parse_post_processor(const Source& src, const json& node, const std::string& path,
                            int depth = 0);
  void read_tokenizer_config();
  const std::string& token_text(int64_t id, std::size_t position) const;

  std::string file_;
  std::unique_ptr<BpeModel> model_;
  AddedVocabulary added_;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;  // null: none
  DecoderKind decoder_ = DecoderKind::None;
  std::vector<std::vector<TemplatePiece>> templates_;  // applied in order
  std::optional<int64_t> bos_;
  std::optional<int64_t> eos_;
  std::optional<int64_t> pad_;
};

HfTokenizer::HfTokenizer(const std::filesystem::path& path, const json& root)
    : file_(path.string()) {
  const Source src(file_);
  src.expect_object(root, "(top level)");
  if (const json* version = src.find(root, "version")) {
    if (!version->is_string() || version->get<std::string>() != "1.0") {
      src.fail("version", "expected \"1.0\" (the only tokenizer.json version), found " +
                              Source::describe(*version));
    }
  }

  const json& model = src.require(root, "model", "", "a tokenizer.json needs a model object");
  const std::string model_type = component_type(src, model, "model", "model", "BPE");
  if (model_type != "BPE") unsupported(src, "model", "model", model_type, "BPE");
  model_ = std::make_unique<BpeModel>(src, model);

  if (const json* normalizer = src.find(root, "normalizer")) {
    const std::string type = component_type(src, *normalizer, "normalizer", "normalizer", "null");
    const json* steps = src.find(*normalizer, "normalizers");
    // An empty Sequence changes nothing.
    if (!(type == "Sequence" && steps != nullptr && steps->is_array() && steps->empty())) {
      unsupported(src, "normalizer", "normalizer", type, "null");
    }
  }

  if (const json* pre = src.find(root, "pre_tokenizer")) {
    pre_tokenizer_ = parse_pre_tokenizer(src, *pre, "pre_tokenizer");
  }

  if (const json* decoder = src.find(root, "decoder")) {
    const std::string type =
        component_type(src, *decoder, "decoder", "decoder", "null and ByteLevel");
    if (type != "ByteLevel") unsupported(src, "decoder", "decoder", type, "null and ByteLevel");
    decoder_ = DecoderKind::ByteLevel;
  }

  parse_added_tokens(src, root);

  if (const json* post = src.find(root, "post_processor")) {
    parse_post_processor(src, *post, "post_processor");
  }

  read_tokenizer_config();
}

void HfTokenizer::parse_added_tokens(const Source& src, const json& root) {
  const json* list = src.find(root, "added_tokens");
  if (list != nullptr) {
    src.expect_array(*list, "added_tokens");
    for (std::size_t i = 0; i < list->size(); ++i) {
      const std::string path = Source::index("added_tokens", i);
      const json& entry = (*list)[i];
      src.expect_object(entry, path);
      AddedToken token;
      token.content = src.require_string(entry, "content", path);
      if (token.content.empty()) src.fail(Source::join(path, "content"), "empty token");
      if (const auto bad = find_invalid_utf8(token.content)) {
        src.fail(Source::join(path, "content"), "not valid UTF-8");
      }
      const int32_t file_id = src.as_id(src.require(entry, "id", path), Source::join(path, "id"));
      // Absent flags take the library's AddedToken defaults.
      token.single_word = src.get_bool(entry, "single_word", false, path);
      token.lstrip = src.get_bool(entry, "lstrip", false, path);
      token.rstrip = src.get_bool(entry, "rstrip", false, path);
      token.normalized = src.get_bool(entry, "normalized", true, path);
      token.special = src.get_bool(entry, "special", false, path);
      // The library re-adds the tokens in file order and keeps the ids that
      // gives, warning when they differ from the file's. Which of the two a
      // model was trained with cannot be known, so peftfw refuses.
      const std::optional<int32_t> added = added_.add(token, *model_);
      if (!added) {
        src.fail(Source::join(path, "id"),
                 "the added token " + json_quoted(token.content) +
                     " would be numbered past the largest token id " +
                     std::to_string(std::numeric_limits<int32_t>::max()) +
                     " (added tokens are numbered after the largest id in use)");
      }
      const int32_t id = *added;
      if (id != file_id) {
        src.fail(Source::join(path, "id"),
                 "the added token " + json_quoted(token.content) + " has id " +
                     std::to_string(file_id) + " here, but the tokenizers library gives it id " +
                     std::to_string(id) + " when it loads this file (" +
                     (model_->token_to_id(token.content) ? "the model vocabulary has it"
                                                         : "added tokens are numbered from the "
                                                           "vocabulary's size, in file order") +
                     "); fix the file so that both agree");
      }
    }
  }
  added_.build_tries();
}

void HfTokenizer::parse_post_processor(const Source& src, const json& node,
                                       const std::string& path, int depth) {
  static constexpr const char* kSupported = "null, ByteLevel, TemplateProcessing and Sequence";
  const std::string type = component_type(src, node, path, "post-processor", kSupported);
  if (type == "ByteLevel") return;  // changes offsets only
  if (type == "Sequence") {
    check_nesting(src, path, depth + 1);
    const std::string list_path = Source::join(path, "processors");
    const json& list = src.require(node, "processors", path);
    src.expect_array(list, list_path);
    for (std::size_t i = 0; i < list.size(); ++i) {
      parse_post_processor(src, list[i], Source::index(list_path, i), depth + 1);
    }
    return;
  }
  if (type != "TemplateProcessing") unsupported(src, path, "post-processor", type, kSupported);

  const std::string single_path = Source::join(path, "single");
  const json& single = src.require(node, "single", path);
  src.expect_array(single, single_path);
  const json* specials = src.find(node, "special_tokens");
  std::vector<TemplatePiece> pieces;
  for (std::size_t i = 0; i < single.size(); ++i) {
    const std::string piece_path = Source::index(single_path, i);
    const json& piece = single[i];
    src.expect_object(piece, piece_path);
    if (const json* sequence = src.find(piece, "Sequence")) {
      const std::string id =
          src.require_string(*sequence, "id", Source::join(piece_path, "Sequence"));
      if (id != "A") {
        src.fail(Source::join(piece_path, "Sequence.id"),
                 "a single-sequence template can only hold sequence A, found " + json_quoted(id));
      }
      pieces.push_back({true, {}});
    } else if (const json* special = src.find(piece, "SpecialToken")) {
      const std::string special_path = Source::join(piece_path, "SpecialToken");
      const std::string name = src.require_string(*special, "id", special_path);
      const json* entry = specials != nullptr ? src.find(*specials, name) : nullptr;
      if (entry == nullptr || !entry->is_object()) {
        src.fail(Source::join(special_path, "id"),
                 "special token " + json_quoted(name) + " is not in " + path + ".special_tokens");
      }
      const std::string entry_path =
          Source::join(path, "special_tokens[" + json_quoted(name) + "]");
      const std::string ids_path = Source::join(entry_path, "ids");
      const json& ids = src.expect_array(src.require(*entry, "ids", entry_path), ids_path);
      TemplatePiece out;
      for (std::size_t k = 0; k < ids.size(); ++k) {
        out.ids.push_back(src.as_id(ids[k], Source::index(ids_path, k)));
      }
      pieces.push_back(std::move(out));
    } else {
      src.fail(piece_path, "expected {\"Sequence\": ...} or {\"SpecialToken\": ...}");
    }
  }
  templates_.push_back(std::move(pieces));
}

void HfTokenizer::read_tokenizer_config() {
  const std::filesystem::path config_path =
      std::filesystem::path(file_).parent_path() / "tokenizer_config.json";
  std::error_code ec;
  if (!std::filesystem::exists(config_path, ec)) return;
  const std::string config_file = config_path.string();
  const json config = io::parse_json_text(io::read_text_file(config_file), config_file);
  const Source src(config_file);
  src.expect_object(config, "(top level)");
  const auto lookup = [&](const char* key) -> std::optional<int64_t> {
    const json* value = src.find(config, key);
    if (value == nullptr) return std::nullopt;
    std::string content;
    if (value->is_string()) {
      content = value->get<std::string>();
    } else if (value->is_object()) {
      content = src.require_string(*value, "content", key);
    } else {
      src.fail(key, "expected a token string or {\"content\": ...}, found " +
                        Source::describe(*value));
    }
    const auto id = token_id(content);
    if (!id) {
      src.fail(key, "token " + json_quoted(content) + " is not in the vocabulary of " + file_);
    }
    return id;
  };
  bos_ = lookup("bos_token");
  eos_ = lookup("eos_token");
  pad_ = lookup("pad_token");
}

std::vector<int64_t> HfTokenizer::encode(std::string_view text, bool allow_special) const {
  if (const auto bad = find_invalid_utf8(text)) {
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02X", static_cast<unsigned char>(text[*bad]));
    throw InputError(name() + ": cannot encode text that is not valid UTF-8 (invalid byte " + hex +
                     " at byte offset " + std::to_string(*bad) + ")");
  }
  std::vector<int64_t> ids;
  ids.reserve(text.size() / 3 + 4);
  Splits splits;
  for (const Piece& piece : added_.split(text, allow_special)) {
    if (piece.id >= 0) {
      ids.push_back(piece.id);
      continue;
    }
    splits.clear();
    splits.emplace_back(piece.text);
    if (pre_tokenizer_) pre_tokenizer_->apply(splits);
    for (const std::string& split : splits) model_->tokenize(split, ids);
  }
  return ids;
}

const std::string& HfTokenizer::token_text(int64_t id, std::size_t position) const {
  if (id >= 0 && id <= std::numeric_limits<int32_t>::max()) {
    const auto id32 = static_cast<int32_t>(id);
    if (const AddedToken* token = added_.token(id32)) return token->content;
    if (const std::string* token = model_->id_to_token(id32)) return *token;
  }
  throw InputError(name() + ": token id " + std::to_string(id) + " at position " +
                   std::to_string(position) + " is not in the vocabulary (vocab_size " +
                   std::to_string(vocab_size()) + ")");
}

std::string HfTokenizer::decode(const std::vector<int64_t>& ids, bool skip_special) const {
  std::vector<const std::string*> tokens;
  tokens.reserve(ids.size());
  for (std::size_t k = 0; k < ids.size(); ++k) {
    const std::string& token = token_text(ids[k], k);
    if (skip_special && added_.is_special(token)) continue;
    tokens.push_back(&token);
  }
  if (decoder_ == DecoderKind::None) {
    // The library joins tokens with spaces when there is no decoder.
    std::string out;
    for (std::size_t k = 0; k < tokens.size(); ++k) {
      if (k > 0) out += ' ';
      out += *tokens[k];
    }
    return out;
  }
  // ByteLevel: a token whose every character is in the byte alphabet becomes
  // those bytes; any other token (e.g. "<|end_of_text|>" spelled with a
  // plain space) is kept as its UTF-8 text.
  std::string bytes;
  std::string token_bytes;
  for (const std::string* token : tokens) {
    token_bytes.clear();
    bool all = true;
    std::size_t i = 0;
    while (i < token->size()) {
      const int b = byte_level_byte(next_code_point(*token, i));
      if (b < 0) {
        all = false;
        break;
      }
      token_bytes += static_cast<char>(b);
    }
    bytes += all ? token_bytes : *token;
  }
  return utf8_lossy(bytes);
}

std::vector<int64_t> HfTokenizer::add_template_tokens(std::vector<int64_t> ids) const {
  for (const auto& pieces : templates_) {
    std::vector<int64_t> out;
    out.reserve(ids.size() + 4);
    for (const TemplatePiece& piece : pieces) {
      if (piece.sequence) {
        out.insert(out.end(), ids.begin(), ids.end());
      } else {
        out.insert(out.end(), piece.ids.begin(), piece.ids.end());
      }
    }
    ids = std::move(out);
  }
  return ids;
}

}  // namespace

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::filesystem::path& tokenizer_json) {
  const std::string file = tokenizer_json.string();
  const json root = io::parse_json_text(io::read_text_file(file), file);
  return std::make_unique<HfTokenizer>(tokenizer_json, root);
}

}  // namespace peftfw::data
