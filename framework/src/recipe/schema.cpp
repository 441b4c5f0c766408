// The recipe schema: the declaration table of every recipe section and key,
// and the printers behind `peftfw schema` and docs/recipes.md.
#include "peftfw/recipe/schema.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <utility>

namespace peftfw::recipe {

const char* type_name(ValueType type) {
  switch (type) {
    case ValueType::kString: return "string";
    case ValueType::kInteger: return "integer";
    case ValueType::kFloat: return "float";
    case ValueType::kBoolean: return "boolean";
    case ValueType::kStringArray: return "string array";
    case ValueType::kStringOrArray: return "string or string array";
    case ValueType::kPath: return "path";
    case ValueType::kTable: return "table";
  }
  return "?";
}

namespace {

std::string float_literal(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  // Shortest text that reads back to the same double, independent of locale.
  const auto res = std::to_chars(buf, buf + sizeof buf, v);
  std::string s(buf, res.ptr);
  // to_chars writes "2e-04"; TOML and people prefer "2e-4".
  if (const std::size_t e = s.find('e'); e != std::string::npos) {
    std::size_t digits = e + 1;
    if (digits < s.size() && s[digits] == '+') s.erase(digits, 1);
    if (digits < s.size() && s[digits] == '-') ++digits;
    while (digits + 1 < s.size() && s[digits] == '0') s.erase(digits, 1);
  }
  if (s.find_first_of(".e") == std::string::npos) s += ".0";  // keep it a TOML float
  return s;
}

std::string string_literal(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\t': out += "\\t"; break;
      case '\n': out += "\\n"; break;
      case '\f': out += "\\f"; break;
      case '\r': out += "\\r"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04X", static_cast<unsigned>(c));
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

}  // namespace

std::string toml_literal(const Value& value) {
  struct Visitor {
    std::string operator()(bool b) const { return b ? "true" : "false"; }
    std::string operator()(std::int64_t i) const { return std::to_string(i); }
    std::string operator()(double d) const { return float_literal(d); }
    std::string operator()(const std::string& s) const { return string_literal(s); }
    std::string operator()(const std::vector<std::string>& v) const {
      std::string out = "[";
      for (std::size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + string_literal(v[i]);
      return out + "]";
    }
  };
  return std::visit(Visitor{}, value);
}

KeySpec KeySpec::at_least(double lo) && {
  min = lo;
  return std::move(*this);
}

KeySpec KeySpec::at_most(double hi) && {
  max = hi;
  return std::move(*this);
}

KeySpec KeySpec::known_as(std::vector<std::string> names) && {
  aliases = std::move(names);
  return std::move(*this);
}

KeySpec KeySpec::between(double lo, double hi) && {
  min = lo;
  max = hi;
  return std::move(*this);
}

const KeySpec* SectionSpec::find(std::string_view key) const {
  for (const KeySpec& k : keys) {
    if (k.name == key) return &k;
  }
  return nullptr;
}

const SectionSpec* Schema::find_section(std::string_view name) const {
  for (const SectionSpec& s : sections) {
    if (s.name == name) return &s;
  }
  return nullptr;
}

const KeySpec* Schema::find_key(std::string_view section, std::string_view key) const {
  const SectionSpec* s = find_section(section);
  return s ? s->find(key) : nullptr;
}

// ---------------------------------------------------------------------------
// The declarations.

namespace {

using Strings = std::vector<std::string>;
constexpr std::nullopt_t kUnset = std::nullopt;

KeySpec declare(std::string name, ValueType type, std::string doc, Strings choices = {}) {
  KeySpec k;
  k.name = std::move(name);
  k.type = type;
  k.doc = std::move(doc);
  k.choices = std::move(choices);
  return k;
}

// The default is emplaced, not moved in as a Value: moving the variant trips
// a GCC 12 -Wmaybe-uninitialized false positive under sanitizers.
template <typename T>
KeySpec with_default(KeySpec k, std::optional<T> def) {
  if (def) k.default_value.emplace(std::move(*def));
  return k;
}

}  // namespace

namespace keys {

KeySpec text(std::string name, std::optional<std::string> def, std::string doc) {
  return with_default(declare(std::move(name), ValueType::kString, std::move(doc)), std::move(def));
}

KeySpec choice(std::string name, std::string def, std::vector<std::string> choices, std::string doc) {
  return with_default(
      declare(std::move(name), ValueType::kString, std::move(doc), std::move(choices)),
      std::optional<std::string>(std::move(def)));
}

KeySpec integer(std::string name, std::int64_t def, std::string doc) {
  return with_default(declare(std::move(name), ValueType::kInteger, std::move(doc)),
                      std::optional<std::int64_t>(def));
}

KeySpec real(std::string name, std::optional<double> def, std::string doc) {
  return with_default(declare(std::move(name), ValueType::kFloat, std::move(doc)), def);
}

KeySpec flag(std::string name, bool def, std::string doc) {
  return with_default(declare(std::move(name), ValueType::kBoolean, std::move(doc)),
                      std::optional<bool>(def));
}

KeySpec with_choices(KeySpec k, std::vector<std::string> choices) {
  k.choices = std::move(choices);
  return k;
}

KeySpec strings(std::string name, std::optional<std::vector<std::string>> def, std::string doc) {
  return with_default(declare(std::move(name), ValueType::kStringArray, std::move(doc)),
                      std::move(def));
}

KeySpec pattern(std::string name, std::string doc) {
  return declare(std::move(name), ValueType::kStringOrArray, std::move(doc));
}

KeySpec path(std::string name, std::optional<std::string> def, std::string doc) {
  return with_default(declare(std::move(name), ValueType::kPath, std::move(doc)), std::move(def));
}

KeySpec table(std::string name, std::string doc) {
  return declare(std::move(name), ValueType::kTable, std::move(doc));
}

}  // namespace keys

namespace {

using namespace keys;

const Strings kDtypes = {"float32", "bfloat16", "float16"};

Schema make_builtin_schema() {
  // One line per key, so the table reads like the reference it generates;
  // clang-format would fold the docs onto continuation lines.
  // clang-format off
  return Schema{{
    {"model", "The base model: where its config and weights come from, and where it runs.", {
      path   ("path", kUnset, "Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)."),
      path   ("config", kUnset, "A config.json to build the model from, for init = \"random\"."),
      table  ("config_inline", "The model config written inline (the fields of config.json), for init = \"random\"."),
      choice ("init", "checkpoint", {"checkpoint", "random"}, "\"checkpoint\" loads the weights in path; \"random\" initializes them from seed."),
      integer("seed", 0, "Seed of random initialization (init = \"random\").").at_least(0),
      choice ("dtype", "float32", kDtypes, "Dtype of the base model's weights and compute.").known_as({"torch_dtype", "bf16", "fp16"}),
      text   ("architecture", "auto", "Architecture plugin; \"auto\" picks it by the config's model_type."),
      choice ("device", "auto", {"auto", "cpu", "cuda"}, "Where to run; \"auto\" is CUDA when available, else the CPU."),
    }},
    {"adapter", "What is trained: the adapter method, its settings and the modules it attaches to.", {
      choice ("method", "none", {"none"}, "Fine-tuning method; adapter plugins add theirs (`peftfw plugins`), with their keys below. none: adds nothing (only [ssm] train is trained)."),
      pattern("target_modules", "Modules to wrap, as PEFT: a string is a regex over full module names; a list holds names (exact or '.'-suffix)."),
      pattern("exclude_modules", "Modules never to wrap; same forms as target_modules."),
      strings("roles", kUnset, "Modules to wrap by role, as the architecture plugin names its modules' roles."),
      choice ("on_unmatched", "error", {"error", "warn", "ignore"}, "What to do when a target_modules name matches no module."),
      integer("init_seed", 0, "Seed of adapter weight initialization.").at_least(0),
      path   ("init_from", kUnset, "Start from this adapter folder (HF PEFT layout; its ssm_core_params.safetensors too) instead of a fresh init; r and targets must match."),
    }},
    {"ssm", "State-space (Mamba) parameters trained directly, beside the adapter.", {
      strings("train", Strings{}, "SSM parameters to train (e.g. A_log, D, dt_bias); the architecture plugin checks the names."),
      real   ("lr", kUnset, "Learning rate of these parameters; unset = train.lr.").at_least(0),
      real   ("weight_decay", 0.0, "Weight decay of these parameters.").at_least(0),
      choice ("master_dtype", "float32", kDtypes, "Dtype the optimizer keeps them in; small A_log and dt_bias updates round away in 16-bit."),
    }},
    {"data", "Training data, and how examples become token sequences.", {
      path   ("path", kUnset, "Data file, one JSON example per line."),
      choice ("format", "auto", {"auto", "instruction", "text", "messages"}, "Layout of each example; \"auto\" detects it from the fields present."),
      text   ("template", "auto", "Prompt template by name: \"auto\" (the model architecture's chat format, else alpaca), alpaca, raw, or a chat format from `peftfw plugins`; template_string replaces it."),
      text   ("template_string", kUnset, "A custom prompt template, used instead of template when set."),
      choice ("synth_task", "none", {"none", "classification", "mapping", "rules"}, "Generate a synthetic task instead of reading path; \"none\" reads path."),
      integer("synth_n", 512, "Number of synthetic examples.").at_least(1).at_most(1000000),
      integer("max_length", 1280, "Maximum sequence length in tokens.").at_least(1).at_most(1048576).known_as({"max_seq_length", "sequence_len", "cutoff_len"}),
      flag   ("packing", false, "Pack several examples into each max_length sequence."),
      choice ("loss_on", "all", {"all", "response"}, "Tokens that count in the loss: all, or the response only."),
      real   ("eval_fraction", 0.1, "Fraction of examples held out for evaluation.").between(0, 1),
      integer("split_seed", 42, "Seed of the train/eval split.").at_least(0),
      choice ("on_bad_line", "error", {"error", "skip"}, "A malformed data line stops the run, or is skipped."),
      text   ("tokenizer", "auto", "\"auto\" is the model's tokenizer.json; \"byte\" is a byte-level tokenizer."),
    }},
    {"train", "Optimization: length, batches, learning rate, checkpoints and logging.", {
      real   ("epochs", 3, "Passes over the training data (fractions allowed).").at_least(0).known_as({"num_train_epochs", "num_epochs"}),
      integer("max_steps", -1, "Stop after this many optimizer steps; -1 = run all epochs (0 is refused: it would train nothing).").at_least(-1),
      integer("batch_size", 32, "Examples per optimizer step.").at_least(1).at_most(1048576).known_as({"total_batch_size", "global_batch_size"}),
      integer("micro_batch_size", 0, "Examples per forward/backward pass (gradient accumulation); 0 = batch_size.").at_least(0).at_most(1048576).known_as({"per_device_train_batch_size", "gradient_accumulation_steps", "gradient_accumulation"}),
      real   ("lr", 2e-4, "Peak learning rate.").at_least(0).known_as({"learning_rate"}),
      real   ("weight_decay", 0.0, "AdamW weight decay.").at_least(0),
      real   ("warmup_ratio", 0.06, "Warmup as a fraction of all steps; used when warmup_steps = 0.").between(0, 1),
      integer("warmup_steps", 0, "Warmup in steps; replaces warmup_ratio when > 0.").at_least(0),
      choice ("schedule", "cosine", {"cosine", "linear", "constant"}, "Learning-rate decay after warmup.").known_as({"lr_scheduler_type", "lr_scheduler"}),
      real   ("max_grad_norm", 1.0, "Clip the global gradient norm to this; 0 = no clipping.").at_least(0),
      real   ("adam_beta1", 0.9, "AdamW beta1.").between(0, 1),
      real   ("adam_beta2", 0.999, "AdamW beta2.").between(0, 1),
      real   ("adam_eps", 1e-8, "AdamW epsilon.").at_least(0),
      integer("seed", 42, "Seed of data order and dropout.").at_least(0),
      flag   ("grad_checkpointing", false, "Recompute activations in backward to save memory.").known_as({"gradient_checkpointing", "activation_checkpointing", "enable_activation_checkpointing"}),
      choice ("checkpoint_keep", "none", {"none", "narrow_projections"}, "With grad_checkpointing: \"narrow_projections\" keeps the outputs of frozen projections at most half as wide as their input (Mamba out_proj, the MLP's output_linear, GQA k/v_proj) for the backward's rerun, which then skips about a third of its matrix work, for 2 bytes (bf16) per output feature per token."),
      real   ("checkpoint_keep_wide_gib", 0.0, "With checkpoint_keep = \"narrow_projections\": also keep the outputs of the other frozen projections (Mamba in_proj, the MLP's input_linear, q/o_proj) from the first run, first come first kept, while they hold at most this many GiB; each one kept spares its GEMM in the rerun (about 2.8 ms per GiB on an H100).").between(0, 1024),
      integer("eval_every", 50, "Evaluate every this many steps; 0 = only at the end.").at_least(0).known_as({"eval_steps"}),
      integer("save_every", 100, "Save a checkpoint every this many steps; 0 = only at the end.").at_least(0).known_as({"save_steps"}),
      integer("keep_last", 3, "Checkpoints kept; 0 = all.").at_least(0),
      integer("log_every", 10, "Log every this many steps.").at_least(1).known_as({"logging_steps", "log_every_n_steps"}),
      choice ("resume", "auto", {"auto", "never"}, "\"auto\" continues from the newest checkpoint in output.dir; \"never\" starts fresh."),
      flag   ("load_best", true, "At the end, restore the trainable tensors (adapter and SSM together) from the step with the lowest eval loss."),
    }},
    {"output", "The run folder and the exports written into it.", {
      text   ("dir", "runs/default", "Run folder (logs, checkpoints, resolved recipe, exports); a relative path is relative to the working directory, like HF's output_dir.").known_as({"output_dir"}),
      strings("formats", Strings{"peft"}, "Exports, by output plugin name (\"peft\": adapter_model.safetensors + adapter_config.json)."),
      flag   ("overwrite", false, "Start over in an existing run folder: clears what peftfw made there, and refuses a folder holding anything else."),
      with_choices(strings("gguf_types", Strings{"f16"}, "With the \"gguf\" format: one llama.cpp file per type, gguf/model-<type>.gguf (norms and SSM tensors stay f32)."),
                   {"f32", "f16", "bf16", "q8_0"}),
    }},
    {"eval", "Evaluation tasks run on the trained model.", {
      strings("tasks", Strings{}, "Evaluation tasks, by name."),
      integer("samples", 0, "Examples per task; 0 = all.").at_least(0),
      integer("max_new_tokens", 256, "Generation limit per example.").at_least(1),
    }},
  }};
  // clang-format on
}

// `extends` is not a section key; it is declared here so the printers show it.
const KeySpec& extends_spec() {
  static const KeySpec spec =
      path(std::string(kExtendsKey), kUnset,
           "Base recipe merged first (relative to this file); this file's keys override it.");
  return spec;
}

std::string format_number(double v) {
  if (v == std::floor(v) && std::fabs(v) < 1e15) return std::to_string(static_cast<long long>(v));
  return float_literal(v);
}

std::string pad(std::string s, std::size_t width) {
  if (s.size() < width) s.append(width - s.size(), ' ');
  return s;
}

std::string describe_doc(const KeySpec& key) {
  const std::string c = describe_constraints(key);
  std::string out = c.empty() ? key.doc : key.doc + " (" + c + ")";
  if (!key.aliases.empty()) {
    out += " Elsewhere: ";
    for (std::size_t i = 0; i < key.aliases.size(); ++i) out += (i ? ", " : "") + key.aliases[i];
    out += ".";
  }
  return out;
}

std::string markdown_cell(const std::string& s) {
  std::string out;
  for (const char c : s) {
    if (c == '|') out += '\\';
    out += c;
  }
  return out;
}

}  // namespace

const Schema& builtin_schema() {
  static const Schema schema = make_builtin_schema();
  return schema;
}

std::string describe_constraints(const KeySpec& key) {
  std::string out;
  if (!key.choices.empty()) {
    out = key.type == ValueType::kStringArray ? "each one of: " : "one of: ";
    for (std::size_t i = 0; i < key.choices.size(); ++i) out += (i ? ", " : "") + key.choices[i];
  }
  std::string range;
  if (key.min && key.max) {
    range = "between " + format_number(*key.min) + " and " + format_number(*key.max);
  } else if (key.min) {
    range = "at least " + format_number(*key.min);
  } else if (key.max) {
    range = "at most " + format_number(*key.max);
  }
  if (!range.empty()) out += (out.empty() ? "" : "; ") + range;
  return out;
}

std::string describe_default(const KeySpec& key) {
  return key.default_value ? toml_literal(*key.default_value) : "unset";
}

std::string schema_to_text(const Schema& schema) {
  std::ostringstream out;
  out << "peftfw recipe schema: sections, keys, types, defaults.\n"
      << "Every key is optional; a key left out takes its default.\n\n";
  const auto print_keys = [&out](const std::vector<const KeySpec*>& keys) {
    std::size_t wk = 0, wt = 0, wd = 0;
    for (const KeySpec* k : keys) {
      wk = std::max(wk, k->name.size());
      wt = std::max(wt, std::string(type_name(k->type)).size());
      wd = std::max(wd, describe_default(*k).size());
    }
    for (const KeySpec* k : keys) {
      out << "  " << pad(k->name, wk) << "  " << pad(type_name(k->type), wt) << "  "
          << pad(describe_default(*k), wd) << "  " << describe_doc(*k) << "\n";
    }
  };
  out << "(top level)\n";
  print_keys({&extends_spec()});
  for (const SectionSpec& section : schema.sections) {
    out << "\n[" << section.name << "]  " << section.doc << "\n";
    std::vector<const KeySpec*> keys;
    for (const KeySpec& k : section.keys) keys.push_back(&k);
    print_keys(keys);
  }
  return out.str();
}

std::string schema_to_markdown(const Schema& schema) {
  std::ostringstream out;
  out << "# Recipe reference\n\n"
      << "Generated by `peftfw schema --markdown` from the declarations in "
         "`framework/src/recipe/schema.cpp`; do not edit by hand.\n\n"
      << "A recipe is a TOML file of the sections below. Run it with `peftfw run recipe.toml`; "
         "check it without running with `peftfw validate recipe.toml`.\n\n"
      << "- Every key is optional: a key left out takes its default; \"unset\" keys have none.\n"
      << "- Unknown sections or keys, wrong types, values outside the choices or range are errors. "
         "All of them are reported at once, each as `file:line:col: message`.\n"
      << "- A float key accepts an integer literal (`lr = 1` is 1.0).\n"
      << "- `extends = \"base.toml\"` merges a base recipe first. Its path is relative to the "
         "extending file; bases may extend further bases (a cycle is an error). The extending "
         "file's keys win; sections and tables merge key by key; arrays are replaced whole.\n"
      << "- A relative path resolves against the folder of the recipe file that sets it; a "
         "default path or one given on the command line resolves against the working directory.\n"
      << "- Command-line overrides `section.key=value` take the value in TOML syntax and are "
         "checked like the file: `peftfw run r.toml train.lr=1e-4 "
         "'adapter.target_modules=[\"in_proj\"]'`. For string and path keys the quotes may be "
         "left out (`train.schedule=linear`).\n";
  const auto print_keys = [&out](const std::vector<const KeySpec*>& keys) {
    out << "| Key | Type | Default | Description |\n"
        << "|---|---|---|---|\n";
    for (const KeySpec* k : keys) {
      const std::string def = k->default_value ? "`" + describe_default(*k) + "`" : "unset";
      out << "| `" << k->name << "` | " << type_name(k->type) << " | " << markdown_cell(def)
          << " | " << markdown_cell(describe_doc(*k)) << " |\n";
    }
  };
  out << "\n## Top level\n\n";
  print_keys({&extends_spec()});
  for (const SectionSpec& section : schema.sections) {
    out << "\n## [" << section.name << "]\n\n" << section.doc << "\n\n";
    std::vector<const KeySpec*> keys;
    for (const KeySpec& k : section.keys) keys.push_back(&k);
    print_keys(keys);
  }
  return out.str();
}

}  // namespace peftfw::recipe
