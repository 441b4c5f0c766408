// Tests of the recipe schema and loader: diagnostics (exact text, with the
// line and column counted by hand from the recipe text), extends, overrides,
// defaults, path resolution, to_toml round trips and the generated docs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "peftfw/plugin/registry.hpp"
#include "peftfw/recipe/recipe.hpp"
#include "peftfw/recipe/schema.hpp"

namespace peftfw::recipe {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

fs::path data_dir() {
#ifdef PEFTFW_RECIPE_TEST_DATA
  return fs::absolute(PEFTFW_RECIPE_TEST_DATA);
#else
  return fs::absolute(fs::path(__FILE__).parent_path() / "data");
#endif
}

// Recipes load as the CLI loads them: with the schema the loaded plugins complete ([adapter]
// method's choices, the lora plugin's r, alpha, dropout, ...).
const Schema& full_schema() { return PluginRegistry::instance().recipe_schema(); }
Recipe load_text(std::string_view text, const std::string& name, const fs::path& dir,
                 const std::vector<std::string>& overrides = {}) {
  return Recipe::from_string(text, name, dir, overrides, full_schema());
}
Recipe load_file(const fs::path& file, const std::vector<std::string>& overrides = {}) {
  return Recipe::load(file, overrides, full_schema());
}

// The diagnostics of a recipe text that must fail to load.
std::vector<std::string> errors_of(const std::string& text,
                                   const std::vector<std::string>& overrides = {}) {
  try {
    load_text(text, "recipe.toml", fs::current_path(), overrides);
  } catch (const RecipeError& e) {
    std::vector<std::string> lines;
    for (const Diagnostic& d : e.diagnostics()) lines.push_back(d.to_string());
    return lines;
  }
  ADD_FAILURE() << "recipe loaded without errors:\n" << text;
  return {};
}

std::vector<std::string> file_errors(const fs::path& file,
                                     const std::vector<std::string>& overrides = {}) {
  try {
    load_file(file, overrides);
  } catch (const RecipeError& e) {
    std::vector<std::string> lines;
    for (const Diagnostic& d : e.diagnostics()) lines.push_back(d.to_string());
    return lines;
  }
  ADD_FAILURE() << "recipe loaded without errors: " << file;
  return {};
}

using Lines = std::vector<std::string>;

// Runs a test inside the data folder so files are named as a user would
// name them ("child.toml", not an absolute path), and restores the cwd.
class RecipeFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    saved_ = fs::current_path();
    fs::current_path(data_dir());
  }
  void TearDown() override { fs::current_path(saved_); }

 private:
  fs::path saved_;
};

// ---------------------------------------------------------------------------
// Diagnostics.

TEST_F(RecipeFiles, MisspelledKeyNamesFileLineColumnAndSuggestion) {
  // misspelled.toml line 12 is "  targt_modules = ...": the key starts at column 3.
  EXPECT_EQ(file_errors("misspelled.toml"),
            Lines{"misspelled.toml:12:3: unknown key 'targt_modules' in [adapter]; "
                  "did you mean 'target_modules'?"});
}

TEST_F(RecipeFiles, ErrorIsAnInputErrorWithAllDiagnosticsInWhat) {
  try {
    load_file("misspelled.toml");
    FAIL() << "expected RecipeError";
  } catch (const InputError& e) {
    EXPECT_EQ(e.exit_code(), 2);
    EXPECT_EQ(std::string(e.what()),
              "misspelled.toml:12:3: unknown key 'targt_modules' in [adapter]; "
              "did you mean 'target_modules'?");
  }
}

TEST_F(RecipeFiles, SyntaxErrorCarriesTomlPosition) {
  // Line 3 is "lr =": the value should start at column 5, where the line ends.
  const Lines errors = file_errors("syntax_error.toml");
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].rfind("syntax_error.toml:3:5: TOML syntax error: ", 0), 0u) << errors[0];
  EXPECT_EQ(errors[0].find('\n'), std::string::npos);
}

TEST(Recipe, MissingFileIsReported) {
  EXPECT_EQ(file_errors("/nonexistent/peftfw/r.toml"),
            Lines{"/nonexistent/peftfw/r.toml: cannot read recipe: no such file"});
}

TEST(Recipe, WrongTypeNamesExpectedAndFound) {
  // Line 2 `lr = "abc"`: the value starts at column 6.
  EXPECT_EQ(errors_of("[train]\nlr = \"abc\"\n"),
            Lines{R"(recipe.toml:2:6: [train] lr: expected a float, found string "abc")"});
  // Line 2 `batch_size = 8.0`: column 14.
  EXPECT_EQ(errors_of("[train]\nbatch_size = 8.0\n"),
            Lines{"recipe.toml:2:14: [train] batch_size: expected an integer, found float 8.0"});
  // Line 2 `packing = 1`: column 11.
  EXPECT_EQ(errors_of("[data]\npacking = 1\n"),
            Lines{"recipe.toml:2:11: [data] packing: expected a boolean (true or false), found "
                  "integer 1"});
}

