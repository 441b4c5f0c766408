// Tests for peftfw/data/synth: determinism, the study's three formats (every
// JSON input and output parsed and checked for consistency), the size limit
// of classification inputs, and that every classification example names its
// schema's identifying column.
#include "peftfw/io/fs.hpp"
#include "peftfw/data/synth.hpp"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"

namespace peftfw::data {
namespace {

using nlohmann::json;

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == sep) {
      out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  out.push_back(cur);
  return out;
}

std::vector<std::string> keys_in_order(const std::string& text) {
  std::vector<std::string> keys;
  const auto parsed = nlohmann::ordered_json::parse(text);
  for (const auto& item : parsed.items()) keys.push_back(item.key());
  return keys;
}

bool same(const std::vector<InstructionExample>& a, const std::vector<InstructionExample>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].instruction != b[i].instruction || a[i].input != b[i].input ||
        a[i].output != b[i].output) {
      return false;
    }
  }
  return true;
}

TEST(Synth, TaskNames) {
  EXPECT_EQ(synth_task_from_name("rules"), SynthTask::Rules);
  EXPECT_EQ(synth_task_from_name("rule_generation"), std::nullopt);
  EXPECT_STREQ(synth_task_name(SynthTask::Mapping), "mapping");
}

TEST(Synth, DeterministicFromTheSeed) {
  for (auto task : {SynthTask::Classification, SynthTask::Mapping, SynthTask::Rules}) {
    const auto a = synthesize(task, 50, 42);
    EXPECT_TRUE(same(a, synthesize(task, 50, 42))) << synth_task_name(task);
    EXPECT_FALSE(same(a, synthesize(task, 50, 43))) << synth_task_name(task);
    // Example i does not depend on n.
    const auto prefix = synthesize(task, 10, 42);
    EXPECT_TRUE(same(prefix, std::vector<InstructionExample>(a.begin(), a.begin() + 10)));
  }
}

TEST(Synth, RejectsNonPositiveCounts) {
  try {
    synthesize(SynthTask::Rules, 0, 1);
    ADD_FAILURE() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_STREQ(e.what(),
                 "synthetic data: the number of examples (--n, data.synth_n) must be at least 1, "
                 "found 0");
  }
}

TEST(Synth, ClassificationIsDecidableAndShort) {
  // The identifying column of each schema under its three names (the design
  // in synth.cpp's table); each must appear in the header line.
  const std::map<std::string, std::set<std::string>> identifying = {
      {"access_review", {"user_id", "uid", "account_id"}},
      {"incident_report", {"incident_id", "inc_id", "ticket"}},
      {"asset_inventory", {"asset_tag", "tag", "asset_no"}},
      {"training_record", {"employee_id", "emp_id", "staff_no"}},
      {"vendor_assessment", {"vendor_name", "vendor", "supplier"}},
      {"patch_status", {"kb_number", "kb", "patch_id"}},
      {"firewall_rule", {"rule_id", "rule", "acl_id"}},
      {"change_request", {"change_id", "cr_id", "change_no"}},
      {"backup_job", {"job_name", "job", "backup_set"}},
      {"account_roster", {"username", "login", "user_name"}},
      {"vulnerability_scan", {"cve_id", "cve", "vuln_id"}},
      {"badge_access", {"badge_id", "badge", "card_no"}},
  };
  const auto labels = synth_schema_labels();
  ASSERT_EQ(labels.size(), 12u);
  for (const auto& l : labels) EXPECT_EQ(identifying.count(l), 1u) << l;

  const auto examples = synthesize(SynthTask::Classification, 600, 7);
  std::map<std::string, int> per_label;
  bool saw_upper = false, saw_extra = false, saw_two_rows = false, saw_three_rows = false;
  for (const auto& ex : examples) {
    EXPECT_EQ(ex.instruction, "Classify this document and return the schema label.");
    EXPECT_LE(ex.input.size(), kMaxClassificationInputBytes) << ex.input;
    ASSERT_EQ(identifying.count(ex.output), 1u) << ex.output;
    ++per_label[ex.output];

    const auto lines = split(ex.input, '\n');
    ASSERT_GE(lines.size(), 3u) << ex.input;
    ASSERT_LE(lines.size(), 4u) << ex.input;
    saw_two_rows |= lines.size() == 3;
    saw_three_rows |= lines.size() == 4;
    const auto headers = split(lines[0], '\t');
    EXPECT_GE(headers.size(), 3u) << ex.input;
    for (const auto& line : lines) EXPECT_EQ(split(line, '\t').size(), headers.size()) << ex.input;
    const std::set<std::string> distinct(headers.begin(), headers.end());
    EXPECT_EQ(distinct.size(), headers.size()) << ex.input;

    int identifying_found = 0;
    for (const auto& h : headers) {
      saw_upper |= h != lower(h);
      saw_extra |= h == "notes" || h == "row_no" || h == "batch" || h == "feed";
      identifying_found += identifying.at(ex.output).count(lower(h)) ? 1 : 0;
      // No header identifies another schema.
      for (const auto& [label, names] : identifying) {
        if (label != ex.output) {
          EXPECT_EQ(names.count(lower(h)), 0u) << ex.input;
        }
      }
    }
    EXPECT_EQ(identifying_found, 1) << ex.input;
  }
  EXPECT_EQ(per_label.size(), 12u);
  for (const auto& [label, count] : per_label) EXPECT_GE(count, 20) << label;
  EXPECT_TRUE(saw_upper);
  EXPECT_TRUE(saw_extra);
  EXPECT_TRUE(saw_two_rows);
  EXPECT_TRUE(saw_three_rows);
}

