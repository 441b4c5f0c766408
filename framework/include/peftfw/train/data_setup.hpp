// The recipe's [data] section turned into a dataset, tokenizer and prompt
// template: shared by `peftfw run` and `peftfw eval` so both read the data the
// same way.
#pragma once

#include <memory>
#include <ostream>

#include "peftfw/data/dataset.hpp"
#include "peftfw/data/tokenizer.hpp"
#include "peftfw/model/loader.hpp"

namespace peftfw::recipe {
class Recipe;
}

namespace peftfw::train {

// [data] tokenizer: "byte", "auto" (the checkpoint's tokenizer.json; byte for random init) or a path.
std::unique_ptr<data::Tokenizer> recipe_tokenizer(const recipe::Recipe& r, const ModelSource& source,
                                                  int64_t vocab_size);

// [data] path (JSONL) or the generated synth_task data.
data::Dataset recipe_dataset(const recipe::Recipe& r, std::ostream& log);

// [data] template_string or template.
data::PromptTemplate recipe_template(const recipe::Recipe& r);

}  // namespace peftfw::train
