// generate_tool: runs peftfw/eval/generate on a checkpoint folder, for
// tests/oracles/generate_oracle.py to compare with transformers' generate.
//
//   generate_tool MODEL_DIR "IDS;IDS;..." MAX_NEW [options]
//       IDS is a prompt's token ids separated by commas or spaces; the
//       prompts are generated together (one left-padded batch). Greedy
//       unless --temperature is given. Prints {"outputs": [[ids...], ...]}
//       and, with stop strings, "texts" (the outputs decoded by the byte
//       tokenizer and cut at the stop string) on stdout.
//   options:
//       --temperature T   --top-p P   --seed S
//       --stop-id ID         (repeatable)
//       --stop-string TEXT   (repeatable; decoded with the byte tokenizer,
//                             so every generated id must be below 259)
//
// Exit status: 0 on success, the peftfw exit code (2 for bad input) otherwise.
#include <cstdint>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "peftfw/data/tokenizer.hpp"
#include "peftfw/error.hpp"
#include "peftfw/eval/generate.hpp"
#include "peftfw/model/loader.hpp"

namespace {

using nlohmann::json;

int64_t parse_int(const std::string& text, const std::string& what) {
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size())
    throw peftfw::InputError(what + " '" + text + "' is not an integer");
  return value;
}

double parse_double(const std::string& text, const std::string& what) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size())
    throw peftfw::InputError(what + " '" + text + "' is not a number");
  return value;
}

std::vector<std::vector<int64_t>> parse_prompts(const std::string& text) {
  std::vector<std::vector<int64_t>> prompts;
  std::stringstream rows(text);
  std::string row;
  while (std::getline(rows, row, ';')) {
    for (char& c : row)
      if (c == ',') c = ' ';
    std::stringstream tokens(row);
    std::vector<int64_t> ids;
    for (std::string token; tokens >> token;) ids.push_back(parse_int(token, "prompt id"));
    prompts.push_back(std::move(ids));
  }
  if (prompts.empty()) throw peftfw::InputError("no prompts in '" + text + "'");
  return prompts;
}

int run(const std::vector<std::string>& args) {
  peftfw::eval::GenerateOptions options;
  options.max_new_tokens = parse_int(args[2], "MAX_NEW");
  for (size_t i = 3; i < args.size(); i += 2) {
    if (i + 1 >= args.size())
      throw peftfw::InputError("option " + args[i] + " needs a value");
    const std::string& value = args[i + 1];
    if (args[i] == "--temperature") {
      options.temperature = parse_double(value, "--temperature");
    } else if (args[i] == "--top-p") {
      options.top_p = parse_double(value, "--top-p");
    } else if (args[i] == "--seed") {
      options.seed = static_cast<uint64_t>(parse_int(value, "--seed"));
    } else if (args[i] == "--stop-id") {
      options.stop_ids.push_back(parse_int(value, "--stop-id"));
    } else if (args[i] == "--stop-string") {
      options.stop_strings.push_back(value);
    } else {
      throw peftfw::InputError("unknown option '" + args[i] +
                               "'; expected --temperature, --top-p, --seed, --stop-id or "
                               "--stop-string");
    }
  }

  peftfw::ModelSource source;
  source.dir = args[0];
  auto loaded = peftfw::load_model(source);
  const auto tokenizer = peftfw::data::make_byte_tokenizer();
  const peftfw::eval::DecodeFn decode = [&tokenizer](const std::vector<int64_t>& ids) {
    return tokenizer->decode(ids);
  };
  const auto outputs = peftfw::eval::generate_ids(*loaded.model, parse_prompts(args[1]), options,
                                                  options.stop_strings.empty() ? nullptr : decode);

  json result;
  result["outputs"] = outputs;
  if (!options.stop_strings.empty()) {
    json texts = json::array();
    for (const auto& ids : outputs) {
      std::string text = decode(ids);
      if (const auto at = peftfw::eval::find_stop_string(text, options.stop_strings))
        text.resize(*at);
      texts.push_back(text);
    }
    result["texts"] = texts;
  }
  std::cout << result.dump(-1, ' ', false, json::error_handler_t::replace) << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.size() >= 3 && args[0].rfind("--", 0) != 0) return run(args);
  } catch (const peftfw::Error& e) {
    std::cerr << "generate_tool: " << e.what() << std::endl;
    return e.exit_code();
  } catch (const std::exception& e) {
    std::cerr << "generate_tool: " << e.what() << std::endl;
    return 1;
  }
  std::cerr << "usage: generate_tool MODEL_DIR \"IDS;IDS;...\" MAX_NEW [--temperature T] "
               "[--top-p P] [--seed S] [--stop-id ID]... [--stop-string TEXT]...\n";
  return 2;
}
