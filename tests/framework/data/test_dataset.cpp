// Tests for peftfw/data/dataset: the seeded PRNG and SHA-256 against published
// vectors and an independent Python implementation, JSONL error reports, format
// detection, template rendering, and the train/eval split with split.json.
#include "peftfw/io/fs.hpp"
#include "peftfw/data/dataset.hpp"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"

#ifndef PEFTFW_TEST_DATA_DIR
#error "PEFTFW_TEST_DATA_DIR must name the tests/ folder"
#endif

namespace peftfw::data {
namespace {

// Granite 4.0's chat format, as the granite_hybrid plugin supplies it.
const ChatFormat kGraniteChat{"granite", "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>\n",
                              "Granite 4.0 role tokens"};
PromptTemplate granite_template(std::string system = kDefaultSystemPrompt) {
  return PromptTemplate::chat(kGraniteChat, std::move(system));
}

namespace fs = std::filesystem;

std::string input_error_message(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const InputError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<other exception> ") + e.what();
  }
  return "<nothing thrown>";
}

void expect_contains(const std::string& message, const std::string& fragment) {
  EXPECT_NE(message.find(fragment), std::string::npos)
      << "message lacks \"" << fragment << "\"\nmessage: " << message;
}

const std::string kFiles = std::string(PEFTFW_TEST_DATA_DIR) + "/framework/data/files";

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() /
            ("peftfw_test_dataset_" + std::to_string(::getpid()) + "_" + std::to_string(count_++));
    peftfw::io::remove_tree(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { peftfw::io::remove_tree(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string path() const { return path_.string(); }

 private:
  static inline int count_ = 0;
  fs::path path_;
};

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// ---------------------------------------------------------------------------
// Random numbers and hashing.

TEST(SplitMix64, MatchesReferenceOutputs) {
  // Vigna's splitmix64.c seeded with 1234567 (the values Java's
  // SplittableRandom and other ports test against).
  SplitMix64 rng(1234567);
  EXPECT_EQ(rng.next(), 6457827717110365317ULL);
  EXPECT_EQ(rng.next(), 3203168211198807973ULL);
  EXPECT_EQ(rng.next(), 9817491932198370423ULL);
  EXPECT_EQ(rng.next(), 4593380528125082431ULL);
  EXPECT_EQ(rng.next(), 16408922859458223821ULL);
}

TEST(SplitMix64, BelowStaysInRange) {
  SplitMix64 rng(5);
  for (int i = 0; i < 1000; ++i) {
    EXPECT_LT(rng.below(7), 7u);
    const int64_t v = rng.between(-3, 3);
    EXPECT_GE(v, -3);
    EXPECT_LE(v, 3);
  }
  EXPECT_EQ(SplitMix64(1).below(1), 0u);
}

TEST(SeededPermutation, MatchesIndependentImplementation) {
  // Expected values from a separate Python implementation of the documented
  // algorithm (SplitMix64, rejection sampling, Fisher-Yates from the back).
  EXPECT_EQ(seeded_permutation(10, 42), (std::vector<int64_t>{0, 9, 5, 8, 6, 4, 7, 2, 1, 3}));
  EXPECT_EQ(seeded_permutation(10, 7), (std::vector<int64_t>{8, 1, 5, 9, 0, 4, 3, 2, 6, 7}));
  EXPECT_EQ(derive_seed(42, 0), 5006236285904387910ULL);
  EXPECT_EQ(derive_seed(42, 1), 12234890524640051791ULL);
  EXPECT_TRUE(seeded_permutation(0, 1).empty());
  EXPECT_EQ(seeded_permutation(1, 1), std::vector<int64_t>{0});
}

TEST(Sha256, PublishedVectors) {
  // FIPS 180-4 examples.
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  // Lengths around the padding boundary (55, 56, 64 bytes), from sha256sum.
  EXPECT_EQ(sha256_hex(std::string(55, 'a')),
            "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318");
  EXPECT_EQ(sha256_hex(std::string(56, 'a')),
            "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a");
  EXPECT_EQ(sha256_hex(std::string(64, 'a')),
            "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb");
}

// ---------------------------------------------------------------------------
// JSONL.

TEST(Jsonl, MalformedLinesStopTheRunWithFileAndLine) {
  const std::string path = kFiles + "/bad_lines.jsonl";
  const std::string message = input_error_message([&] { read_jsonl(path); });
  const std::string expected =
      path + ": 5 malformed lines (data.on_bad_line = \"error\"):\n" +
      "  " + path + ":3: invalid JSON at column 39: syntax error while parsing value - " +
      "unexpected end of input; expected '[', '{', or a literal\n" +
      "  " + path + ":4: expected a JSON object, found array of 2 elements\n" +
      "  " + path + ":5: field 'input': expected a string, found integer 3\n" +
      "  " + path + ":6: missing field 'instruction' (format instruction, detected from line 1)\n" +
      "  " + path + ":9: missing field 'output' (format instruction, detected from line 1)\n" +
      "Fix or remove them, or set data.on_bad_line = \"skip\" to train without them (the run " +
      "reports how many were skipped).";
  EXPECT_EQ(message, expected);
}

TEST(Jsonl, SkipPolicyCountsAndKeepsTheFirstMessages) {
  const std::string path = kFiles + "/bad_lines.jsonl";
  const Dataset ds = read_jsonl(path, {DataFormat::Auto, BadLinePolicy::Skip});
  EXPECT_EQ(ds.format, DataFormat::Instruction);
  EXPECT_EQ(ds.format_line, 1);
  ASSERT_EQ(ds.examples.size(), 2u);
  EXPECT_EQ(ds.examples[0].line, 1);
  EXPECT_EQ(ds.examples[1].line, 8);
  const auto& first = std::get<InstructionExample>(ds.examples[0].body);
  EXPECT_EQ(first.instruction, "Classify.");
  EXPECT_EQ(first.input, "a\tb");
  EXPECT_EQ(first.output, "x");
  // A missing input reads as "".
  EXPECT_EQ(std::get<InstructionExample>(ds.examples[1].body).input, "");
  EXPECT_EQ(ds.skipped.count, 5);
  ASSERT_EQ(ds.skipped.first.size(), 5u);
  EXPECT_EQ(ds.skipped.first[1], path + ":4: expected a JSON object, found array of 2 elements");
  EXPECT_EQ(ds.skipped.skipped_summary(),
            "skipped 5 malformed lines (first: " + path +
                ":3: invalid JSON at column 39: syntax error while parsing value - unexpected "
                "end of input; expected '[', '{', or a literal)");
}

TEST(Jsonl, ErrorListsTwentyLinesAndTheTotal) {
  std::string text = "{\"text\": \"ok\"}\n";
  for (int i = 0; i < 25; ++i) text += "{\"text\": 1}\n";
  const std::string message = input_error_message([&] { parse_jsonl(text, "d.jsonl"); });
  expect_contains(message, "d.jsonl: 25 malformed lines (data.on_bad_line = \"error\"):\n");
  expect_contains(message, "  d.jsonl:2: field 'text': expected a string, found integer 1\n");
  expect_contains(message, "  d.jsonl:21: field 'text'");
  EXPECT_EQ(message.find("d.jsonl:22:"), std::string::npos) << message;
  expect_contains(message, "  ... and 5 more\n");

  const Dataset ds = parse_jsonl(text, "d.jsonl", {DataFormat::Auto, BadLinePolicy::Skip});
  EXPECT_EQ(ds.skipped.count, 25);
  EXPECT_EQ(ds.skipped.first.size(), BadLines::kMaxListed);
}

TEST(Jsonl, OneBadLineReadsInTheSingular) {
  const std::string text = "{\"text\": \"a\"}\n{\"text\": \"b\"\n";
  const std::string message = input_error_message([&] { parse_jsonl(text, "one.jsonl"); });
  expect_contains(message, "one.jsonl: 1 malformed line (data.on_bad_line = \"error\"):\n");
  expect_contains(message, "Fix or remove it, or set data.on_bad_line = \"skip\" to train "
                           "without it");
  const Dataset ds = parse_jsonl(text, "one.jsonl", {DataFormat::Auto, BadLinePolicy::Skip});
  EXPECT_EQ(ds.skipped.skipped_summary().rfind("skipped 1 malformed line (one.jsonl:2: ", 0), 0u)
      << ds.skipped.skipped_summary();
}

TEST(Jsonl, BlankLinesCrlfAndBomAreFine) {
  const std::string text = "\xEF\xBB\xBF{\"text\": \"a\"}\r\n\r\n \t \n{\"text\": \"b\"}";
  const Dataset ds = parse_jsonl(text, "x.jsonl");
  ASSERT_EQ(ds.examples.size(), 2u);
  EXPECT_EQ(std::get<TextExample>(ds.examples[0].body).text, "a");
  EXPECT_EQ(ds.examples[1].line, 4);
  EXPECT_EQ(ds.skipped.count, 0);
  EXPECT_EQ(ds.skipped.skipped_summary(), "");
}

TEST(Jsonl, NoExamples) {
  EXPECT_EQ(input_error_message([] { parse_jsonl("\n  \n", "e.jsonl"); }),
            "e.jsonl: no examples: the file is empty or holds only blank lines");
  EXPECT_EQ(input_error_message([] {
              parse_jsonl("[]\n", "e.jsonl", {DataFormat::Auto, BadLinePolicy::Skip});
            }),
            "e.jsonl: no valid examples: all 1 non-blank lines are malformed (first: "
            "e.jsonl:1: expected a JSON object, found array of 0 elements)");
  const std::string missing = kFiles + "/does_not_exist.jsonl";
  EXPECT_NE(input_error_message([&] { read_jsonl(missing); }).find(missing), std::string::npos);
}

TEST(Jsonl, AutoDetectsEachFormat) {
  const Dataset text = parse_jsonl("{\"text\": \"hello\", \"id\": 3}\n", "t.jsonl");
  EXPECT_EQ(text.format, DataFormat::Text);
  EXPECT_EQ(std::get<TextExample>(text.examples[0].body).text, "hello");

  const Dataset chat = parse_jsonl(
      "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, "
      "{\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
      "c.jsonl");
  EXPECT_EQ(chat.format, DataFormat::Messages);
  const auto& m = std::get<ChatExample>(chat.examples[0].body).messages;
  ASSERT_EQ(m.size(), 2u);
  EXPECT_EQ(m[1].role, "assistant");
  EXPECT_EQ(m[1].content, "yo");

  const Dataset ins = parse_jsonl("{\"instruction\": \"i\", \"input\": null, \"output\": \"o\"}",
                                  "i.jsonl");
  EXPECT_EQ(ins.format, DataFormat::Instruction);
  EXPECT_EQ(std::get<InstructionExample>(ins.examples[0].body).input, "");
}

TEST(Jsonl, AutoDetectionUsesTheFirstValidLine) {
  // Line 1 looks like instruction data but lacks output; line 2 is text, so
  // the file is text and line 3 (instruction) does not fit.
  const std::string text =
      "{\"instruction\": \"x\"}\n{\"text\": \"t\"}\n{\"instruction\": \"a\", \"output\": \"b\"}\n"
      "{\"foo\": 1, \"bar\": 2}\n";
  const Dataset ds = parse_jsonl(text, "m.jsonl", {DataFormat::Auto, BadLinePolicy::Skip});
  EXPECT_EQ(ds.format, DataFormat::Text);
  EXPECT_EQ(ds.format_line, 2);
  ASSERT_EQ(ds.skipped.first.size(), 3u);
  EXPECT_EQ(ds.skipped.first[0], "m.jsonl:1: missing field 'output'");
  EXPECT_EQ(ds.skipped.first[1],
            "m.jsonl:3: missing field 'text' (format text, detected from line 2)");
  EXPECT_EQ(ds.skipped.first[2], "m.jsonl:4: missing field 'text' (format text, detected from "
                                 "line 2)");
}

TEST(Jsonl, AutoDetectionNamesTheFieldsWhenNothingFits) {
  const Dataset ds = parse_jsonl("{\"foo\": 1, \"bar\": 2}\n{\"text\": \"t\"}\n", "n.jsonl",
                                 {DataFormat::Auto, BadLinePolicy::Skip});
  ASSERT_EQ(ds.skipped.first.size(), 1u);
  EXPECT_EQ(ds.skipped.first[0],
            "n.jsonl:1: cannot tell the format: no field 'instruction', 'text' or 'messages' "
            "(fields: bar, foo; data.format = auto)");
}

// Hostile lines: a message quotes at most 200 bytes of a line, and says how long it was.
TEST(Jsonl, HugeLinesAreNotEchoedBack) {
  // An unclosed string: nlohmann quotes the token read so far, the quote and 10^6 bytes.
  const std::string line = "{\"text\": \"" + std::string(1000000, 'a');
  const Dataset ds = parse_jsonl(line + "\n{\"text\": \"ok\"}\n", "big.jsonl",
                                 {DataFormat::Auto, BadLinePolicy::Skip});
  ASSERT_EQ(ds.skipped.first.size(), 1u);
  const std::string& message = ds.skipped.first[0];
  EXPECT_LT(message.size(), 500u) << message.substr(0, 600);
  expect_contains(message, "big.jsonl:1: invalid JSON at column ");
  expect_contains(message, "missing closing quote; last read: '\"" + std::string(199, 'a') +
                               "...' (1000001 bytes in all)");
  // An object of 1000 unknown fields: the field list is cut too.
  std::string fields = "{";
  for (int i = 0; i < 1000; ++i) fields += (i ? ", \"f" : "\"f") + std::to_string(i) + "\": 1";
  const Dataset many = parse_jsonl(fields + "}\n{\"text\": \"ok\"}\n", "wide.jsonl",
                                   {DataFormat::Auto, BadLinePolicy::Skip});
  ASSERT_EQ(many.skipped.first.size(), 1u);
  EXPECT_LT(many.skipped.first[0].size(), 500u) << many.skipped.first[0].substr(0, 600);
  expect_contains(many.skipped.first[0], "(fields: f0, f1, f10, f100, ");
  expect_contains(many.skipped.first[0], "... (1000 fields); data.format = auto)");
}

TEST(Jsonl, NumberBeyondADoubleIsABadLine) {
  const Dataset ds = parse_jsonl("{\"text\": \"a\", \"score\": 1e400}\n{\"text\": \"b\"}\n",
                                 "n.jsonl", {DataFormat::Auto, BadLinePolicy::Skip});
  ASSERT_EQ(ds.skipped.first.size(), 1u);
  EXPECT_EQ(ds.skipped.first[0],
            "n.jsonl:1: invalid JSON: number overflow parsing '1e400' (a number beyond the range "
            "of a 64-bit float)");
  EXPECT_EQ(ds.examples.size(), 1u);
}

TEST(Jsonl, ExplicitFormatAndChatFieldErrors) {
  const std::string text =
      "{\"text\": \"t\"}\n"
      "{\"messages\": []}\n"
      "{\"messages\": \"hi\"}\n"
      "{\"messages\": [{\"role\": \"user\"}]}\n"
      "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, 5]}\n"
      "{\"messages\": [{\"role\": \"\", \"content\": \"a\"}]}\n"
      "{\"messages\": [{\"role\": \"user\", \"content\": [1]}]}\n"
      "{\"messages\": [{\"role\": \"user\", \"content\": \"ok\"}]}\n";
  const Dataset ds =
      parse_jsonl(text, "chat.jsonl", {DataFormat::Messages, BadLinePolicy::Skip});
  EXPECT_EQ(ds.format, DataFormat::Messages);
  EXPECT_EQ(ds.format_line, 0);
  ASSERT_EQ(ds.examples.size(), 1u);
  EXPECT_EQ(ds.examples[0].line, 8);
  const std::vector<std::string> expected = {
      "chat.jsonl:1: missing field 'messages' (data.format = messages)",
      "chat.jsonl:2: field 'messages': expected at least one message, found an empty array",
      "chat.jsonl:3: field 'messages': expected an array of {role, content} objects, found "
      "string \"hi\"",
      "chat.jsonl:4: missing field 'messages[0].content'",
      "chat.jsonl:5: field 'messages[1]': expected an object with role and content, found "
      "integer 5",
      "chat.jsonl:6: field 'messages[0].role': expected a non-empty string, found string \"\"",
      "chat.jsonl:7: field 'messages[0].content': expected a string, found array of 1 element",
  };
  EXPECT_EQ(ds.skipped.first, expected);
}

TEST(Jsonl, FormatAndPolicyNames) {
  EXPECT_EQ(data_format_from_name("messages"), DataFormat::Messages);
  EXPECT_EQ(data_format_from_name("chat"), std::nullopt);
  EXPECT_STREQ(data_format_name(DataFormat::Instruction), "instruction");
  EXPECT_EQ(bad_line_policy_from_name("skip"), BadLinePolicy::Skip);
  EXPECT_EQ(bad_line_policy_from_name("warn"), std::nullopt);
}

TEST(Jsonl, HashIsOfTheFileBytes) {
  TempDir dir;
  const std::string path = dir.file("d.jsonl");
  write_text(path, "{\"text\": \"abc\"}\n");
  // sha256sum of the 16 bytes {"text": "abc"}\n.
  EXPECT_EQ(read_jsonl(path).sha256,
            "b3b44c015f2cfd9f6727c04576599da0309a65ffc71323b91e87b469177983c2");
}

// ---------------------------------------------------------------------------
// Templates.

Example instruction(const std::string& ins, const std::string& input, const std::string& out) {
  return Example{InstructionExample{ins, input, out}, 1};
}

TEST(Template, GraniteWithInputIsTheStudyText) {
  const auto r = granite_template().render(
      instruction("Classify this document and return the schema label.", "a\tb\n1\t2",
                  "access_review"));
  ASSERT_EQ(r.segments.size(), 2u);
  EXPECT_FALSE(r.segments[0].response);
  EXPECT_EQ(r.segments[0].text,
            "<|start_of_role|>system<|end_of_role|>You are a compliance analysis "
            "assistant.<|end_of_text|>\n"
            "<|start_of_role|>user<|end_of_role|>Classify this document and return the schema "
            "label.\n\na\tb\n1\t2<|end_of_text|>\n"
            "<|start_of_role|>assistant<|end_of_role|>");
  EXPECT_TRUE(r.segments[1].response);
  EXPECT_EQ(r.segments[1].text, "access_review<|end_of_text|>\n");
}

TEST(Template, GraniteEmptyInputDropsTheBlankLine) {
  const auto ex = instruction("Say hi.", "", "hi");
  const auto t = granite_template();
  EXPECT_EQ(t.render(ex).text(),
            "<|start_of_role|>system<|end_of_role|>You are a compliance analysis "
            "assistant.<|end_of_text|>\n"
            "<|start_of_role|>user<|end_of_role|>Say hi.<|end_of_text|>\n"
            "<|start_of_role|>assistant<|end_of_role|>hi<|end_of_text|>\n");
  EXPECT_EQ(t.render_prompt(ex),
            "<|start_of_role|>system<|end_of_role|>You are a compliance analysis "
            "assistant.<|end_of_text|>\n"
            "<|start_of_role|>user<|end_of_role|>Say hi.<|end_of_text|>\n"
            "<|start_of_role|>assistant<|end_of_role|>");
  EXPECT_EQ(expected_output(ex), "hi");
}

TEST(Template, GraniteSystemTextIsAParameter) {
  const auto ex = instruction("Q", "", "A");
  EXPECT_EQ(granite_template("Be brief.").render(ex).text(),
            "<|start_of_role|>system<|end_of_role|>Be brief.<|end_of_text|>\n"
            "<|start_of_role|>user<|end_of_role|>Q<|end_of_text|>\n"
            "<|start_of_role|>assistant<|end_of_role|>A<|end_of_text|>\n");
  EXPECT_EQ(granite_template("").render(ex).text(),
            "<|start_of_role|>user<|end_of_role|>Q<|end_of_text|>\n"
            "<|start_of_role|>assistant<|end_of_role|>A<|end_of_text|>\n");
}

TEST(Template, Alpaca) {
  const auto t = PromptTemplate::alpaca();
  const auto with_input = t.render(instruction("Add.", "2 3", "5"));
  ASSERT_EQ(with_input.segments.size(), 2u);
  EXPECT_EQ(with_input.segments[0].text,
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nAdd.\n\n### Input:\n2 3\n\n### Response:\n");
  EXPECT_EQ(with_input.segments[1].text, "5");
  EXPECT_EQ(t.render_prompt(instruction("Greet.", "", "Hello")),
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nGreet.\n\n### Response:\n");
}

TEST(Template, RawRendersTextAsIsAllResponse) {
  const Example ex{TextExample{"plain text"}, 4};
  const auto r = PromptTemplate::raw().render(ex);
  ASSERT_EQ(r.segments.size(), 1u);
  EXPECT_TRUE(r.segments[0].response);
  EXPECT_EQ(r.segments[0].text, "plain text");
  EXPECT_EQ(input_error_message([&] { PromptTemplate::raw().render_prompt(ex); }),
            "line 4: text examples have no prompt/response split to evaluate on; evaluation "
            "needs instruction or messages data");
}

TEST(Template, ChatUsesRoleTokensAndTrainsAssistantTurns) {
  const Example ex{ChatExample{{{"system", "S"},
                                {"user", "U1"},
                                {"assistant", "A1"},
                                {"user", "U2"},
                                {"assistant", "A2"}}},
                   2};
  const auto t = granite_template();
  const auto r = t.render(ex);
  ASSERT_EQ(r.segments.size(), 4u);
  EXPECT_EQ(r.segments[0].text,
            "<|start_of_role|>system<|end_of_role|>S<|end_of_text|>\n"
            "<|start_of_role|>user<|end_of_role|>U1<|end_of_text|>\n"
            "<|start_of_role|>assistant<|end_of_role|>");
  EXPECT_EQ(r.segments[1].text, "A1<|end_of_text|>\n");
  EXPECT_TRUE(r.segments[1].response);
  EXPECT_EQ(r.segments[2].text,
            "<|start_of_role|>user<|end_of_role|>U2<|end_of_text|>\n"
            "<|start_of_role|>assistant<|end_of_role|>");
  EXPECT_FALSE(r.segments[2].response);
  EXPECT_EQ(r.segments[3].text, "A2<|end_of_text|>\n");
  EXPECT_EQ(t.render_prompt(ex),
            "<|start_of_role|>system<|end_of_role|>S<|end_of_text|>\n"
            "<|start_of_role|>user<|end_of_role|>U1<|end_of_text|>\n"
            "<|start_of_role|>assistant<|end_of_role|>A1<|end_of_text|>\n"
            "<|start_of_role|>user<|end_of_role|>U2<|end_of_text|>\n"
            "<|start_of_role|>assistant<|end_of_role|>");
  EXPECT_EQ(expected_output(ex), "A2");

  const Example no_answer{ChatExample{{{"user", "hi"}}}, 9};
  EXPECT_EQ(input_error_message([&] { t.render_prompt(no_answer); }),
            "line 9: the chat has no assistant message to evaluate against");
}

TEST(Template, CustomSubstitutesAndSplitsAtOutput) {
  const auto t = PromptTemplate::custom("Q: {instruction} [{input}]\nA: {output}{{end}}");
  EXPECT_EQ(t.kind(), TemplateKind::Custom);
  const auto r = t.render(instruction("Do it.", "ctx", "out"));
  ASSERT_EQ(r.segments.size(), 2u);
  EXPECT_EQ(r.segments[0].text, "Q: Do it. [ctx]\nA: ");
  EXPECT_FALSE(r.segments[0].response);
  EXPECT_EQ(r.segments[1].text, "out{end}");
  EXPECT_TRUE(r.segments[1].response);
  EXPECT_EQ(t.render_prompt(instruction("Do it.", "", "out")), "Q: Do it. []\nA: ");
}

TEST(Template, CustomErrorsNameThePlaceholder) {
  const std::string hint =
      " (placeholders: {instruction}, {input}, {output}; write {{ and }} for literal braces)";
  EXPECT_EQ(input_error_message([] { PromptTemplate::custom("Q: {question} A: {output}"); }),
            "data.template_string: unknown placeholder {question} at offset 3" + hint);
  EXPECT_EQ(input_error_message([] { PromptTemplate::custom("{instruction} only"); }),
            "data.template_string: the template must contain {output} exactly once, found 0 "
            "(the text from {output} on is the response the model learns)");
  EXPECT_EQ(input_error_message([] { PromptTemplate::custom("{output} {output}"); }),
            "data.template_string: the template must contain {output} exactly once, found 2 "
            "(the text from {output} on is the response the model learns)");
  EXPECT_EQ(input_error_message([] { PromptTemplate::custom("oops } {output}"); }),
            "data.template_string: unmatched '}' at offset 5" + hint);
  EXPECT_EQ(input_error_message([] { PromptTemplate::custom("{output} {instruction"); }),
            "data.template_string: unclosed '{' at offset 9" + hint);
  EXPECT_EQ(input_error_message([] { PromptTemplate::custom("{Output}", "recipe.toml:7"); }),
            "recipe.toml:7: unknown placeholder {Output} at offset 0" + hint);
}

TEST(Template, NamedAndFormatChecks) {
  EXPECT_EQ(PromptTemplate::named("alpaca", {}).kind(), TemplateKind::Alpaca);
  EXPECT_EQ(PromptTemplate::named("granite", {kGraniteChat}).kind(), TemplateKind::Chat);
  EXPECT_EQ(PromptTemplate::named("granite", {kGraniteChat}).name(), "granite");
  EXPECT_EQ(input_error_message([] { PromptTemplate::named("chatml", {kGraniteChat}); }),
            "data.template: unknown template \"chatml\"; expected alpaca, raw, granite (Granite 4.0 "
            "role tokens) (or set data.template_string to a custom template)");
  const auto alpaca = PromptTemplate::alpaca();
  EXPECT_FALSE(alpaca.supports(DataFormat::Messages));
  EXPECT_EQ(input_error_message([&] { alpaca.check_format(DataFormat::Messages, "c.jsonl"); }),
            "c.jsonl: template alpaca cannot render messages examples (it renders instruction "
            "examples); chat examples need a chat template: set data.template to the model's chat "
            "format (`peftfw plugins` lists them)");
  EXPECT_EQ(input_error_message([] {
              granite_template().render(Example{TextExample{"x"}, 12});
            }),
            "line 12: template granite cannot render text examples (it renders instruction and "
            "messages examples); text examples are rendered as is: set data.template = \"raw\"");
  EXPECT_TRUE(PromptTemplate::raw().supports(DataFormat::Text));
  EXPECT_FALSE(PromptTemplate::raw().supports(DataFormat::Instruction));
}

// ---------------------------------------------------------------------------
// Split.

Dataset numbered(int n, const std::string& source = "n.jsonl") {
  std::string text;
  for (int i = 0; i < n; ++i) text += "{\"text\": \"" + std::to_string(i) + "\"}\n";
  return parse_jsonl(text, source);
}

TEST(Split, IsTheSeededPermutation) {
  const Dataset ds = numbered(20);
  const DataSplit s = make_split(ds, 0.25, 42);
  // First 5 of the seed-42 permutation of 20 (Python oracle), sorted.
  EXPECT_EQ(s.eval, (std::vector<int64_t>{3, 8, 11, 16, 17}));
  EXPECT_EQ(s.train, (std::vector<int64_t>{0, 1, 2, 4, 5, 6, 7, 9, 10, 12, 13, 14, 15, 18, 19}));
  EXPECT_EQ(s.num_examples, 20);
  EXPECT_EQ(s.seed, 42u);
  EXPECT_EQ(s.data_sha256, ds.sha256);
  EXPECT_EQ(s.data_format, "text");
}

TEST(Split, DeterministicPerSeed) {
  const Dataset ds = numbered(200);
  const DataSplit a = make_split(ds, 0.1, 42);
  const DataSplit b = make_split(ds, 0.1, 42);
  const DataSplit c = make_split(ds, 0.1, 43);
  EXPECT_EQ(a.eval, b.eval);
  EXPECT_EQ(a.train, b.train);
  EXPECT_NE(a.eval, c.eval);
  EXPECT_EQ(c.eval.size(), 20u);
}

TEST(Split, EvalCountIsCeilOfTheFraction) {
  // The study's classification set: 24,369 examples, 10% held out -> 2,437
  // eval and 21,932 train (seed study §1.2).
  const DataSplit study = make_split(numbered(24369), 0.1, 42);
  EXPECT_EQ(study.eval.size(), 2437u);
  EXPECT_EQ(study.train.size(), 21932u);
  // 0.7 * 10 is 7.000000000000001 in binary floating point: still 7.
  EXPECT_EQ(make_split(numbered(10), 0.7, 1).eval.size(), 7u);
  EXPECT_EQ(make_split(numbered(10), 0.15, 1).eval.size(), 2u);
  EXPECT_EQ(make_split(numbered(3), 0.0, 1).eval.size(), 0u);
  EXPECT_EQ(make_split(numbered(3), 0.0, 1).train, (std::vector<int64_t>{0, 1, 2}));
}

TEST(Split, RejectsFractionsThatLeaveNothingToTrain) {
  EXPECT_EQ(input_error_message([] { make_split(numbered(1, "one.jsonl"), 0.1, 42); }),
            "data.eval_fraction = 0.10000000000000001 holds out 1 of the 1 examples of "
            "one.jsonl, leaving none to train on; lower it or add data");
  EXPECT_EQ(input_error_message([] { make_split(numbered(4), 1.0, 42); }),
            "data.eval_fraction: expected a number in [0, 1), found 1");
  EXPECT_EQ(input_error_message([] { make_split(numbered(4), -0.5, 42); }),
            "data.eval_fraction: expected a number in [0, 1), found -0.5");
}

TEST(Split, JsonRoundTripGivesTheHeldOutExamples) {
  TempDir dir;
  const std::string data_path = dir.file("data.jsonl");
  std::string text;
  for (int i = 0; i < 30; ++i) {
    text += "{\"instruction\": \"q" + std::to_string(i) + "\", \"output\": \"a\"}\n";
  }
  write_text(data_path, text);
  const Dataset ds = read_jsonl(data_path);
  const DataSplit split = make_split(ds, 0.2, 7);
  const std::string run = dir.file("run");
  const std::string split_path = write_split(split, run);
  EXPECT_EQ(split_path, run + "/split.json");
  EXPECT_FALSE(fs::exists(split_path + ".tmp." + std::to_string(::getpid())));

  const nlohmann::json j = io::parse_json_text(io::read_text_file(split_path), split_path);
  EXPECT_EQ(j.at("num_train").get<int>(), 24);
  EXPECT_EQ(j.at("num_eval").get<int>(), 6);
  EXPECT_EQ(j.at("split_seed").get<int>(), 7);
  EXPECT_EQ(j.at("data_source").get<std::string>(), data_path);
  EXPECT_EQ(j.at("data_sha256").get<std::string>(), sha256_hex(text));

  const DataSplit back = read_split(split_path);
  EXPECT_EQ(back.train, split.train);
  EXPECT_EQ(back.eval, split.eval);
  EXPECT_EQ(back.data_sha256, split.data_sha256);
  EXPECT_EQ(back.data_source, data_path);
  EXPECT_EQ(back.data_format, "instruction");
  EXPECT_EQ(back.eval_fraction, 0.2);
  EXPECT_EQ(back.seed, 7u);

  // Later: the same file read again gives exactly the held-out examples.
  const Dataset again = read_jsonl(data_path);
  check_split_matches(back, again, split_path);
  const auto held_out = select_examples(again, back.eval);
  ASSERT_EQ(held_out.size(), 6u);
  for (std::size_t i = 0; i < held_out.size(); ++i) {
    EXPECT_EQ(std::get<InstructionExample>(held_out[i].body).instruction,
              "q" + std::to_string(back.eval[i]));
    EXPECT_EQ(held_out[i].line, back.eval[i] + 1);
  }
}

TEST(Split, ChangedDataIsAnError) {
  TempDir dir;
  const std::string data_path = dir.file("data.jsonl");
  write_text(data_path, "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"c\"}\n");
  const Dataset ds = read_jsonl(data_path);
  const std::string split_path = write_split(make_split(ds, 0.34, 1), dir.path());
  write_text(data_path, "{\"text\": \"a\"}\n{\"text\": \"B\"}\n{\"text\": \"c\"}\n");
  const Dataset changed = read_jsonl(data_path);
  const DataSplit saved = read_split(split_path);
  const std::string message =
      input_error_message([&] { check_split_matches(saved, changed, split_path); });
  expect_contains(message, split_path + ": the data changed since training: " + data_path +
                               " has SHA-256 " + changed.sha256);
  expect_contains(message, "but the split was made from " + data_path + " with SHA-256 " +
                               ds.sha256);
}

TEST(Split, SameFileReadDifferentlyIsAnError) {
  TempDir dir;
  const std::string data_path = dir.file("data.jsonl");
  write_text(data_path,
             "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"instruction\": \"c\", \"output\": \"d\"}\n");
  const Dataset skip = read_jsonl(data_path, {DataFormat::Auto, BadLinePolicy::Skip});
  const std::string split_path = write_split(make_split(skip, 0.5, 1), dir.path());
  const Dataset as_text_too = read_jsonl(data_path, {DataFormat::Text, BadLinePolicy::Skip});
  check_split_matches(read_split(split_path), as_text_too, split_path);  // same 2 examples
  const Dataset other = parse_jsonl(io::read_text_file(data_path), data_path,
                                    {DataFormat::Instruction, BadLinePolicy::Skip});
  const std::string message =
      input_error_message([&] { check_split_matches(read_split(split_path), other, split_path); });
  EXPECT_EQ(message, split_path + ": " + data_path +
                         " read as instruction gives 1 valid examples, but the split was made "
                         "from 2 text examples of the same file; read it with the training run's "
                         "data.format and data.on_bad_line");
}

TEST(Split, MalformedSplitFile) {
  TempDir dir;
  const std::string path = dir.file("split.json");
  write_text(path,
             "{\"format_version\": 1, \"data_source\": \"d\", \"data_sha256\": \"x\", "
             "\"data_format\": \"text\", \"num_examples\": 3, \"eval_fraction\": 0.3, "
             "\"split_seed\": 1, \"train\": [0, 1], \"eval\": [1]}");
  EXPECT_EQ(input_error_message([&] { read_split(path); }),
            path + ": field 'eval': index 1 appears twice");
  write_text(path,
             "{\"format_version\": 1, \"data_source\": \"d\", \"data_sha256\": \"x\", "
             "\"data_format\": \"text\", \"num_examples\": 3, \"eval_fraction\": 0.3, "
             "\"split_seed\": 1, \"train\": [0, 1], \"eval\": [3]}");
  EXPECT_EQ(input_error_message([&] { read_split(path); }),
            path + ": field 'eval': index 3 is outside the 3 examples");
  write_text(path, "{\"format_version\": 1}");
  expect_contains(input_error_message([&] { read_split(path); }), "data_source");
}

}  // namespace
}  // namespace peftfw::data
