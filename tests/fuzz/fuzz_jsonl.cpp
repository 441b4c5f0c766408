// Fuzz target: the JSONL reader (framework/src/data/dataset.cpp) in every
// format and bad-line policy, then what a run does with the examples: the
// train/eval split and each prompt template.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "fuzz_common.hpp"
#include "peftfw/data/dataset.hpp"

namespace {

using namespace peftfw;
using namespace peftfw::data;

// What a run does with the examples. Templates are only asked for formats they
// support (each refusal is an exception, and exceptions are slow under ASan).
void use(const Dataset& dataset) {
  fuzz::require(!dataset.examples.empty(), "a dataset that loads has an example");
  fuzz::require(dataset.format != DataFormat::Auto, "the format is resolved");
  fuzz::expect_clean([&] {
    const DataSplit split = make_split(dataset, 0.25, 7);
    fuzz::require(static_cast<int64_t>(split.train.size() + split.eval.size()) ==
                      split.num_examples,
                  "the split covers every example once");
  });
  static const PromptTemplate templates[] = {
      PromptTemplate::chat({"granite", "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>\n", ""}),
      PromptTemplate::alpaca(), PromptTemplate::raw(),
      PromptTemplate::custom("Q: {instruction} {input}\nA: {output}")};
  for (std::size_t i = 0; i < dataset.examples.size() && i < 8; ++i) {
    const Example& example = dataset.examples[i];
    for (const PromptTemplate& t : templates) {
      if (!t.supports(example.format())) continue;
      const RenderedExample r = t.render(example);
      fuzz::require(r.text().size() >= r.prompt_text().size(), "the prompt is part of the text");
      if (example.format() != DataFormat::Text) {
        fuzz::expect_clean([&] { t.render_prompt(example); });
      }
    }
    if (example.format() != DataFormat::Text) fuzz::expect_clean([&] { expected_output(example); });
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  fuzz::expect_clean([&] {
    const Dataset d = parse_jsonl(text, "data.jsonl", {DataFormat::Auto, BadLinePolicy::Error});
    fuzz::require(d.skipped.count == 0, "policy error skips nothing");
  });
  for (const DataFormat format :
       {DataFormat::Auto, DataFormat::Instruction, DataFormat::Text, DataFormat::Messages}) {
    fuzz::expect_clean([&] {
      const Dataset d = parse_jsonl(text, "data.jsonl", {format, BadLinePolicy::Skip});
      fuzz::require(d.skipped.first.size() <= BadLines::kMaxListed, "at most 20 listed");
      fuzz::require(d.skipped.first.size() == std::min<std::size_t>(d.skipped.count,
                                                                    BadLines::kMaxListed),
                    "the first bad lines are listed");
      use(d);
    });
  }
  return 0;
}