TEST(Recipe, ArrayElementOfWrongTypeIsPointedAt) {
  // Line 2 `formats = ["peft", 1]`: element 2 starts at column 20.
  EXPECT_EQ(errors_of("[output]\nformats = [\"peft\", 1]\n"),
            Lines{"recipe.toml:2:20: [output] formats: expected an array of strings, but "
                  "element 2 is integer 1"});
  EXPECT_EQ(errors_of("[adapter]\ntarget_modules = 3\n"),
            Lines{"recipe.toml:2:18: [adapter] target_modules: expected a string (a regex) or an "
                  "array of strings (names), found integer 3"});
}

TEST(Recipe, AllErrorsAreReportedInFileOrder) {
  // toml++ keeps tables sorted by name ([adapter] before [train]); the
  // diagnostics still come in line order.
  const std::string text =
      "[train]\n"
      "lr = \"fast\"\n"
      "[adapter]\n"
      "dropot = 0.1\n";
  const Lines expected{
      R"(recipe.toml:2:6: [train] lr: expected a float, found string "fast")",
      "recipe.toml:4:1: unknown key 'dropot' in [adapter]; did you mean 'dropout'?"};
  EXPECT_EQ(errors_of(text), expected);
  try {
    load_text(text, "recipe.toml", fs::current_path());
    FAIL();
  } catch (const RecipeError& e) {
    EXPECT_EQ(std::string(e.what()), expected[0] + "\n" + expected[1]);
  }
}

TEST(Recipe, KeyInWrongSectionNamesTheRightOne) {
  EXPECT_EQ(errors_of("[model]\nwarmup_steps = 10\n"),
            Lines{"recipe.toml:2:1: 'warmup_steps' is not a key of [model]; it belongs in "
                  "[train]"});
  // lr is declared in two sections.
  EXPECT_EQ(errors_of("[model]\nlr = 1e-4\n"),
            Lines{"recipe.toml:2:1: 'lr' is not a key of [model]; it belongs in [ssm] or [train]"});
  EXPECT_EQ(errors_of("max_steps = 10\n"),
            Lines{"recipe.toml:1:1: 'max_steps' is not a top-level key; it belongs in [train]"});
  // A near miss of a key from another section.
  EXPECT_EQ(errors_of("[adapter]\nwarmup_step = 3\n"),
            Lines{"recipe.toml:2:1: unknown key 'warmup_step' in [adapter]; did you mean "
                  "'warmup_steps' in [train]?"});
}

TEST(Recipe, UnknownKeyWithoutNearMatchListsTheSectionKeys) {
  EXPECT_EQ(errors_of("[eval]\nbanana = 1\n"),
            Lines{"recipe.toml:2:1: unknown key 'banana' in [eval]; its keys are tasks, samples, "
                  "max_new_tokens"});
}

// Names from HF TrainingArguments, PEFT, TRL and axolotl point to the peftfw key, in the section
// where they were written or the one they belong to.
TEST(Recipe, OtherToolsNamesPointToThePeftfwKey) {
  EXPECT_EQ(errors_of("[train]\nlearning_rate = 1e-4\n"),
            Lines{"recipe.toml:2:1: unknown key 'learning_rate' in [train]; peftfw calls it 'lr'"});
  EXPECT_EQ(errors_of("[train]\ngradient_accumulation_steps = 4\n"),
            Lines{"recipe.toml:2:1: unknown key 'gradient_accumulation_steps' in [train]; peftfw calls it "
                  "'micro_batch_size'"});
  EXPECT_EQ(errors_of("[adapter]\nlora_alpha = 16\n"),
            Lines{"recipe.toml:2:1: unknown key 'lora_alpha' in [adapter]; peftfw calls it 'alpha'"});
  EXPECT_EQ(errors_of("[train]\nlora_dropout = 0.1\n"),
            Lines{"recipe.toml:2:1: unknown key 'lora_dropout' in [train]; peftfw calls it 'dropout' in [adapter]"});
  EXPECT_EQ(errors_of("num_train_epochs = 3\n"),
            Lines{"recipe.toml:1:1: unknown top-level key 'num_train_epochs'; peftfw calls it 'epochs' in [train]"});
  EXPECT_EQ(errors_of("[output]\noutput_dir = \"x\"\n"),
            Lines{"recipe.toml:2:1: unknown key 'output_dir' in [output]; peftfw calls it 'dir'"});
}

TEST(Recipe, UnknownSectionSuggestsOrListsSections) {
  // "[trian]": the name starts at column 2.
  EXPECT_EQ(errors_of("[trian]\nlr = 1\n"),
            Lines{"recipe.toml:1:2: unknown section [trian]; did you mean [train]?"});
  EXPECT_EQ(errors_of("[optimizer]\nlr = 1\n"),
            Lines{"recipe.toml:1:2: unknown section [optimizer]; the sections are [model], "
                  "[adapter], [initial_state], [sdt], [state_offset], [ssm], [data], [train], [output], [eval]"});
  EXPECT_EQ(errors_of("extend = \"base.toml\"\n"),
            Lines{"recipe.toml:1:1: unknown top-level key 'extend'; did you mean 'extends'?"});
  EXPECT_EQ(errors_of("train = 3\n"),
            Lines{"recipe.toml:1:1: [train] must be a table (a [train] section), found integer 3"});
}

