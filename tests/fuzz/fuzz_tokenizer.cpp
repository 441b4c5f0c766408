// Fuzz target: tokenizer.json (framework/src/data/tokenizer_hf.cpp, with the
// regex layer in tokenizer_regex.cpp). The input is a tokenizer.json,
// optionally followed by a line "%%" and a tokenizer_config.json; both are
// written to a scratch folder and loaded as the CLI loads them. A tokenizer
// that loads then encodes and decodes a few texts (and ids up to its vocab size).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_common.hpp"
#include "peftfw/data/tokenizer.hpp"

namespace {

using namespace peftfw;

constexpr std::string_view kSeparator = "\n%%\n";

const char* const kTexts[] = {
    "Hello world! 123 4567",
    "  spaces\tand\nnewlines  ",
    "<|end_of_text|><|start_of_role|>user<|end_of_role|>hi",
    "caf\xC3\xA9 \xE4\xB8\xAD\xE6\x96\x87 \xF0\x9F\x98\x80",
    "",
};

void use(const data::Tokenizer& tok) {
  const int64_t vocab = tok.vocab_size();
  fuzz::require(vocab >= 0, "vocab_size >= 0");
  for (const char* text : kTexts) {
    for (const bool special : {true, false}) {
      fuzz::expect_clean([&] {
        const std::vector<int64_t> ids = tok.encode(text, special);
        for (const int64_t id : ids) fuzz::require(id >= 0 && id < vocab, "ids < vocab_size");
        tok.decode(ids, false);
        tok.decode(ids, true);
        tok.add_template_tokens(ids);
      });
    }
  }
  std::vector<int64_t> ids;
  for (int64_t id = 0; id < std::min<int64_t>(vocab, 300); ++id) ids.push_back(id);
  ids.push_back(vocab);  // one past: an InputError
  fuzz::expect_clean([&] { tok.decode(ids); });
  tok.token_id("a");
  tok.bos_id();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const std::size_t cut = input.find(kSeparator);
  const std::string_view tokenizer = input.substr(0, cut);
  const std::string tokenizer_path = fuzz::scratch_dir() + "/tokenizer.json";
  const std::string config_path = fuzz::scratch_dir() + "/tokenizer_config.json";
  fuzz::write_file(tokenizer_path, tokenizer.data(), tokenizer.size());
  if (cut == std::string_view::npos) {
    std::remove(config_path.c_str());
  } else {
    const std::string_view config = input.substr(cut + kSeparator.size());
    fuzz::write_file(config_path, config.data(), config.size());
  }
  fuzz::expect_clean([&] { use(*data::load_hf_tokenizer(tokenizer_path)); });
  return 0;
}
