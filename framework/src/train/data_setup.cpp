// [data] -> tokenizer, dataset, prompt template (shared by run and eval).
#include "peftfw/train/data_setup.hpp"

#include "peftfw/data/synth.hpp"
#include "peftfw/error.hpp"
#include "peftfw/model/loader.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/registry.hpp"
#include "peftfw/recipe/recipe.hpp"

namespace fs = std::filesystem;

namespace peftfw::train {

std::unique_ptr<data::Tokenizer> recipe_tokenizer(const recipe::Recipe& r, const ModelSource& source,
                                                int64_t vocab_size) {
  const auto which = r.get_string("data", "tokenizer");
  std::unique_ptr<data::Tokenizer> tok;
  if (which == "byte") {
    tok = data::make_byte_tokenizer();
  } else if (which == "auto") {
    const auto file = source.dir / "tokenizer.json";
    if (!source.dir.empty() && fs::exists(file)) tok = data::load_hf_tokenizer(file);
    else if (source.random_init) tok = data::make_byte_tokenizer();
    else
      throw InputError(source.dir.string() + ": no tokenizer.json; set [data] tokenizer = \"byte\" "
                       "or give a path to a tokenizer.json");
  } else {
    tok = data::load_hf_tokenizer(fs::path(which));
  }
  if (tok->vocab_size() > vocab_size)
    throw InputError("tokenizer " + tok->name() + " has " + std::to_string(tok->vocab_size()) +
                     " tokens but the model's vocabulary is " + std::to_string(vocab_size) +
                     "; use a model config with vocab_size >= " + std::to_string(tok->vocab_size()));
  return tok;
}

data::Dataset recipe_dataset(const recipe::Recipe& r, std::ostream& log) {
  data::Dataset dataset;
  const auto synth = r.get_string("data", "synth_task");
  if (r.has_value("data", "path")) {
    data::ReadOptions ro;
    ro.format = *data::data_format_from_name(r.get_string("data", "format"));
    ro.on_bad_line = *data::bad_line_policy_from_name(r.get_string("data", "on_bad_line"));
    dataset = data::read_jsonl(r.get_path("data", "path").string(), ro);
    if (dataset.skipped.count) log << "data: " << dataset.skipped.skipped_summary() << "\n";
  } else if (synth != "none") {
    dataset = data::synthesize_dataset(*data::synth_task_from_name(synth), r.get_int("data", "synth_n"),
                                       static_cast<uint64_t>(r.get_int("train", "seed")));
  } else {
    throw InputError(r.source_name() + ": no training data: set [data] path (a JSONL file) or "
                     "[data] synth_task = \"classification\" for generated data");
  }

  return dataset;
}

data::PromptTemplate recipe_template(const recipe::Recipe& r) {
  if (r.has_value("data", "template_string"))
    return data::PromptTemplate::custom(r.get_string("data", "template_string"), "[data] template_string");
  auto name = r.get_string("data", "template");
  if (name == "auto") {
    // The chat format of the architecture that runs the recipe's model; alpaca without one.
    // An unreadable config is reported where the model is loaded.
    name = "alpaca";
    try {
      auto source = model_source_from_recipe(r);
      auto arch = find_architecture(read_model_config(source), source.architecture);
      auto formats = arch->chat_formats();
      if (!formats.empty()) return data::PromptTemplate::chat(formats.front());
    } catch (const InputError&) {
    }
  }
  return data::PromptTemplate::named(name, PluginRegistry::instance().chat_formats());
}

}  // namespace peftfw::train