TEST(Recipe, ValueOutsideChoicesListsThem) {
  // `schedule = "cosin"`: the value starts at column 12.
  EXPECT_EQ(errors_of("[train]\nschedule = \"cosin\"\n"),
            Lines{R"(recipe.toml:2:12: [train] schedule: expected one of "cosine", "linear", )"
                  R"("constant", found "cosin"; did you mean "cosine"?)"});
  EXPECT_EQ(errors_of("[model]\ndtype = \"fp8\"\n"),
            Lines{R"(recipe.toml:2:9: [model] dtype: expected one of "float32", "bfloat16", )"
                  R"("float16", found "fp8")"});
}

TEST(Recipe, ValueOutsideRangeIsReported) {
  EXPECT_EQ(errors_of("[adapter]\nr = 0\ndropout = 1.5\n[data]\neval_fraction = -0.1\n"),
            (Lines{"recipe.toml:2:5: [adapter] r: must be between 1 and 65536, found 0",
                   "recipe.toml:3:11: [adapter] dropout: must be between 0 and 1, found 1.5",
                   "recipe.toml:5:17: [data] eval_fraction: must be between 0 and 1, found -0.1"}));
  // The bounds themselves are allowed.
  EXPECT_NO_THROW(load_text("[adapter]\nr = 1\ndropout = 1\n", "r.toml", "."));
}

TEST(Recipe, FloatKeysAcceptIntegerLiteralsAndRejectNonFinite) {
  const Recipe r = load_text("[train]\nlr = 1\n", "r.toml", ".");
  EXPECT_EQ(r.get_float("train", "lr"), 1.0);
  EXPECT_EQ(errors_of("[train]\nlr = nan\n"),
            Lines{"recipe.toml:2:6: [train] lr: expected a float, found float nan (not finite)"});
}

// ---------------------------------------------------------------------------
// Values and defaults.

TEST(Recipe, DefaultsAreFilledAndMarkedUnset) {
  const Recipe r = load_text("", "empty.toml", ".");
  EXPECT_EQ(r.get_string("adapter", "method"), "lora");
  EXPECT_EQ(r.get_int("adapter", "r"), 16);
  EXPECT_EQ(r.get_float("adapter", "alpha"), 32.0);
  EXPECT_EQ(r.get_float("train", "lr"), 2e-4);
  EXPECT_EQ(r.get_float("train", "adam_eps"), 1e-8);
  EXPECT_EQ(r.get_int("train", "max_steps"), -1);
  EXPECT_FALSE(r.get_bool("adapter", "use_rslora"));
  EXPECT_EQ(r.get_strings("output", "formats"), std::vector<std::string>{"peft"});
  EXPECT_EQ(r.get_strings("ssm", "train"), std::vector<std::string>{});
  EXPECT_EQ(r.get_string("data", "template"), "auto");
  EXPECT_EQ(r.get_string("output", "dir"), "runs/default");  // relative to the working directory
  EXPECT_FALSE(r.is_set("train", "lr"));
  EXPECT_EQ(r.where("train", "lr"), std::nullopt);
  EXPECT_TRUE(r.has_value("train", "lr"));
  // Keys without a default stay unset.
  EXPECT_FALSE(r.has_value("adapter", "target_modules"));
  EXPECT_FALSE(r.has_value("ssm", "lr"));
  EXPECT_FALSE(r.has_value("model", "config_inline"));
  EXPECT_THROW(r.get_float("ssm", "lr"), std::logic_error);
  EXPECT_EQ(r.source_name(), "empty.toml");
  EXPECT_EQ(r.files(), std::vector<std::string>{"empty.toml"});
}

TEST(Recipe, AccessorMisuseIsALogicError) {
  const Recipe r = load_text("", "r.toml", ".");
  EXPECT_THROW(r.get_float("train", "learning_rate"), std::logic_error);
  EXPECT_THROW(r.get_int("train", "lr"), std::logic_error);
  EXPECT_THROW(r.get_path("output", "dir"), std::logic_error);
  EXPECT_THROW(r.is_set("nosuch", "lr"), std::logic_error);
}

TEST(Recipe, SetValuesAreTypedAndLocated) {
  const Recipe r = load_text(
      "[adapter]\n"
      "method = \"dora\"\n"
      "target_modules = \".*\\\\.(in_proj|out_proj)$\"\n"
      "exclude_modules = [\"lm_head\"]\n"
      "[train]\n"
      "  grad_checkpointing = true\n",
      "r.toml", ".");
  EXPECT_EQ(r.get_string("adapter", "method"), "dora");
  EXPECT_TRUE(r.is_set("adapter", "method"));
  EXPECT_EQ(r.where("adapter", "method"), "r.toml:2:1");
  EXPECT_EQ(r.where("train", "grad_checkpointing"), "r.toml:6:3");
  EXPECT_TRUE(r.get_bool("train", "grad_checkpointing"));
  const TargetPattern target = r.get_pattern("adapter", "target_modules");
  EXPECT_TRUE(target.is_regex);
  EXPECT_EQ(target.regex, R"(.*\.(in_proj|out_proj)$)");
  const TargetPattern exclude = r.get_pattern("adapter", "exclude_modules");
  EXPECT_FALSE(exclude.is_regex);
  EXPECT_EQ(exclude.names, std::vector<std::string>{"lm_head"});
}

