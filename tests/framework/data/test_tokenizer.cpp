// Tests for peftfw/data/tokenizer: the byte tokenizer's ids (written out by
// hand), a hand-made tokenizer.json whose BPE merges are worked through on
// paper, and the errors for malformed or unsupported tokenizer files. The
// parity with the `tokenizers` library is tokenizer_oracle.py's job.
#include "peftfw/io/fs.hpp"
#include "peftfw/data/tokenizer.hpp"

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "../../common/expect_error.hpp"
#include <nlohmann/json.hpp>

#include "peftfw/error.hpp"

namespace peftfw::data {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Ids = std::vector<int64_t>;

using peftfw::testing::expect_input_error;

// ---- byte tokenizer ---------------------------------------------------------------

TEST(ByteTokenizerTest, BytesAreIds) {
  const auto tok = make_byte_tokenizer();
  EXPECT_EQ(tok->encode("Hi!"), (Ids{72, 105, 33}));
  EXPECT_EQ(tok->encode("é"), (Ids{0xC3, 0xA9}));
  EXPECT_EQ(tok->encode("中"), (Ids{0xE4, 0xB8, 0xAD}));
  EXPECT_EQ(tok->encode("😀"), (Ids{0xF0, 0x9F, 0x98, 0x80}));
  EXPECT_EQ(tok->encode(std::string("a\0b", 3)), (Ids{97, 0, 98}));
  EXPECT_EQ(tok->encode(""), Ids{});
  EXPECT_EQ(tok->decode({72, 105, 33}), "Hi!");
  EXPECT_EQ(tok->decode({0xE4, 0xB8, 0xAD}), "中");
}

TEST(ByteTokenizerTest, SpecialTokensFollowTheBytes) {
  const auto tok = make_byte_tokenizer();
  EXPECT_EQ(tok->vocab_size(), 259);
  EXPECT_EQ(tok->token_id("<|end_of_text|>"), 256);
  EXPECT_EQ(tok->token_id("<|start_of_role|>"), 257);
  EXPECT_EQ(tok->token_id("<|end_of_role|>"), 258);
  EXPECT_EQ(tok->token_id("A"), 65);
  EXPECT_EQ(tok->token_id("AB"), std::nullopt);
  EXPECT_EQ(tok->eos_id(), 256);
  EXPECT_EQ(tok->pad_id(), 256);
  EXPECT_EQ(tok->bos_id(), std::nullopt);
  EXPECT_EQ(tok->name(), "byte");

  const std::string prompt = "<|start_of_role|>user<|end_of_role|>Hi<|end_of_text|>\n";
  const Ids ids = {257, 'u', 's', 'e', 'r', 258, 'H', 'i', 256, '\n'};
  EXPECT_EQ(tok->encode(prompt), ids);
  EXPECT_EQ(tok->decode(ids), prompt);
  EXPECT_EQ(tok->decode(ids, /*skip_special=*/true), "userHi\n");
  EXPECT_EQ(tok->add_template_tokens(ids), ids);

  // Without allow_special the markers are plain bytes.
  const Ids plain = tok->encode("<|end_of_text|>", /*allow_special=*/false);
  EXPECT_EQ(plain.size(), 15u);
  EXPECT_EQ(plain.front(), '<');
  // Near misses stay bytes.
  EXPECT_EQ(tok->encode("<|end_of_text|"), (Ids{'<', '|', 'e', 'n', 'd', '_', 'o', 'f', '_', 't',
                                               'e', 'x', 't', '|'}));
  EXPECT_EQ(tok->encode("<<|end_of_role|>>"), (Ids{'<', 258, '>'}));
}

TEST(ByteTokenizerTest, DecodeReplacesInvalidUtf8AndRejectsUnknownIds) {
  const auto tok = make_byte_tokenizer();
  const std::string replacement = "\xEF\xBF\xBD";
  EXPECT_EQ(tok->decode({0xE4, 0xB8}), replacement);  // a truncated character is one U+FFFD
  EXPECT_EQ(tok->decode({0xFF, 'a'}), replacement + "a");
  EXPECT_EQ(tok->decode({0xB8, 0xAD}), replacement + replacement);  // two stray continuations
  EXPECT_EQ(tok->decode({0xED, 0xA0, 0x80}), replacement + replacement + replacement);  // surrogate
  // As Python's bytes.decode("utf-8", "replace"): maximal subparts, overlongs, beyond U+10FFFF.
  EXPECT_EQ(tok->decode({0xF0, 0x9F, 0x98}), replacement);
  EXPECT_EQ(tok->decode({0xF0, 0x9F, 0x98, 0x80}), "\xF0\x9F\x98\x80");
  EXPECT_EQ(tok->decode({0xE0, 0x80, 0x80}), replacement + replacement + replacement);
  EXPECT_EQ(tok->decode({0xF4, 0x90, 0x80, 0x80}), replacement + replacement + replacement + replacement);
  EXPECT_EQ(tok->decode({'a', 0xC2}), "a" + replacement);
  expect_input_error([&] { tok->decode({'a', 259}); }, {"byte tokenizer", "259", "position 1"});
  expect_input_error([&] { tok->decode({-1}); }, {"-1"});
}

// ---- a hand-made tokenizer.json ---------------------------------------------------

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "peftfw_tokenizer_XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    peftfw::io::remove_tree(path_);
  }
  const fs::path& path() const { return path_; }

  fs::path write(const std::string& name, const std::string& text) const {
    const fs::path file = path_ / name;
    std::ofstream(file) << text;
    return file;
  }

 private:
  fs::path path_;
};