TEST(Synth, MappingIsConsistentJson) {
  const auto examples = synthesize(SynthTask::Mapping, 300, 3);
  int with_unmapped = 0, with_renamed = 0;
  for (const auto& ex : examples) {
    EXPECT_EQ(ex.instruction, "Map the file headers to the expected columns and return JSON.");
    EXPECT_EQ(keys_in_order(ex.input),
              (std::vector<std::string>{"file_headers", "expected_columns"}));
    EXPECT_EQ(keys_in_order(ex.output),
              (std::vector<std::string>{"mapping", "unmapped_expected"}));
    const json in = json::parse(ex.input);
    const json out = json::parse(ex.output);
    const auto headers = in.at("file_headers").get<std::vector<std::string>>();
    const auto expected = in.at("expected_columns").get<std::vector<std::string>>();
    const auto mapping = out.at("mapping").get<std::map<std::string, std::string>>();
    const auto unmapped = out.at("unmapped_expected").get<std::vector<std::string>>();
    EXPECT_EQ(std::set<std::string>(headers.begin(), headers.end()).size(), headers.size());
    EXPECT_GE(expected.size(), 3u);

    std::set<std::string> mapped_to;
    for (const auto& [header, column] : mapping) {
      EXPECT_NE(std::find(headers.begin(), headers.end(), header), headers.end()) << ex.input;
      EXPECT_NE(std::find(expected.begin(), expected.end(), column), expected.end()) << ex.input;
      EXPECT_TRUE(mapped_to.insert(column).second) << "two headers map to " << column;
      if (lower(header) != column) ++with_renamed;
    }
    EXPECT_GE(mapping.size(), 2u);
    // A header equal to an expected column up to case maps to it.
    for (const auto& h : headers) {
      if (std::find(expected.begin(), expected.end(), lower(h)) != expected.end()) {
        ASSERT_EQ(mapping.count(h), 1u) << ex.input;
        EXPECT_EQ(mapping.at(h), lower(h));
      }
    }
    // unmapped_expected = expected columns no header maps to, in expected order.
    std::vector<std::string> want;
    for (const auto& c : expected) {
      if (!mapped_to.count(c)) want.push_back(c);
    }
    EXPECT_EQ(unmapped, want) << ex.output;
    with_unmapped += unmapped.empty() ? 0 : 1;
  }
  EXPECT_GT(with_unmapped, 0);
  EXPECT_GT(with_renamed, 0);
}