TEST(Recipe, RelativePathsResolveAgainstTheRecipeFolder) {
  const fs::path base = fs::absolute("/tmp/peftfw-recipes/sub");
  const Recipe r = load_text(
      "[model]\npath = \"ckpt\"\nconfig = \"/abs/config.json\"\n"
      "[data]\npath = \"../d/train.jsonl\"\n",
      "r.toml", base);
  EXPECT_EQ(r.get_path("model", "path"), fs::path("/tmp/peftfw-recipes/sub/ckpt"));
  EXPECT_EQ(r.get_path("model", "config"), fs::path("/abs/config.json"));
  EXPECT_EQ(r.get_path("data", "path"), fs::path("/tmp/peftfw-recipes/d/train.jsonl"));
  EXPECT_EQ(errors_of("[model]\npath = \"\"\n"),
            Lines{"recipe.toml:2:8: [model] path: expected a path (a string), found an empty "
                  "string"});
}

// ---------------------------------------------------------------------------
// extends.

TEST_F(RecipeFiles, ExtendsMergesAndTheExtendingFileWins) {
  const Recipe r = load_file("child.toml");
  EXPECT_EQ(r.files(), (std::vector<std::string>{"child.toml", "bases/base.toml"}));
  EXPECT_EQ(r.get_float("train", "lr"), 5e-4);       // child
  EXPECT_EQ(r.get_int("train", "batch_size"), 8);    // base
  EXPECT_EQ(r.get_float("train", "epochs"), 3.0);    // default
  EXPECT_EQ(r.where("train", "lr"), "child.toml:9:1");
  EXPECT_EQ(r.where("train", "batch_size"), "bases/base.toml:15:1");
  EXPECT_EQ(r.get_pattern("adapter", "target_modules").names,
            std::vector<std::string>{"in_proj"});
  // Tables merge key by key, nested tables too.
  EXPECT_EQ(r.get_table_json("model", "config_inline"),
            json::parse(R"({"hidden_size": 64, "num_layers": 4,
                            "ssm": {"d_state": 16, "chunk_size": 8}})"));
  // Each path resolves against the folder of the file that set it.
  EXPECT_EQ(r.get_path("model", "path"), data_dir() / "bases" / "ckpt");
  EXPECT_EQ(r.get_path("data", "path"), data_dir() / "train.jsonl");
}

TEST_F(RecipeFiles, ExtendsChainsAndOverridesWinOverAllFiles) {
  const Recipe r = load_file("grandchild.toml", {"train.lr=1e-4"});
  EXPECT_EQ(r.files(),
            (std::vector<std::string>{"grandchild.toml", "child.toml", "bases/base.toml"}));
  EXPECT_EQ(r.get_float("train", "epochs"), 1.0);
  EXPECT_EQ(r.get_float("train", "lr"), 1e-4);
  EXPECT_EQ(r.where("train", "lr"), "<override 1: train.lr=1e-4>");
  EXPECT_EQ(r.get_int("train", "batch_size"), 8);
  EXPECT_EQ(r.get_path("model", "path"), data_dir() / "bases" / "ckpt");
}

TEST_F(RecipeFiles, ExtendsCycleIsReported) {
  // cycle_b.toml line 2 `extends = "cycle_a.toml"`: the value starts at column 11.
  EXPECT_EQ(file_errors("cycle_a.toml"),
            Lines{"cycle_b.toml:2:11: extends cycle: cycle_a.toml -> cycle_b.toml -> "
                  "cycle_a.toml"});
}

TEST_F(RecipeFiles, MissingBaseIsReportedAtTheExtendsValue) {
  EXPECT_EQ(file_errors("missing_base.toml"),
            Lines{"missing_base.toml:2:11: cannot read base recipe 'no_such_base.toml': "
                  "no such file"});
}

TEST_F(RecipeFiles, ErrorsInBaseAndExtendingFilePointIntoTheirFiles) {
  EXPECT_EQ(file_errors("child_errors.toml"),
            (Lines{R"(child_errors.toml:4:14: [train] batch_size: expected an integer, found )"
                   R"(string "big")",
                   "bases/base_errors.toml:3:5: [adapter] r: must be between 1 and 65536, found 0"}));
}

// ---------------------------------------------------------------------------
// Command-line overrides.

