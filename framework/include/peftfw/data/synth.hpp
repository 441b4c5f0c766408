// Synthetic versions of the study's three tasks (seed study §1.2), for demos
// and tests on tiny models: `peftfw data synth --task T --n N --seed S --out F`.
//
// Twelve invented compliance document schemas (access reviews, incident
// reports, asset inventories, ...), each with characteristic columns, value
// kinds and synonyms. The tasks are in the study's instruction/input/output
// format:
//   classification  input: tab-separated headers and 2-3 sample rows (at most
//                   kMaxClassificationInputBytes bytes); output: the schema
//                   label. Variations: full, partial, renamed, shuffled,
//                   mixed_case, minimal, extra_columns. Each schema's first
//                   column (under any of its names) is unique to it and always
//                   present, so every example is decidable.
//   mapping         input: {"file_headers": [...], "expected_columns": [...]};
//                   output: {"mapping": {file header: expected column},
//                   "unmapped_expected": [expected columns with no header]}.
//                   Headers appear as named, as a synonym, upper/title-cased,
//                   or not at all, with unrelated extra headers.
//   rules           input: {"schema_label", "columns", "pattern_type"};
//                   output: {"violation_type", "severity", "where_clause",
//                   "objective_ids"}, a fixed function of the schema, the
//                   pattern and the first column of the kind the pattern needs.
// JSON is compact (no spaces), keys in the order above.
//
// Deterministic: example i is drawn from SplitMix64(derive_seed(derive_seed(
// seed, task), i)) (dataset.hpp), so it does not depend on n and the first k
// examples of a larger set are the k examples of a smaller one.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "peftfw/data/dataset.hpp"

namespace peftfw::data {

enum class SynthTask { Classification, Mapping, Rules };
// "classification", "mapping", "rules".
std::optional<SynthTask> synth_task_from_name(std::string_view name);
const char* synth_task_name(SynthTask task);

inline constexpr std::size_t kMaxClassificationInputBytes = 200;

// The schema labels the classification task answers with, in table order.
std::vector<std::string> synth_schema_labels();

// n examples (n >= 1, else InputError naming --n).
std::vector<InstructionExample> synthesize(SynthTask task, int64_t n, uint64_t seed);

// One {"instruction","input","output"} object per line, '\n'-terminated.
std::string to_jsonl(const std::vector<InstructionExample>& examples);

// Writes synthesize(...) as JSONL to `path` atomically.
void write_synth_jsonl(const std::string& path, SynthTask task, int64_t n, uint64_t seed);

// The synthetic set as a Dataset, read back from its JSONL text (so that a
// split.json made from it records the hash of that text). Its source is
// e.g. "synth:classification:n=512:seed=42".
Dataset synthesize_dataset(SynthTask task, int64_t n, uint64_t seed);

}  // namespace peftfw::data