TEST(Synth, RulesAreConsistentJson) {
  // pattern -> (violation_type, severity), as designed.
  const std::map<std::string, std::pair<std::string, std::string>> patterns = {
      {"missing_value", {"incomplete_record", "MEDIUM"}},
      {"expired", {"expired_record", "HIGH"}},
      {"stale_review", {"stale_record", "LOW"}},
      {"threshold", {"threshold_breach", "HIGH"}},
      {"disallowed_value", {"prohibited_value", "CRITICAL"}},
      {"control_disabled", {"control_disabled", "HIGH"}},
  };
  const auto labels = synth_schema_labels();
  const auto examples = synthesize(SynthTask::Rules, 300, 11);
  std::set<std::string> seen_patterns;
  for (const auto& ex : examples) {
    EXPECT_EQ(ex.instruction,
              "Generate a compliance rule for this schema and pattern and return JSON.");
    EXPECT_EQ(keys_in_order(ex.input),
              (std::vector<std::string>{"schema_label", "columns", "pattern_type"}));
    EXPECT_EQ(keys_in_order(ex.output),
              (std::vector<std::string>{"violation_type", "severity", "where_clause",
                                        "objective_ids"}));
    const json in = json::parse(ex.input);
    const json out = json::parse(ex.output);
    const auto label = in.at("schema_label").get<std::string>();
    EXPECT_NE(std::find(labels.begin(), labels.end(), label), labels.end());
    const auto columns = in.at("columns").get<std::vector<std::string>>();
    const auto pattern = in.at("pattern_type").get<std::string>();
    ASSERT_EQ(patterns.count(pattern), 1u) << pattern;
    seen_patterns.insert(pattern);
    EXPECT_EQ(out.at("violation_type").get<std::string>(), patterns.at(pattern).first);
    EXPECT_EQ(out.at("severity").get<std::string>(), patterns.at(pattern).second);
    const auto where = out.at("where_clause").get<std::string>();
    const std::string column = where.substr(0, where.find(' '));
    EXPECT_NE(std::find(columns.begin(), columns.end(), column), columns.end()) << ex.output;
    if (pattern == "missing_value") {
      EXPECT_EQ(where, columns.front() + " IS NULL");
    }
    if (pattern == "expired") {
      EXPECT_EQ(where.substr(where.find(' ')), " < CURRENT_DATE");
    }
    const auto& ids = out.at("objective_ids");
    ASSERT_TRUE(ids.is_array());
    ASSERT_EQ(ids.size(), 2u);
    for (const auto& id : ids) EXPECT_TRUE(id.is_string());
  }
  EXPECT_EQ(seen_patterns.size(), patterns.size());
}

TEST(Synth, JsonlRoundTripAndDataset) {
  const auto examples = synthesize(SynthTask::Classification, 20, 5);
  const std::string text = to_jsonl(examples);
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 20);
  const Dataset ds = parse_jsonl(text, "s.jsonl");
  EXPECT_EQ(ds.format, DataFormat::Instruction);
  ASSERT_EQ(ds.examples.size(), 20u);
  for (std::size_t i = 0; i < 20; ++i) {
    const auto& e = std::get<InstructionExample>(ds.examples[i].body);
    EXPECT_EQ(e.input, examples[i].input);
    EXPECT_EQ(e.output, examples[i].output);
  }
  EXPECT_EQ(keys_in_order(text.substr(0, text.find('\n'))),
            (std::vector<std::string>{"instruction", "input", "output"}));

  const Dataset synth = synthesize_dataset(SynthTask::Classification, 20, 5);
  EXPECT_EQ(synth.source, "synth:classification:n=20:seed=5");
  EXPECT_EQ(synth.sha256, sha256_hex(text));
  EXPECT_EQ(synth.examples.size(), 20u);

  const auto dir = std::filesystem::temp_directory_path() /
                   ("peftfw_test_synth_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "out.jsonl").string();
  write_synth_jsonl(path, SynthTask::Classification, 20, 5);
  EXPECT_EQ(io::read_text_file(path), text);
  peftfw::io::remove_tree(dir);
}

}  // namespace
}  // namespace peftfw::data