TEST(Recipe, OverridesAreTypedTomlValues) {
  const Recipe r = load_text("[train]\nlr = 1e-3\n", "r.toml", "/tmp",
                                       {"train.lr=1e-4", "adapter.target_modules=[\"in_proj\"]",
                                        "train.schedule=linear", "train.batch_size = 4",
                                        "model.config=out/x", "model.config_inline.ssm.d_state=32",
                                        "data.template=\"alpaca\""});
  EXPECT_EQ(r.get_float("train", "lr"), 1e-4);
  EXPECT_EQ(r.get_pattern("adapter", "target_modules").names,
            std::vector<std::string>{"in_proj"});
  EXPECT_EQ(r.get_string("train", "schedule"), "linear");  // bare word for a string key
  EXPECT_EQ(r.get_int("train", "batch_size"), 4);
  EXPECT_EQ(r.get_string("data", "template"), "alpaca");
  // Override paths resolve against the working directory, not the recipe's folder.
  EXPECT_EQ(r.get_path("model", "config"), fs::current_path() / "out" / "x");
  EXPECT_EQ(r.get_table_json("model", "config_inline"), json::parse(R"({"ssm": {"d_state": 32}})"));
  EXPECT_TRUE(r.is_set("train", "schedule"));
  EXPECT_EQ(r.where("train", "schedule"), "<override 3: train.schedule=linear>");
}

TEST(Recipe, BadOverridesAreReportedWithTheirText) {
  EXPECT_EQ(errors_of("", {"train.lr=1e-4", "train.lr=abc"}),
            Lines{"<override 2: train.lr=abc>: [train] lr: expected a float, found 'abc', which is "
                  "not a TOML value"});
  EXPECT_EQ(errors_of("", {"train.batch_size=1.5"}),
            Lines{"<override 1: train.batch_size=1.5>: [train] batch_size: expected an integer, "
                  "found float 1.5"});
  EXPECT_EQ(errors_of("", {"train.lrr=1"}),
            Lines{"<override 1: train.lrr=1>: unknown key 'lrr' in [train]; did you mean 'lr'?"});
  EXPECT_EQ(errors_of("", {"trian.lr=1"}),
            Lines{"<override 1: trian.lr=1>: unknown section [trian]; did you mean [train]?"});
  EXPECT_EQ(errors_of("", {"model.warmup_steps=1"}),
            Lines{"<override 1: model.warmup_steps=1>: 'warmup_steps' is not a key of [model]; "
                  "it belongs in [train]"});
  EXPECT_EQ(errors_of("", {"train.lr"}),
            Lines{"<override 1: train.lr>: expected section.key=value with the value in TOML "
                  "syntax (e.g. train.lr=1e-4)"});
  EXPECT_EQ(errors_of("", {"model.path=1"}),
            Lines{R"(<override 1: model.path=1>: [model] path: expected a path (a string), found )"
                  R"(integer 1; to pass it as a string, quote it: model.path='"1"')"});
  EXPECT_EQ(errors_of("", {"train.schedule=cosin"}),
            Lines{R"(<override 1: train.schedule=cosin>: [train] schedule: expected one of )"
                  R"("cosine", "linear", "constant", found "cosin"; did you mean "cosine"?)"});
  EXPECT_EQ(errors_of("", {"adapter.r=0"}),
            Lines{"<override 1: adapter.r=0>: [adapter] r: must be between 1 and 65536, found 0"});
}

TEST(Recipe, FileErrorsComeBeforeOverrideErrors) {
  EXPECT_EQ(errors_of("[train]\nlr = \"x\"\n", {"train.epochs=abc"}),
            (Lines{R"(recipe.toml:2:6: [train] lr: expected a float, found string "x")",
                   "<override 1: train.epochs=abc>: [train] epochs: expected a float, found "
                   "'abc', which is not a TOML value"}));
}

// ---------------------------------------------------------------------------
// to_toml.

// Every key of `a` and `b` has the same value.
void expect_same_values(const Recipe& a, const Recipe& b) {
  for (const SectionSpec& section : a.schema().sections) {
    for (const KeySpec& key : section.keys) {
      SCOPED_TRACE("[" + section.name + "] " + key.name);
      const char* s = section.name.c_str();
      const char* k = key.name.c_str();
      ASSERT_EQ(a.has_value(s, k), b.has_value(s, k));
      if (!a.has_value(s, k)) continue;
      switch (key.type) {
        case ValueType::kString: EXPECT_EQ(a.get_string(s, k), b.get_string(s, k)); break;
        case ValueType::kInteger: EXPECT_EQ(a.get_int(s, k), b.get_int(s, k)); break;
        case ValueType::kFloat: EXPECT_EQ(a.get_float(s, k), b.get_float(s, k)); break;
        case ValueType::kBoolean: EXPECT_EQ(a.get_bool(s, k), b.get_bool(s, k)); break;
        case ValueType::kStringArray: EXPECT_EQ(a.get_strings(s, k), b.get_strings(s, k)); break;
        case ValueType::kPath: EXPECT_EQ(a.get_path(s, k), b.get_path(s, k)); break;
        case ValueType::kTable: EXPECT_EQ(a.get_table_json(s, k), b.get_table_json(s, k)); break;
        case ValueType::kStringOrArray: {
          const TargetPattern pa = a.get_pattern(s, k), pb = b.get_pattern(s, k);
          EXPECT_EQ(pa.is_regex, pb.is_regex);
          EXPECT_EQ(pa.regex, pb.regex);
          EXPECT_EQ(pa.names, pb.names);
          break;
        }
      }
    }
  }
}

