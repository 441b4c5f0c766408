// Training data: JSONL reading, prompt templates and the train/eval split.
//
// A data file holds one JSON object per line in one of three layouts:
//   instruction  {"instruction": ..., "input": ..., "output": ...}  (Alpaca; input optional)
//   text         {"text": ...}
//   messages     {"messages": [{"role": ..., "content": ...}, ...]}
// "auto" picks the layout from the first valid line. Malformed lines are
// never dropped silently: each is reported as "file.jsonl:LINE: what is
// wrong", and the policy decides whether they stop the run or are skipped
// and counted.
//
// Templates turn an example into text as segments, each marked prompt or
// response, so that loss_on = "response" can mask the prompt; the eval
// prompt is the prompt part alone.
//
// The split is a seeded permutation (SplitMix64 + Fisher-Yates, defined
// below) so that it never depends on the standard library's distributions;
// split.json records it with the data file's SHA-256 so that evaluation can
// prove it sees the held-out examples of the same data.
//
// Everything here is torch-free.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "peftfw/data/chat_format.hpp"

namespace peftfw::data {

// ---------------------------------------------------------------------------
// Deterministic random numbers (shared by the split, synthetic data and
// batch shuffling). The sequences are part of peftfw's reproducibility
// contract: the same seed gives the same split, data and batch order on every
// platform and standard library.

// SplitMix64 (Steele, Lea, Flood 2014; the constants of Vigna's reference
// implementation): state += 0x9E3779B97F4A7C15, then the output mix.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next();
  // Uniform in [0, bound), bound > 0, by rejection: draws r until
  // r >= 2^64 mod bound, then returns r % bound (no modulo bias).
  uint64_t below(uint64_t bound);
  // Uniform in [lo, hi], lo <= hi.
  int64_t between(int64_t lo, int64_t hi);
  // True with probability numerator / denominator.
  bool chance(uint64_t numerator, uint64_t denominator);

 private:
  uint64_t state_;
};

// SplitMix64's output function alone (a bijective 64-bit mixer).
uint64_t mix64(uint64_t x);
// A seed for stream `stream` of `seed` (e.g. the shuffle of epoch 3):
// mix64(seed ^ mix64(stream + 0x9E3779B97F4A7C15)).
uint64_t derive_seed(uint64_t seed, uint64_t stream);

// Fisher-Yates, from the back: for i = n-1 .. 1, swap v[i] and v[below(i+1)].
template <typename T>
void shuffle_in_place(std::vector<T>& v, SplitMix64& rng) {
  for (std::size_t i = v.size(); i > 1; --i) {
    const std::size_t j = static_cast<std::size_t>(rng.below(i));
    std::swap(v[i - 1], v[j]);
  }
}

// [0, n) in the order of shuffle_in_place(iota, SplitMix64(seed)).
std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed);

// Lower-case hex SHA-256 of `bytes` (FIPS 180-4), as `sha256sum` prints it.
std::string sha256_hex(std::string_view bytes);

// ---------------------------------------------------------------------------
// Examples and JSONL reading.

enum class DataFormat { Auto, Instruction, Text, Messages };
// "auto", "instruction", "text", "messages" (the recipe's data.format).
std::optional<DataFormat> data_format_from_name(std::string_view name);
const char* data_format_name(DataFormat format);

enum class BadLinePolicy { Error, Skip };
// "error", "skip" (the recipe's data.on_bad_line).
std::optional<BadLinePolicy> bad_line_policy_from_name(std::string_view name);

struct InstructionExample {
  std::string instruction;
  std::string input;  // "" when the line has no input (or null)
  std::string output;
};

struct TextExample {
  std::string text;
};

struct ChatMessage {
  std::string role;
  std::string content;
};

struct ChatExample {
  std::vector<ChatMessage> messages;  // at least one
};

struct Example {
  std::variant<InstructionExample, TextExample, ChatExample> body;
  int64_t line = 0;  // 1-based line in the source file

  DataFormat format() const;
};

// Malformed lines, each "source:LINE: what is wrong".
struct BadLines {
  int64_t count = 0;
  std::vector<std::string> first;  // the first kMaxListed messages, in file order

  static constexpr std::size_t kMaxListed = 20;
  // "" when count is 0, else e.g.
  // "skipped 3 malformed lines (first: data.jsonl:7: missing field 'output')".
  std::string skipped_summary() const;
};

struct ReadOptions {
  DataFormat format = DataFormat::Auto;
  BadLinePolicy on_bad_line = BadLinePolicy::Error;
};

struct Dataset {
  std::string source;  // the path as given (names the file in every message)
  DataFormat format = DataFormat::Auto;  // resolved: never Auto
  int64_t format_line = 0;  // the line "auto" detected the format from; 0 = given explicitly
  std::vector<Example> examples;  // valid examples, in file order
  BadLines skipped;  // malformed lines skipped under BadLinePolicy::Skip
  std::string sha256;  // of the file's bytes
};

// Reads a JSONL file. Throws InputError: the file is missing; (policy error)
// one message listing up to 20 malformed lines and their total count; no valid
// example at all. RuntimeError for other read failures.
// A line holding only spaces, tabs or '\r' is blank and skipped silently; a
// UTF-8 byte-order mark at the start of the file is ignored. Fields other than
// the format's are ignored (data sets often carry ids or variation types).
Dataset read_jsonl(const std::string& path, const ReadOptions& options = {});
// The same on text in memory; `source` names it in messages.
Dataset parse_jsonl(std::string_view text, const std::string& source,
                    const ReadOptions& options = {});

// ---------------------------------------------------------------------------
// Prompt templates.