// Byte-level BPE over the alphabet a, b, c, Ġ (space) and Ċ (newline):
//   rank 0: a + b -> ab    rank 1: ab + c -> abc    rank 2: Ġ + ab -> Ġab
json tiny_tokenizer() {
  return json::parse(R"({
    "version": "1.0",
    "truncation": null,
    "padding": null,
    "added_tokens": [
      {"id": 8, "content": "<|end_of_text|>", "single_word": false, "lstrip": false,
       "rstrip": false, "normalized": false, "special": true}
    ],
    "normalizer": null,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "\\s+(?!\\S)|\\s+|[^\\s]+| ?\\S+"},
       "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
    ]},
    "post_processor": null,
    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                "use_regex": true},
    "model": {"type": "BPE", "dropout": null, "unk_token": null,
              "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
              "byte_fallback": false, "ignore_merges": false,
              "vocab": {"a": 0, "b": 1, "c": 2, "Ġ": 3, "Ċ": 4, "ab": 5, "abc": 6, "Ġab": 7},
              "merges": ["a b", "ab c", "Ġ ab"]}
  })");
}

TEST(HfTokenizerTest, EncodesByMergeRank) {
  TempDir dir;
  const auto tok = load_hf_tokenizer(dir.write("tokenizer.json", tiny_tokenizer().dump()));
  // "abc" -> a b c -> ab c -> abc
  EXPECT_EQ(tok->encode("abc"), Ids{6});
  // "cab": c a b -> c ab (no merge of c with ab)
  EXPECT_EQ(tok->encode("cab"), (Ids{2, 5}));
  // The split pattern keeps " " and "ab" apart, so Ġab is never formed.
  EXPECT_EQ(tok->encode("abc ab"), (Ids{6, 3, 5}));
  EXPECT_EQ(tok->encode("ab<|end_of_text|>\n"), (Ids{5, 8, 4}));
  // Without allow_special the special token is text, and '<' is not in this
  // vocabulary.
  expect_input_error([&] { tok->encode("<|end_of_text|>", /*allow_special=*/false); },
                     {"U+003C"});
  EXPECT_EQ(tok->encode(""), Ids{});
  EXPECT_EQ(tok->decode({6, 3, 5, 8, 4}), "abc ab<|end_of_text|>\n");
  EXPECT_EQ(tok->decode({6, 3, 5, 8, 4}, /*skip_special=*/true), "abc ab\n");
  EXPECT_EQ(tok->vocab_size(), 9);
  EXPECT_EQ(tok->token_id("Ġab"), 7);
  EXPECT_EQ(tok->token_id("<|end_of_text|>"), 8);
  EXPECT_EQ(tok->token_id("zzz"), std::nullopt);
  EXPECT_EQ(tok->eos_id(), std::nullopt);  // no tokenizer_config.json
  EXPECT_EQ(tok->name(), "hf:" + (dir.path() / "tokenizer.json").string());
}