TEST_F(RecipeFiles, ToTomlRoundTrips) {
  const Recipe original = load_file(
      "grandchild.toml",
      {"adapter.exclude_modules=\"lm_head|embed\"",
       "data.template_string=\"Q: \\\"{x}\\\"\\n\\tA:\"",
       "model.config_inline.rope={theta = 1e4, scale = 1.0, kinds = [\"a\", 2, true]}",
       "model.config_inline.names={\"a b\" = 1}", "train.lr=3e-5", "ssm.lr=0.001"});
  const std::string text = original.to_toml();
  EXPECT_EQ(text.find("\nextends"), std::string::npos);  // bases are flattened in
  // Paths are written absolute, so the folder the copy is read from does not matter.
  const Recipe copy = load_text(text, "resolved.toml", "/");
  expect_same_values(original, copy);
  EXPECT_EQ(copy.get_string("data", "template_string"), "Q: \"{x}\"\n\tA:");
  EXPECT_EQ(copy.get_table_json("model", "config_inline")["rope"]["scale"].type(),
            json::value_t::number_float);
  // Writing the copy gives the same TOML apart from the provenance comments.
  const auto strip_comments = [](const std::string& t) {
    std::istringstream in(t);
    std::string line, out;
    while (std::getline(in, line)) {
      if (!line.empty() && line[0] == '#') continue;
      out += line.substr(0, line.find("  # ")) + "\n";
    }
    return out;
  };
  EXPECT_EQ(strip_comments(copy.to_toml()), strip_comments(text));
}

TEST(Recipe, ToTomlOfDefaultsLoadsBack) {
  // Every default passes its own key's checks.
  const Recipe defaults = load_text("", "empty.toml", ".");
  const Recipe copy = load_text(defaults.to_toml(), "resolved.toml", "/");
  expect_same_values(defaults, copy);
}

// ---------------------------------------------------------------------------
// Schema and docs.

TEST(Schema, DeclarationsAreConsistent) {
  std::set<std::string> sections;
  for (const SectionSpec& section : full_schema().sections) {
    EXPECT_TRUE(sections.insert(section.name).second) << "duplicate section " << section.name;
    EXPECT_FALSE(section.doc.empty()) << section.name;
    std::set<std::string> keys;
    for (const KeySpec& key : section.keys) {
      SCOPED_TRACE("[" + section.name + "] " + key.name);
      EXPECT_TRUE(keys.insert(key.name).second) << "duplicate key";
      EXPECT_FALSE(key.doc.empty());
      EXPECT_EQ(key.doc.find('\n'), std::string::npos);
      if (!key.choices.empty()) {
        EXPECT_TRUE(key.type == ValueType::kString || key.type == ValueType::kStringArray);
      }
      if (key.min || key.max) {
        EXPECT_TRUE(key.type == ValueType::kInteger || key.type == ValueType::kFloat);
      }
    }
  }
}

TEST(Schema, TextListsEveryKeyWithTypeAndDefault) {
  const std::string text = schema_to_text(full_schema());
  EXPECT_NE(text.find("[adapter]"), std::string::npos);
  // Columns: key padded to "exclude_modules" (15), type to "string or string array" (22),
  // default to "\"error\"" (7), each followed by two spaces.
  EXPECT_NE(text.find("  r" + std::string(14 + 2, ' ') + "integer" + std::string(15 + 2, ' ') +
                      "16" + std::string(5 + 2, ' ') + "LoRA rank. (between 1 and 65536) Elsewhere: lora_r, rank, lora_rank.\n"),
            std::string::npos)
      << text;
  for (const SectionSpec& section : full_schema().sections) {
    for (const KeySpec& key : section.keys) {
      EXPECT_NE(text.find("  " + key.name + " "), std::string::npos) << key.name;
    }
  }
}

TEST(Schema, MarkdownIsDeterministicAndComplete) {
  const std::string md = schema_to_markdown(full_schema());
  EXPECT_EQ(md, schema_to_markdown(full_schema()));
  EXPECT_NE(md.find("Generated by `peftfw schema --markdown`"), std::string::npos);
  EXPECT_NE(md.find("| `lr` | float | `2e-4` | Peak learning rate. (at least 0) Elsewhere: learning_rate. |\n"),
            std::string::npos);
  EXPECT_NE(md.find("| `method` | string | `\"lora\"` | Fine-tuning method;"), std::string::npos) << md;
  EXPECT_NE(md.find(" lora: low-rank adapters on the target modules"), std::string::npos) << md;
  for (const SectionSpec& section : full_schema().sections) {
    EXPECT_NE(md.find("\n## [" + section.name + "]\n"), std::string::npos) << section.name;
    for (const KeySpec& key : section.keys) {
      EXPECT_NE(md.find("| `" + key.name + "` |"), std::string::npos) << key.name;
    }
  }
}