// The study's system message (seed study §1.3).
inline constexpr const char* kDefaultSystemPrompt = "You are a compliance analysis assistant.";

struct TextSegment {
  std::string text;
  bool response = false;  // trained on under loss_on = "response"
};

// Training text of one example, as consecutive segments (concatenated = the
// full text). Adjacent segments never share a kind.
struct RenderedExample {
  std::vector<TextSegment> segments;

  std::string text() const;
  std::string prompt_text() const;  // the prompt segments, concatenated
};

enum class TemplateKind { Chat, Alpaca, Raw, Custom };

// How examples become text:
//   chat     an architecture's role-token chat format (ChatFormat, named by its plugin);
//            instruction and messages data. With T(role, text) = header(role) + text +
//            turn_end:
//              T(system, {system})            <- left out when the system text is empty
//              T(user, {instruction}\n\n{input})
//              header(assistant)              <- end of the prompt
//              {output}{turn_end}             <- the response
//            "\n\n{input}" is left out when input is "" (as the study's `if input`).
//            Chat messages render each turn as T(role, content), as given (no system
//            turn is added); assistant content and its turn_end are the response.
//   alpaca   the Alpaca text (with / without input), instruction data; the prompt ends
//            with "### Response:\n" (torchtune's and axolotl's form of it).
//   raw      text data as is, all of it response.
//   custom   a template string with {instruction}, {input}, {output} placeholders
//            ({{ and }} are literal braces); {output} exactly once; everything from
//            {output} on is the response. Plain substitution: an empty input leaves
//            the surrounding text in place.
// The EOS token that TRL appends after the text is added at tokenization
// (batching.hpp), not here.
class PromptTemplate {
 public:
  static PromptTemplate chat(ChatFormat format, std::string system_prompt = kDefaultSystemPrompt);
  static PromptTemplate alpaca();
  static PromptTemplate raw();
  // Throws InputError naming `source` (the recipe key) for an unknown
  // placeholder, an unmatched brace or {output} not exactly once.
  static PromptTemplate custom(std::string_view template_string,
                               const std::string& source = "data.template_string");
  // "alpaca", "raw" or the name of one of `chat_formats`; anything else is an InputError
  // listing them.
  static PromptTemplate named(std::string_view name, const std::vector<ChatFormat>& chat_formats,
                              std::string system_prompt = kDefaultSystemPrompt);

  TemplateKind kind() const { return kind_; }
  std::string name() const;  // the chat format's name, "alpaca", "raw" or "custom"

  bool supports(DataFormat format) const;
  // InputError, e.g. "data.jsonl: template alpaca cannot render messages
  // examples (it renders instruction examples); ...", when !supports(format).
  void check_format(DataFormat format, const std::string& source) const;

  // Training text. Throws InputError (naming the example's line) when the
  // template does not support the example's format.
  RenderedExample render(const Example& example) const;
  // The evaluation prompt: the prompt of the last response. Instruction data:
  // the training prompt (a chat format's ends with the assistant header); chat: the turns before the last assistant message,
  // then the assistant header. InputError for text data and for chats without
  // an assistant message.
  std::string render_prompt(const Example& example) const;

 private:
  struct Piece {
    enum Kind { Literal, Instruction, Input, Output } kind;
    std::string text;  // Literal only
  };

  PromptTemplate(TemplateKind kind, std::string system_prompt)
      : kind_(kind), system_prompt_(std::move(system_prompt)) {}
  ChatFormat chat_;  // TemplateKind::Chat
  [[noreturn]] void unsupported(DataFormat format, const std::string& where) const;
  RenderedExample render_instruction(const InstructionExample& ex) const;
  RenderedExample render_chat(const ChatExample& ex) const;

  TemplateKind kind_;
  std::string system_prompt_;
  std::vector<Piece> pieces_;  // Custom only
};

// The reference answer of an example for evaluation: the output of an
// instruction example, the last assistant message of a chat. InputError for
// text examples and chats without an assistant message.
std::string expected_output(const Example& example);

// ---------------------------------------------------------------------------
// Train/eval split.

// Indices are positions in Dataset::examples (the file's valid examples).
struct DataSplit {
  std::string data_source;   // the data path when the split was made
  std::string data_sha256;   // of the data file's bytes
  std::string data_format;   // resolved format name
  int64_t num_examples = 0;  // valid examples in the file
  double eval_fraction = 0;
  uint64_t seed = 0;
  std::vector<int64_t> train;  // ascending
  std::vector<int64_t> eval;   // ascending
};

// eval count = ceil(eval_fraction * n) as datasets.train_test_split computes
// it, except that a product within 1e-9 of an integer counts as that integer
// (0.7 * 10 is 7, not 8). The eval examples are the first eval-count entries
// of seeded_permutation(n, seed); the rest train. Both lists are returned in
// ascending order. InputError when the fraction is outside [0, 1) or would
// leave no training example.
DataSplit make_split(const Dataset& dataset, double eval_fraction, uint64_t seed);

// Writes `<run_dir>/split.json` atomically (creating run_dir if needed);
// returns its path.
std::string write_split(const DataSplit& split, const std::string& run_dir);
// Reads a split.json written by write_split; InputError for a malformed file.
DataSplit read_split(const std::string& path);
// InputError when `dataset` is not the data the split was made from: the
// SHA-256 differs ("data changed since training"), or the valid-example count
// or format differs (other format or bad-line settings).
void check_split_matches(const DataSplit& split, const Dataset& dataset,
                         const std::string& split_path);

// The examples at `indices`, in that order.
std::vector<Example> select_examples(const Dataset& dataset, const std::vector<int64_t>& indices);

}  // namespace peftfw::data
