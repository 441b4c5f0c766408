// Tokenizers: Hugging Face `tokenizer.json` (byte-level BPE, the
// usual kind) and a built-in byte tokenizer for tiny and demo models.
//
// The Hugging Face tokenizer reproduces the Python `tokenizers` library
// (tests/framework/data/tokenizer_oracle.py checks it id for id): added tokens
// are split out first (leftmost-longest exact match, with their lstrip,
// rstrip, single_word and normalized flags), then each remaining piece goes
// through the pre-tokenizer and the BPE model; decoding runs the decoder over
// the tokens and replaces invalid UTF-8 with U+FFFD, as the library does.
// Supported parts of tokenizer.json:
//   model           BPE (vocab, merges as "a b" strings or ["a", "b"] pairs,
//                   unk_token, fuse_unk, byte_fallback, ignore_merges,
//                   continuing_subword_prefix, end_of_word_suffix; dropout
//                   null or 0)
//   normalizer      null
//   pre_tokenizer   null, Sequence, Split (Regex or String pattern, every
//                   behavior, invert), ByteLevel, Digits
//   decoder         null, ByteLevel
//   post_processor  null, ByteLevel, TemplateProcessing, Sequence of these
// Anything else is an InputError naming the file, the JSON path of the part
// and what is supported. Split regexes are Oniguruma patterns; they run on
// PCRE2 with \s, \S, \w, \W, \h and POSIX classes rewritten to Oniguruma's
// meaning. One difference remains: character properties come from PCRE2's
// Unicode tables (Debian 12's PCRE2 10.42: Unicode 14) where the library's
// Oniguruma has Unicode 16, so characters of scripts added since (Kawi, CJK
// extensions H and I, ...) are unassigned to peftfw and may pre-tokenize
// differently. Every code point assigned in Unicode 14 is checked.
//
// Where peftfw is stricter than the library (it fails where the library
// would warn or drop something silently):
//   * an added token whose id in the file differs from the id the library
//     assigns on load (a hole in the vocabulary, a clash with a model token)
//     is an InputError at load time;
//   * a character that is neither in the vocabulary nor covered by unk_token
//     or byte_fallback is an InputError in encode (the library drops it);
//   * an id outside the vocabulary is an InputError in decode (the library
//     skips it);
//   * text that is not valid UTF-8 is an InputError in encode;
//   * an unk_token missing from the vocabulary, two tokens with one id, and
//     BPE dropout are InputErrors at load time.
// "truncation" and "padding" in tokenizer.json are ignored: the recipe sets
// sequence lengths.
//
// Everything here is torch-free; encode and decode are thread-safe.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace peftfw::data {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Token ids of `text`, without the post-processor's extra tokens (the
  // library's encode(text, add_special_tokens=False)). With allow_special,
  // special tokens written in the text (e.g. "<|end_of_text|>") become their
  // ids; without, they are tokenized as ordinary text (the library's
  // encode_special_tokens = True), so user data cannot inject them.
  virtual std::vector<int64_t> encode(std::string_view text, bool allow_special = true) const = 0;
  // Text of `ids`; skip_special leaves special tokens out. Invalid UTF-8
  // (e.g. half of a multi-byte character) comes back as U+FFFD.
  virtual std::string decode(const std::vector<int64_t>& ids, bool skip_special = false) const = 0;
  // One past the largest id: an embedding needs at least this many rows.
  virtual int64_t vocab_size() const = 0;
  // The id of a token written in the vocabulary's own spelling (byte-level
  // BPE: "Ġthe" for " the"), added tokens included.
  virtual std::optional<int64_t> token_id(std::string_view token) const = 0;
  virtual std::optional<int64_t> bos_id() const = 0;
  virtual std::optional<int64_t> eos_id() const = 0;
  virtual std::optional<int64_t> pad_id() const = 0;
  // `ids` with the tokens the post-processor adds around a single sequence
  // (TemplateProcessing, e.g. a BOS); unchanged when there is none, as for
  // byte-level BPE files without a post-processor and the byte tokenizer. encode + add_template_tokens equals
  // the library's encode(text, add_special_tokens=True).
  virtual std::vector<int64_t> add_template_tokens(std::vector<int64_t> ids) const = 0;
  // "byte", or "hf:<path of tokenizer.json>".
  virtual std::string name() const = 0;
};

// Loads a Hugging Face tokenizer.json. bos/eos/pad come from a
// tokenizer_config.json in the same directory (its bos_token, eos_token and
// pad_token, as strings or {"content": ...} objects); without that file they
// are unset. Throws InputError for a missing or malformed file, an
// unsupported component, or a config token that is not in the vocabulary.
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::filesystem::path& tokenizer_json);

// The byte tokenizer: ids 0..255 are the bytes of the UTF-8 text, then
//   256 <|end_of_text|>  (eos and pad)
//   257 <|start_of_role|>
//   258 <|end_of_role|>
// so that role-token chat formats work on tiny models. vocab_size() is
// 259; a model may have a larger embedding. There is no bos.
std::unique_ptr<Tokenizer> make_byte_tokenizer();

inline constexpr int64_t kByteTokenizerVocabSize = 259;

}  // namespace peftfw::data
