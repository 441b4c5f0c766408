// Evaluation metrics of the seed study (HarmoniqOS/ssm-aware-lora-finetuning,
// scripts/eval_models.py), reimplemented without torch so that peftfw's
// figures can be set beside the study's eval_results*.json.
//
// Three tasks: "classification" (document classification: one schema label),
// "mapping" (schema mapping: a JSON object with "mapping" and
// "unmapped_expected") and "rules" (rule generation: a JSON rule with
// violation_type, severity, where_clause, objective_ids). Each has a scorer
// for one (prediction, expected) pair and an aggregate over a run.
//
// The scorers copy the study's Python line by line, quirks included (see
// docs/evaluation.md): contains_match looks at the first line only, the
// study's "has_all_fields_pct" is the minimum of four per-field rates,
// invalid JSON scores 0 but stays in the denominator. Where the study's
// scorer raised a Python exception (for instance "mapping": null in the
// prediction), eval_models.py counted the example in `errors` and left it
// out of every mean; our scorers return that outcome as a ScoringError so
// the aggregates can do the same, and report it.
//
// Percentages are rounded as Python's round(x * 100, 2) (correctly rounded,
// ties to even); the unrounded value is kept beside it.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace peftfw::eval {

enum class Task { Classification, Mapping, Rules };

// "classification", "mapping" or "rules". InputError for anything else (the
// study's own names, e.g. "rule_generation", are answered with ours).
Task parse_task(std::string_view name);
const char* task_name(Task task);

// One (generated text, reference output) pair.
struct Example {
  std::string prediction;
  std::string expected;
};

// The study's scorer raised here; the example is left out of the means and
// counted in TaskScores::errors. `what` is the Python exception it raised.
struct ScoringError {
  std::string what;
};

struct ClassificationScore {
  bool exact_match = false;
  bool contains_match = false;
  std::string predicted;  // the normalised first line the comparisons used
  std::string expected;   // expected.strip().lower()
};

struct MappingScore {
  bool json_valid = false;
  double mapping_accuracy = 0.0;   // in [0, 1]
  double unmapped_accuracy = 0.0;  // in [0, 1]
};

struct RuleScore {
  bool json_valid = false;
  bool has_violation_type = false;
  bool has_severity = false;
  bool has_where_clause = false;
  bool has_objective_ids = false;  // present and a JSON array
  bool severity_correct = false;
  bool violation_type_correct = false;
  bool has_all_fields() const {
    return has_violation_type && has_severity && has_where_clause && has_objective_ids;
  }
};

// A scorer's result: a score, or the exception the study's scorer raised.
template <class Score>
struct Outcome {
  std::optional<Score> score;
  std::optional<ScoringError> error;  // set exactly when score is empty
  bool ok() const { return score.has_value(); }
};

// Classification never raises in the study (string operations only).
ClassificationScore score_classification(std::string_view prediction, std::string_view expected);
Outcome<MappingScore> score_mapping(std::string_view prediction, std::string_view expected);
Outcome<RuleScore> score_rules(std::string_view prediction, std::string_view expected);

// One aggregate metric. `value` is round(unrounded, 2) as Python rounds;
// `study_key` is the key eval_results*.json used for it, empty where the
// study did not report it.
struct Metric {
  std::string name;
  double value = 0.0;
  double unrounded = 0.0;
  std::string study_key;
};

struct TaskScores {
  Task task = Task::Classification;
  std::size_t count = 0;   // examples in every denominator (scored without error)
  std::size_t errors = 0;  // examples whose scorer raised (the study's "errors")
  std::vector<std::string> error_messages;  // "example I: <exception>", one per error
  std::vector<Metric> metrics;  // in report order; empty when count == 0 (study: "no scores")

  std::size_t total() const { return count + errors; }
  // The metric called `name`; InputError naming the task's metrics if none.
  const Metric& at(std::string_view name) const;
};

// Metrics per task, in order (values are percentages):
//   classification  exact_match, contains_match
//   mapping         json_valid, mapping_accuracy, unmapped_accuracy
//   rules           json_valid, all_fields_study (min of the four presence
//                   rates: the study's has_all_fields_pct), all_fields_share
//                   (share of examples with all four fields), severity_correct,
//                   violation_type_correct, has_violation_type, has_severity,
//                   has_where_clause, has_objective_ids
TaskScores aggregate_classification(const std::vector<ClassificationScore>& scores);
TaskScores aggregate_mapping(const std::vector<Outcome<MappingScore>>& outcomes);
TaskScores aggregate_rules(const std::vector<Outcome<RuleScore>>& outcomes);

// Scores every example with the task's scorer and aggregates.
TaskScores evaluate(Task task, const std::vector<Example>& examples);

// Python's round(x, ndigits) for a float: the double nearest to x correctly
// rounded to `ndigits` decimals, exact ties to even.
double python_round(double x, int ndigits);

// Python's repr of a float that python_round(…, 2) produced: "40.8", "0.0",
// "96.03" (what the study's report printed).
std::string format_percent(double rounded);

// One row of a results table: a run (model, adapter version) and its tasks.
struct RunScores {
  std::string run;
  std::vector<TaskScores> tasks;
};

// A Markdown table: one row per run, one column per "task.metric" (plus
// "task.n", and "task.errors" when any run had errors), columns in first-seen
// order; "-" where a run lacks the task. InputError if a run lists a task twice.
std::string render_table(const std::vector<RunScores>& runs);

// {"task", "examples", "count", "errors", "error_messages", "metrics":
// {name: value}, "unrounded": {name: value}, "study_keys": {name: key}}.
nlohmann::ordered_json to_json(const TaskScores& scores);
// {"runs": [{"run": name, "tasks": {task: to_json(scores)}}]}.
nlohmann::ordered_json to_json(const std::vector<RunScores>& runs);

}  // namespace peftfw::eval