TEST(HfTokenizerTest, ReadsPairMerges) {
  TempDir dir;
  json t = tiny_tokenizer();
  t["model"]["merges"] = json::parse(R"([["a", "b"], ["ab", "c"], ["Ġ", "ab"]])");
  const auto tok = load_hf_tokenizer(dir.write("tokenizer.json", t.dump()));
  EXPECT_EQ(tok->encode("abc cab"), (Ids{6, 3, 2, 5}));
}

TEST(HfTokenizerTest, ReadsSpecialTokensFromTokenizerConfig) {
  TempDir dir;
  const auto path = dir.write("tokenizer.json", tiny_tokenizer().dump());
  dir.write("tokenizer_config.json",
            R"({"eos_token": "<|end_of_text|>", "pad_token": {"content": "Ġab"},
                "bos_token": null, "chat_template": "..."})");
  const auto tok = load_hf_tokenizer(path);
  EXPECT_EQ(tok->eos_id(), 8);
  EXPECT_EQ(tok->pad_id(), 7);
  EXPECT_EQ(tok->bos_id(), std::nullopt);

  dir.write("tokenizer_config.json", R"({"eos_token": "</s>"})");
  expect_input_error([&] { load_hf_tokenizer(path); },
                     {(dir.path() / "tokenizer_config.json").string(), "eos_token", "\"</s>\"",
                      "not in the vocabulary"});
}

TEST(HfTokenizerTest, AppliesTemplateProcessing) {
  TempDir dir;
  json t = tiny_tokenizer();
  t["post_processor"] = json::parse(R"({"type": "Sequence", "processors": [
    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
    {"type": "TemplateProcessing",
     "single": [{"SpecialToken": {"id": "<|end_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}],
     "pair": [], "special_tokens": {"<|end_of_text|>": {"id": "<|end_of_text|>", "ids": [8],
                                                        "tokens": ["<|end_of_text|>"]}}}]})");
  const auto tok = load_hf_tokenizer(dir.write("tokenizer.json", t.dump()));
  EXPECT_EQ(tok->add_template_tokens(tok->encode("abc")), (Ids{8, 6}));
}

TEST(HfTokenizerTest, EncodeAndDecodeRejectWhatTheyCannotHandle) {
  TempDir dir;
  const auto tok = load_hf_tokenizer(dir.write("tokenizer.json", tiny_tokenizer().dump()));
  expect_input_error([&] { tok->encode("ab\xFF"); }, {"not valid UTF-8", "0xFF", "offset 2"});
  // "d" is a byte-level character outside this vocabulary; there is no unk_token.
  expect_input_error([&] { tok->encode("abd"); }, {"U+0064", "no unk_token"});
  expect_input_error([&] { tok->decode({6, 9}); }, {"token id 9", "position 1"});
}

TEST(HfTokenizerTest, EncodesFromManyThreads) {
  TempDir dir;
  const auto tok = load_hf_tokenizer(dir.write("tokenizer.json", tiny_tokenizer().dump()));
  // "  \n" at the end is one pre-token, ĠĠĊ, with no merges.
  const Ids expected = {6, 3, 2, 5, 3, 5, 3, 3, 4};
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (std::size_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 500; ++i) ok[t] += tok->encode("abc cab ab  \n") == expected;
    });
  }
  for (auto& th : threads) th.join();
  for (const int n : ok) EXPECT_EQ(n, 500);
}