TEST(Schema, DocsRecipesMdIsUpToDate) {
#ifdef PEFTFW_DOCS_RECIPES_MD
  std::ifstream in(PEFTFW_DOCS_RECIPES_MD, std::ios::binary);
  ASSERT_TRUE(in) << "cannot read " << PEFTFW_DOCS_RECIPES_MD
                  << "; generate it with `peftfw schema --markdown > docs/recipes.md`";
  std::ostringstream text;
  text << in.rdbuf();
  EXPECT_EQ(text.str(), schema_to_markdown(full_schema()))
      << "docs/recipes.md is stale; regenerate it with `peftfw schema --markdown > "
         "docs/recipes.md`";
#else
  GTEST_SKIP() << "PEFTFW_DOCS_RECIPES_MD is not defined by this build";
#endif
}

// ---------------------------------------------------------------------------
// Limits on hostile recipes: size cap, at most 50 diagnostics, excerpts.

// A folder of its own under the system temp folder, removed at the end.
class ScratchDir {
 public:
  ScratchDir() {
    std::string templ = (fs::temp_directory_path() / "peftfw_recipe_XXXXXX").string();
    if (::mkdtemp(templ.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = templ;
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  fs::path write(const std::string& name, const std::string& text) const {
    std::ofstream(path_ / name, std::ios::binary) << text;
    return path_ / name;
  }

 private:
  fs::path path_;
};

// A valid recipe padded with a comment to exactly `bytes` bytes.
std::string recipe_of_size(std::size_t bytes) {
  std::string text = "[train]\nlr = 0.5\n#";
  text.append(bytes - text.size() - 1, 'x');
  return text + "\n";
}

const std::string kCapText =
    "over the limit of 1048576 bytes (1 MiB) for a recipe (a recipe holds settings; training "
    "data goes in the file named by data.path)";

TEST(RecipeLimits, FileOverOneMibIsRefusedBeforeParsing) {
  ScratchDir dir;
  // 1 MiB = 2^20 = 1048576 bytes is allowed; one byte more is not.
  const fs::path ok = dir.write("ok.toml", recipe_of_size(1048576));
  EXPECT_EQ(load_file(ok).get_float("train", "lr"), 0.5);
  const fs::path big = dir.write("big.toml", recipe_of_size(1048577));
  EXPECT_EQ(file_errors(big),
            Lines{big.string() + ": cannot read recipe: it is 1048577 bytes, " + kCapText});
  EXPECT_EQ(errors_of(recipe_of_size(1048577)),
            Lines{"recipe.toml: cannot read recipe: it is 1048577 bytes, " + kCapText});
}

TEST(RecipeLimits, EndlessBaseIsCutAtTheCap) {
  // extends = "/dev/zero": the value starts at column 11. Reading it whole would never end.
  EXPECT_EQ(errors_of("extends = \"/dev/zero\"\n"),
            Lines{"recipe.toml:1:11: cannot read base recipe '/dev/zero': it holds more than "
                  "1048576 bytes, " + kCapText});
}

// "[train]" then `n` unknown keys, one per line from line 2.
std::string unknown_keys(int n) {
  std::string text = "[train]\n";
  for (int i = 0; i < n; ++i) text += "unknown_" + std::to_string(i) + " = 1\n";
  return text;
}

TEST(RecipeLimits, AtMostFiftyDiagnosticsThenACount) {
  try {
    load_text(unknown_keys(120), "recipe.toml", fs::current_path());
    FAIL() << "expected RecipeError";
  } catch (const RecipeError& e) {
    // The first 50 in file order (lines 2..51), then 120 - 50 = 70 counted.
    ASSERT_EQ(e.diagnostics().size(), 50u);
    for (std::size_t i = 0; i < 50; ++i) EXPECT_EQ(e.diagnostics()[i].line, i + 2);
    EXPECT_EQ(e.omitted(), 70u);
    const std::string what = e.what();
    EXPECT_EQ(what.substr(what.rfind('\n') + 1), "... and 70 more errors");
    EXPECT_EQ(std::count(what.begin(), what.end(), '\n'), 50);  // 50 lines + the count line
  }
  try {
    load_text(unknown_keys(51), "recipe.toml", fs::current_path());
    FAIL() << "expected RecipeError";
  } catch (const RecipeError& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.substr(what.rfind('\n') + 1), "... and 1 more error");
  }
  try {
    load_text(unknown_keys(50), "recipe.toml", fs::current_path());
    FAIL() << "expected RecipeError";
  } catch (const RecipeError& e) {
    EXPECT_EQ(e.omitted(), 0u);
    EXPECT_EQ(std::string(e.what()).find("more error"), std::string::npos);
  }
}

TEST(RecipeLimits, FileDiagnosticsComeFirstWhenTheCapCuts) {
  // 60 file errors and one override error: the file's first 50 are kept.
  try {
    load_text(unknown_keys(60), "recipe.toml", fs::current_path(), {"train.nope=1"});
    FAIL() << "expected RecipeError";
  } catch (const RecipeError& e) {
    ASSERT_EQ(e.diagnostics().size(), 50u);
    for (const Diagnostic& d : e.diagnostics()) EXPECT_EQ(d.file, "recipe.toml");
    EXPECT_EQ(e.omitted(), 11u);
  }
}

TEST(RecipeLimits, LongValuesAreCutTo200Bytes) {
  const std::string x(5000, 'x');
  // The value starts at column 10 of line 2.
  EXPECT_EQ(errors_of("[adapter]\nmethod = \"" + x + "\"\n"),
            Lines{"recipe.toml:2:10: [adapter] method: expected one of \"none\", \"initial_state\", \"lora\", "
                  "\"dora\", \"bitfit\", \"full\", \"sdt\", \"state_offset\", found \"" + std::string(200, 'x') +
                  "...\" (5000 bytes in all)"});
  const Lines key = errors_of("[train]\n" + std::string(100000, 'k') + " = 1\n");
  ASSERT_EQ(key.size(), 1u);
  EXPECT_NE(key[0].find("unknown key '" + std::string(200, 'k') +
                        "...' (100000 bytes in all) in [train]"),
            std::string::npos)
      << key[0].substr(0, 400);
  EXPECT_LT(key[0].size(), 2000u);
  // An override is named by its text: "train.lr=" + 5000 bytes = 5009 bytes.
  const Lines override = errors_of("", {"train.lr=" + x});
  ASSERT_EQ(override.size(), 1u);
  const std::string expected = "<override 1: train.lr=" + std::string(191, 'x') +
                               "... (5009 bytes in all)>: [train] lr: expected a float, found '" +
                               std::string(200, 'x') +
                               "...' (5000 bytes in all), which is not a TOML value";
  EXPECT_EQ(override[0], expected);
}

// Found by tests/fuzz/fuzz_recipe.cpp: an override's bytes reached the resolved recipe, whose
// comments may not hold control characters and whose text must be UTF-8.
TEST(RecipeLimits, ResolvedRecipeLoadsAgainWhateverTheOverrideBytes) {
  const Recipe r = load_text("", "recipe.toml", fs::current_path(),
                                       {std::string("output.dir=h\x07\x00\x10/x", 17)});
  EXPECT_EQ(r.get_string("output", "dir"), std::string("h\x07\x00\x10/x", 6));
  const std::string resolved = r.to_toml();
  EXPECT_NE(resolved.find("# <override 1: output.dir=h\\x07\\x00\\x10/x>"), std::string::npos)
      << resolved;
  const Recipe again = load_text(resolved, "resolved.toml", fs::current_path());
  EXPECT_EQ(again.get_string("output", "dir"), std::string("h\x07\x00\x10/x", 6));
  // Bytes that are not UTF-8 are refused, in the value or in a table key (byte 1 is 'd').
  EXPECT_EQ(errors_of("", {"data.template=\xff"}),
            Lines{"<override 1: data.template=\xff>: byte 15 (\\xFF) is not valid UTF-8; "
                  "overrides, like recipes, are UTF-8 text"});
  EXPECT_EQ(errors_of("", {"model.config_inline.\xc3\x28=1"}).size(), 1u);
}

// toml++ 3.3.0 (Debian 12) has two debug assertions that malformed recipes reach
// (marzer/tomlplusplus#301 and #190, fixed upstream); with NDEBUG, as peftfw links it, they
// are skipped and the input must still end in a TOML syntax error or its right value. The fuzz
// build compiles toml++ with its checks off (tests/fuzz/CMakeLists.txt) and relies on this test.
TEST(RecipeLimits, TomlPlusPlusAssertionPathsGiveSyntaxErrors) {
  const auto utf8 = [](uint32_t cp) {
    std::string s;
    if (cp < 0x800) {
      s += static_cast<char>(0xC0 | (cp >> 6));
    } else {
      s += static_cast<char>(0xE0 | (cp >> 12));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    }
    return s + static_cast<char>(0x80 | (cp & 0x3F));
  };
  for (const char* text : {"[#]\n", "[[[1]]]\n", "[[=\n"}) {
    const Lines errors = errors_of(text);
    ASSERT_EQ(errors.size(), 1u) << text;
    EXPECT_NE(errors[0].find("TOML syntax error"), std::string::npos) << errors[0];
  }
  // U+00A1..U+0499 reach the unreachable default of toml++'s non-ASCII whitespace check.
  for (uint32_t cp = 0xA1; cp <= 0x499; ++cp) {
    SCOPED_TRACE(cp);
    const Lines errors = errors_of("[train" + utf8(cp) + "x]\n");
    ASSERT_EQ(errors.size(), 1u);
    EXPECT_NE(errors[0].find("TOML syntax error"), std::string::npos) << errors[0];
    // After a line-ending backslash in a multi-line string, the character is the text.
    const Recipe r = load_text("[data]\ntemplate_string = \"\"\"\\\n" + utf8(cp) +
                                             "{output}\"\"\"\n",
                                         "recipe.toml", fs::current_path());
    EXPECT_EQ(r.get_string("data", "template_string"), utf8(cp) + "{output}");
  }
}

}  // namespace
}  // namespace peftfw::recipe
