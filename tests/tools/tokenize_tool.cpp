// tokenize_tool: checks peftfw/data/tokenizer against cases written by the
// Python `tokenizers` library (tests/framework/data/tokenizer_oracle.py).
//
//   tokenize_tool TOKENIZER_JSON CASES_JSON
//       For every case: encode(text, allow_special) must give the library's
//       ids, decode(ids) its text (and decode(ids, skip_special) and the
//       template tokens where the case has them). Prints each mismatch and
//       ends with "tokenizer oracle: N passed, M failed".
//   tokenize_tool --byte
//       Self-checks of the byte tokenizer; ends with
//       "byte tokenizer: N passed, M failed".
//   tokenize_tool --encode TOKENIZER_JSON TEXT
//       Prints the ids of TEXT (a debugging aid).
//   tokenize_tool --bench TOKENIZER_JSON TEXT_FILE [REPEAT]
//       Encodes the file REPEAT times (default 5) and prints the throughput.
//
// Exit status: 0 when everything passed, 1 when a check failed, and the
// peftfw exit code (2 for bad input) when a file cannot be loaded.
#include <chrono>
#include <cstdint>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "peftfw/data/tokenizer.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"

namespace {

using nlohmann::json;
using peftfw::data::Tokenizer;

std::string show_ids(const std::vector<int64_t>& ids) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < ids.size(); ++i) out << (i ? ", " : "") << ids[i];
  out << ']';
  return out.str();
}