// ---- malformed and unsupported files ----------------------------------------------

// Writes `t` and expects loading it to fail naming the file and `fragments`.
void expect_load_error(const json& t, std::vector<std::string> fragments) {
  TempDir dir;
  const auto path = dir.write("tokenizer.json", t.dump());
  fragments.push_back(path.string() + ": ");
  expect_input_error([&] { load_hf_tokenizer(path); }, fragments);
}

TEST(HfTokenizerErrorsTest, MissingModel) {
  json t = tiny_tokenizer();
  t.erase("model");
  expect_load_error(t, {"model: missing"});
}

TEST(HfTokenizerErrorsTest, UnsupportedModelType) {
  json t = tiny_tokenizer();
  t["model"]["type"] = "WordPiece";
  expect_load_error(t, {"model.type", "unsupported model \"WordPiece\"", "supports BPE"});
}

TEST(HfTokenizerErrorsTest, SequencesNestedTooDeep) {
  // 33 Sequences, one inside the other, around a ByteLevel step.
  json inner = {{"type", "ByteLevel"}};
  for (int i = 0; i < 33; ++i) inner = {{"type", "Sequence"}, {"pretokenizers", {inner}}};
  json t = tiny_tokenizer();
  t["pre_tokenizer"] = inner;
  expect_load_error(t, {"Sequence nested more than 32 deep"});
  // 32 load.
  t["pre_tokenizer"] = inner["pretokenizers"][0];
  TempDir dir;
  EXPECT_NO_THROW(load_hf_tokenizer(dir.write("tokenizer.json", t.dump())));
}

TEST(HfTokenizerErrorsTest, AddedTokenPastTheLargestId) {
  // "a" holds id 2^31 - 1; the next added token would be numbered 2^31.
  json t = tiny_tokenizer();
  t["model"]["vocab"] = {{"a", 2147483647}};
  t["model"]["merges"] = json::array();
  t["added_tokens"] = json::parse(R"([{"id": 2147483647, "content": "a"},
                                      {"id": 0, "content": "b"}])");
  expect_load_error(t, {"added_tokens[1].id: the added token \"b\" would be numbered past the "
                        "largest token id 2147483647"});
}

TEST(HfTokenizerErrorsTest, LongStringsFromTheFileAreCut) {
  json t = tiny_tokenizer();
  t["model"]["type"] = std::string(5000, 'W');
  expect_load_error(t, {"model.type: unsupported model \"" + std::string(200, 'W') +
                        "...\" (5000 bytes in all); peftfw supports BPE"});
}

TEST(HfTokenizerErrorsTest, BadMergesEntries) {
  json t = tiny_tokenizer();
  t["model"]["merges"][1] = "ab";
  expect_load_error(t, {"model.merges[1]", "expected \"a b\"", "found string \"ab\""});
  t["model"]["merges"] = json::parse(R"([["a", "b"], ["ab", "c", "d"]])");
  expect_load_error(t, {"model.merges[1]", "array of 3 elements"});
  t = tiny_tokenizer();
  t["model"]["merges"][1] = 7;
  expect_load_error(t, {"model.merges[1]", "integer 7"});
  t["model"]["merges"][1] = "ab zz";
  expect_load_error(t, {"model.merges[1]", "token \"zz\" is not in model.vocab"});
  t["model"]["merges"][1] = "c a";
  expect_load_error(t, {"model.merges[1]", "merged token \"ca\" is not in model.vocab"});
  t["model"]["merges"][1] = json::array({"ab", "c"});
  expect_load_error(t, {"model.merges[1]", "use either \"a b\" strings or [\"a\", \"b\"] pairs"});
}