// JSON string form: shows control characters and keeps lines whole. Invalid
// UTF-8 cannot occur: decode replaces it.
std::string quoted(const std::string& text) {
  return json(text).dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string first_difference(const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
  std::size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  return "first difference at index " + std::to_string(i);
}

class Tally {
 public:
  explicit Tally(std::string label) : label_(std::move(label)) {}
  void record(bool ok) { ok ? ++passed_ : ++failed_; }
  int finish() const {
    std::cout << label_ << ": " << passed_ << " passed, " << failed_ << " failed" << std::endl;
    return failed_ == 0 ? 0 : 1;
  }

 private:
  std::string label_;
  int passed_ = 0;
  int failed_ = 0;
};

std::vector<int64_t> id_list(const json& value) { return value.get<std::vector<int64_t>>(); }

int run_oracle(const std::string& tokenizer_path, const std::string& cases_path) {
  const auto tokenizer = peftfw::data::load_hf_tokenizer(tokenizer_path);
  const json cases =
      peftfw::io::parse_json_text(peftfw::io::read_text_file(cases_path), cases_path);
  Tally tally("tokenizer oracle");

  int index = 0;
  for (const json& c : cases.value("cases", json::array())) {
    const std::string name = c.value("name", "case " + std::to_string(index));
    ++index;
    const std::string text = c.at("text").get<std::string>();
    const bool allow_special = c.value("allow_special", true);
    const auto expected = id_list(c.at("ids"));
    std::vector<std::string> problems;
    try {
      const auto ids = tokenizer->encode(text, allow_special);
      if (ids != expected) {
        problems.push_back("encode: expected " + show_ids(expected) + "\n      got      " +
                           show_ids(ids) + " (" + first_difference(expected, ids) + ")");
      }
      // Decoding is checked on the library's ids, so that a wrong encode does
      // not hide a wrong decode.
      const std::string decoded = tokenizer->decode(expected, false);
      if (decoded != c.at("decoded").get<std::string>()) {
        problems.push_back("decode: expected " + quoted(c.at("decoded").get<std::string>()) +
                           "\n      got      " + quoted(decoded));
      }
      if (c.contains("decoded_skip_special")) {
        const std::string skipped = tokenizer->decode(expected, true);
        if (skipped != c.at("decoded_skip_special").get<std::string>()) {
          problems.push_back("decode(skip_special): expected " +
                             quoted(c.at("decoded_skip_special").get<std::string>()) +
                             "\n      got      " + quoted(skipped));
        }
      }
      if (c.contains("ids_with_template")) {
        const auto want = id_list(c.at("ids_with_template"));
        const auto got = tokenizer->add_template_tokens(expected);
        if (got != want) {
          problems.push_back("add_template_tokens: expected " + show_ids(want) +
                             "\n      got      " + show_ids(got));
        }
      }
    } catch (const std::exception& e) {
      problems.push_back(std::string("threw: ") + e.what());
    }
    tally.record(problems.empty());
    if (!problems.empty()) {
      std::cout << "FAIL " << name << " (allow_special=" << (allow_special ? "true" : "false")
                << ")\n  text " << quoted(text) << '\n';
      for (const auto& p : problems) std::cout << "    " << p << '\n';
    }
  }

  for (const json& c : cases.value("decode_cases", json::array())) {
    const std::string name = c.value("name", "decode case");
    const auto ids = id_list(c.at("ids"));
    std::vector<std::string> problems;
    try {
      for (const bool skip : {false, true}) {
        const char* key = skip ? "decoded_skip_special" : "decoded";
        if (!c.contains(key)) continue;
        const std::string got = tokenizer->decode(ids, skip);
        if (got != c.at(key).get<std::string>()) {
          problems.push_back(std::string(key) + ": expected " +
                             quoted(c.at(key).get<std::string>()) + "\n      got      " +
                             quoted(got));
        }
      }
    } catch (const std::exception& e) {
      problems.push_back(std::string("threw: ") + e.what());
    }
    tally.record(problems.empty());
    if (!problems.empty()) {
      std::cout << "FAIL " << name << " ids " << show_ids(ids) << '\n';
      for (const auto& p : problems) std::cout << "    " << p << '\n';
    }
  }

  // Token lookups and sizes.
  const json token_ids = cases.value("token_ids", json::object());
  for (const auto& [token, id] : token_ids.items()) {
    const auto got = tokenizer->token_id(token);
    const bool ok = got && *got == id.get<int64_t>();
    tally.record(ok);
    if (!ok) {
      std::cout << "FAIL token_id(" << quoted(token) << "): expected " << id << ", got "
                << (got ? std::to_string(*got) : "none") << '\n';
    }
  }
  const auto check_value = [&](const char* key, std::optional<int64_t> got) {
    if (!cases.contains(key)) return;
    const json& want = cases.at(key);
    const bool ok = want.is_null() ? !got : (got && *got == want.get<int64_t>());
    tally.record(ok);
    if (!ok) {
      std::cout << "FAIL " << key << ": expected " << want.dump() << ", got "
                << (got ? std::to_string(*got) : "none") << '\n';
    }
  };
  check_value("vocab_size", tokenizer->vocab_size());
  check_value("bos_id", tokenizer->bos_id());
  check_value("eos_id", tokenizer->eos_id());
  check_value("pad_id", tokenizer->pad_id());
  return tally.finish();
}

// Deterministic valid UTF-8 covering every encoded length, the specials'
// spelling and whitespace.
std::string random_utf8(uint64_t& state, std::size_t chars) {
  const auto next = [&state] {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return state >> 33;
  };
  std::string out;
  for (std::size_t i = 0; i < chars; ++i) {
    const uint64_t kind = next() % 6;
    uint32_t cp;
    if (kind == 0) {
      cp = static_cast<uint32_t>(next() % 0x80);
    } else if (kind == 1) {
      cp = static_cast<uint32_t>(0x80 + next() % (0x800 - 0x80));
    } else if (kind == 2) {
      do {
        cp = static_cast<uint32_t>(0x800 + next() % (0x10000 - 0x800));
      } while (cp >= 0xD800 && cp <= 0xDFFF);
    } else if (kind == 3) {
      cp = static_cast<uint32_t>(0x10000 + next() % (0x110000 - 0x10000));
    } else if (kind == 4) {
      out += "<|end_of_text|>";
      continue;
    } else {
      out += " \n\t"[next() % 3];
      continue;
    }
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  return out;
}

int run_byte_checks() {
  const auto tokenizer = peftfw::data::make_byte_tokenizer();
  Tally tally("byte tokenizer");
  const auto check = [&](bool ok, const std::string& what) {
    tally.record(ok);
    if (!ok) std::cout << "FAIL " << what << '\n';
  };

  check(tokenizer->vocab_size() == 259, "vocab_size is 259");
  check(tokenizer->eos_id() == 256 && tokenizer->pad_id() == 256, "eos and pad are 256");
  check(!tokenizer->bos_id(), "no bos");
  check(tokenizer->name() == "byte", "name is \"byte\"");
  const char* specials[] = {"<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>"};
  for (int k = 0; k < 3; ++k) {
    check(tokenizer->token_id(specials[k]) == 256 + k, std::string("token_id of ") + specials[k]);
    check(tokenizer->encode(specials[k]) == std::vector<int64_t>{256 + k},
          std::string("encode of ") + specials[k]);
    check(tokenizer->decode({256 + k}) == specials[k], std::string("decode of ") + specials[k]);
    check(tokenizer->decode({256 + k}, true).empty(), std::string("skip of ") + specials[k]);
    check(tokenizer->encode(specials[k], false).size() == std::string(specials[k]).size(),
          std::string("bytes of ") + specials[k] + " without allow_special");
  }
  const std::string prompt =
      "<|start_of_role|>user<|end_of_role|>Hi<|end_of_text|>\n<|start_of_role|>assistant"
      "<|end_of_role|>";
  const std::vector<int64_t> prompt_ids = {257, 'u', 's', 'e', 'r', 258, 'H', 'i', 256, '\n',
                                           257, 'a', 's', 's', 'i', 's', 't', 'a', 'n', 't', 258};
  check(tokenizer->encode(prompt) == prompt_ids, "Granite prompt ids");
  check(tokenizer->decode(prompt_ids) == prompt, "Granite prompt round trip");

  uint64_t state = 20251104;
  for (int round = 0; round < 500; ++round) {
    const std::string text = random_utf8(state, static_cast<std::size_t>(round % 40));
    const auto ids = tokenizer->encode(text);
    check(tokenizer->decode(ids) == text, "round trip of " + quoted(text));
    const auto plain = tokenizer->encode(text, false);
    bool bytes_ok = plain.size() == text.size();
    for (std::size_t i = 0; bytes_ok && i < plain.size(); ++i) {
      bytes_ok = plain[i] == static_cast<unsigned char>(text[i]);
    }
    check(bytes_ok, "plain bytes of " + quoted(text));
  }
  // Every single byte, and invalid UTF-8 turned into U+FFFD.
  for (int b = 0; b < 256; ++b) {
    const std::string one(1, static_cast<char>(b));
    check(tokenizer->encode(one) == std::vector<int64_t>{b}, "byte " + std::to_string(b));
  }
  check(tokenizer->decode({0xE2, 0x82}) == "\xEF\xBF\xBD", "truncated sequence is one U+FFFD");
  check(tokenizer->decode({0xFF, 'a'}) == "\xEF\xBF\xBD" "a", "0xFF is U+FFFD");
  bool threw = false;
  try {
    tokenizer->decode({300});
  } catch (const peftfw::InputError&) {
    threw = true;
  }
  check(threw, "decode of id 300 is an InputError");
  return tally.finish();
}

int run_encode(const std::string& tokenizer_path, const std::string& text) {
  const auto tokenizer = peftfw::data::load_hf_tokenizer(tokenizer_path);
  std::cout << show_ids(tokenizer->encode(text)) << std::endl;
  return 0;
}

int run_bench(const std::string& tokenizer_path, const std::string& text_path, int repeat) {
  const auto tokenizer = peftfw::data::load_hf_tokenizer(tokenizer_path);
  const std::string text = peftfw::io::read_text_file(text_path);
  std::size_t tokens = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < repeat; ++r) {
    // Line by line, as training examples arrive.
    std::size_t begin = 0;
    while (begin < text.size()) {
      std::size_t end = text.find('\n', begin);
      end = end == std::string::npos ? text.size() : end + 1;
      tokens += tokenizer->encode(std::string_view(text).substr(begin, end - begin)).size();
      begin = end;
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double megabytes = static_cast<double>(text.size()) * repeat / 1e6;
  std::cout << "encoded " << megabytes << " MB (" << tokens << " tokens) in " << seconds
            << " s: " << megabytes / seconds << " MB/s, " << static_cast<double>(tokens) / seconds
            << " tokens/s" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.size() == 1 && args[0] == "--byte") return run_byte_checks();
    if (args.size() == 3 && args[0] == "--encode") return run_encode(args[1], args[2]);
    if ((args.size() == 3 || args.size() == 4) && args[0] == "--bench") {
      return run_bench(args[1], args[2], args.size() == 4 ? std::stoi(args[3]) : 5);
    }
    if (args.size() == 2 && args[0].rfind("--", 0) != 0) return run_oracle(args[0], args[1]);
  } catch (const peftfw::Error& e) {
    std::cerr << "tokenize_tool: " << e.what() << std::endl;
    return e.exit_code();
  } catch (const std::exception& e) {
    std::cerr << "tokenize_tool: " << e.what() << std::endl;
    return 1;
  }
  std::cerr << "usage: tokenize_tool TOKENIZER_JSON CASES_JSON\n"
               "       tokenize_tool --byte\n"
               "       tokenize_tool --encode TOKENIZER_JSON TEXT\n"
               "       tokenize_tool --bench TOKENIZER_JSON TEXT_FILE [REPEAT]\n";
  return 2;
}