TEST(HfTokenizerErrorsTest, BadVocabulary) {
  json t = tiny_tokenizer();
  t["model"]["vocab"]["zz"] = 3;
  expect_load_error(t, {"model.vocab", "id 3", "every token needs its own id"});
  t = tiny_tokenizer();
  t["model"]["vocab"]["zz"] = "seven";
  expect_load_error(t, {"model.vocab[\"zz\"]", "expected a token id", "string \"seven\""});
  t = tiny_tokenizer();
  t["model"]["unk_token"] = "<unk>";
  expect_load_error(t, {"model.unk_token", "\"<unk>\" is not in model.vocab"});
  t = tiny_tokenizer();
  t["model"]["dropout"] = 0.1;
  expect_load_error(t, {"model.dropout", "set it to null"});
}

TEST(HfTokenizerErrorsTest, UnsupportedComponents) {
  json t = tiny_tokenizer();
  t["normalizer"] = json::parse(R"({"type": "NFC"})");
  expect_load_error(t, {"normalizer.type", "unsupported normalizer \"NFC\"", "supports null"});

  t = tiny_tokenizer();
  t["pre_tokenizer"]["pretokenizers"][1] = json::parse(R"({"type": "Metaspace"})");
  expect_load_error(t, {"pre_tokenizer.pretokenizers[1].type", "unsupported pre-tokenizer "
                        "\"Metaspace\"", "Sequence, Split, ByteLevel and Digits"});

  t = tiny_tokenizer();
  t["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways";
  expect_load_error(t, {"pre_tokenizer.pretokenizers[0].behavior", "\"Sideways\"", "Isolated"});

  t = tiny_tokenizer();
  t["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  expect_load_error(t, {"pre_tokenizer.pretokenizers[0].pattern.Regex", "invalid regex (unclosed"});

  t = tiny_tokenizer();
  t["decoder"] = json::parse(R"({"type": "WordPiece", "prefix": "##"})");
  expect_load_error(t, {"decoder.type", "unsupported decoder \"WordPiece\"", "ByteLevel"});

  t = tiny_tokenizer();
  t["post_processor"] = json::parse(R"({"type": "BertProcessing"})");
  expect_load_error(t, {"post_processor.type", "\"BertProcessing\"", "TemplateProcessing"});

  t = tiny_tokenizer();
  t["model"].erase("type");
  expect_load_error(t, {"model.type", "missing model type"});
}

TEST(HfTokenizerErrorsTest, AddedTokenIdsMustMatchTheLibrary) {
  // The library numbers a new added token from the vocabulary's size (8), so
  // a file that says 9 leaves a hole the library would close.
  json t = tiny_tokenizer();
  t["added_tokens"][0]["id"] = 9;
  expect_load_error(t, {"added_tokens[0].id", "has id 9 here", "gives it id 8"});
  // A token the vocabulary already holds keeps the vocabulary's id.
  t = tiny_tokenizer();
  t["added_tokens"].push_back(json::parse(
      R"({"id": 9, "content": "abc", "single_word": false, "lstrip": false, "rstrip": false,
          "normalized": false, "special": true})"));
  expect_load_error(t, {"added_tokens[1].id", "gives it id 6"});
  t = tiny_tokenizer();
  t["added_tokens"][0].erase("content");
  expect_load_error(t, {"added_tokens[0].content: missing"});
}

TEST(HfTokenizerErrorsTest, FileProblems) {
  TempDir dir;
  expect_input_error([&] { load_hf_tokenizer(dir.path() / "nope.json"); },
                     {(dir.path() / "nope.json").string(), "no such file"});
  const auto path = dir.write("tokenizer.json", "{\"model\": ");
  expect_input_error([&] { load_hf_tokenizer(path); }, {path.string() + ":1:", "invalid JSON"});
  const auto array = dir.write("array.json", "[1]");
  expect_input_error([&] { load_hf_tokenizer(array); }, {array.string(), "expected an object"});
}

}  // namespace
}  // namespace peftfw::data
