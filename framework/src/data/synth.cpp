// Synthetic classification, mapping and rule-generation data over a fixed
// table of invented compliance schemas.
#include "peftfw/data/synth.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <set>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "peftfw/error.hpp"
#include "peftfw/io/safetensors.hpp"

namespace peftfw::data {
namespace {

using ordered_json = nlohmann::ordered_json;

enum class Kind { Id, Date, Name, Enum, Int, Bool, Host };

struct ColumnDef {
  const char* name;
  std::array<const char*, 2> synonyms;
  Kind kind;
  // Id: the prefix; Enum: the values, '|'-separated; otherwise unused.
  const char* values;
  int lo, hi;  // Int: the value range
  // Rule generation: Int -> the comparison ("< 70"); Enum -> the value that
  // violates policy; nullptr when the column has no such rule.
  const char* rule;
};

struct SchemaDef {
  const char* label;
  const char* objective;  // the practice the schema's rules cite first
  std::vector<ColumnDef> columns;  // columns[0] identifies the schema
};

// The schema table. Column 0 under any of its names appears in no other
// schema (checked by schemas()), which keeps classification decidable.
std::vector<SchemaDef> make_schemas() {
  return {
      {"access_review", "AC.L2-3.1.1",
       {{"user_id", {"uid", "account_id"}, Kind::Id, "U", 0, 0, nullptr},
        {"system", {"app", "application"}, Kind::Enum, "erp|crm|vpn|hr", 0, 0, nullptr},
        {"access_level", {"role", "privilege"}, Kind::Enum, "read|write|admin", 0, 0, "admin"},
        {"reviewer", {"approver", "reviewed_by"}, Kind::Name, "", 0, 0, nullptr},
        {"review_date", {"reviewed_on", "rev_date"}, Kind::Date, "", 0, 0, nullptr},
        {"decision", {"outcome", "verdict"}, Kind::Enum, "keep|revoke", 0, 0, nullptr}}},
      {"incident_report", "IR.L2-3.6.1",
       {{"incident_id", {"inc_id", "ticket"}, Kind::Id, "INC", 0, 0, nullptr},
        {"detected_at", {"detected", "found_on"}, Kind::Date, "", 0, 0, nullptr},
        {"severity", {"sev", "priority"}, Kind::Enum, "low|med|high", 0, 0, "high"},
        {"category", {"type", "class"}, Kind::Enum, "malware|phish|loss", 0, 0, nullptr},
        {"status", {"state", "stage"}, Kind::Enum, "open|closed", 0, 0, nullptr},
        {"owner", {"assignee", "handler"}, Kind::Name, "", 0, 0, nullptr}}},
      {"asset_inventory", "CM.L2-3.4.1",
       {{"asset_tag", {"tag", "asset_no"}, Kind::Id, "A", 0, 0, nullptr},
        {"hostname", {"host", "device"}, Kind::Host, "", 0, 0, nullptr},
        {"os_version", {"os", "platform"}, Kind::Enum, "win11|rhel9|macos|win7", 0, 0, "win7"},
        {"location", {"site", "room"}, Kind::Enum, "hq|lab|dc1", 0, 0, nullptr},
        {"last_scan", {"scanned_on", "scan_date"}, Kind::Date, "", 0, 0, nullptr}}},
      {"training_record", "AT.L2-3.2.1",
       {{"employee_id", {"emp_id", "staff_no"}, Kind::Id, "E", 0, 0, nullptr},
        {"course_code", {"course", "module"}, Kind::Enum, "SEC101|CUI200|PHI110", 0, 0, nullptr},
        {"completed_on", {"completion_date", "done_on"}, Kind::Date, "", 0, 0, nullptr},
        {"score", {"grade", "pct"}, Kind::Int, "", 40, 100, "< 70"},
        {"expires_on", {"expiry", "valid_until"}, Kind::Date, "", 0, 0, nullptr}}},
      {"vendor_assessment", "CA.L2-3.12.1",
       {{"vendor_name", {"vendor", "supplier"}, Kind::Enum, "acme|globex|initech|umbra", 0, 0,
         nullptr},
        {"risk_tier", {"tier", "risk"}, Kind::Int, "", 1, 4, ">= 3"},
        {"assessed_on", {"assessment_date", "reviewed"}, Kind::Date, "", 0, 0, nullptr},
        {"contract_end", {"term_end", "expires"}, Kind::Date, "", 0, 0, nullptr},
        {"contact", {"poc", "rep"}, Kind::Name, "", 0, 0, nullptr}}},
      {"patch_status", "SI.L2-3.14.1",
       {{"kb_number", {"kb", "patch_id"}, Kind::Id, "KB", 0, 0, nullptr},
        {"hostname", {"host", "server"}, Kind::Host, "", 0, 0, nullptr},
        {"installed_on", {"patch_date", "applied"}, Kind::Date, "", 0, 0, nullptr},
        {"rebooted", {"reboot_done", "restart_ok"}, Kind::Bool, "", 0, 0, nullptr},
        {"status", {"state", "outcome"}, Kind::Enum, "ok|failed|pending", 0, 0, "failed"}}},
      {"firewall_rule", "SC.L2-3.13.1",
       {{"rule_id", {"rule", "acl_id"}, Kind::Id, "R", 0, 0, nullptr},
        {"src_zone", {"source", "from_zone"}, Kind::Enum, "dmz|lan|wan", 0, 0, nullptr},
        {"dst_zone", {"dest", "to_zone"}, Kind::Enum, "dmz|lan|wan", 0, 0, nullptr},
        {"port", {"dst_port", "svc_port"}, Kind::Enum, "22|80|443|3389", 0, 0, "3389"},
        {"action", {"verdict", "policy"}, Kind::Enum, "allow|deny", 0, 0, nullptr},
        {"last_hit", {"hit_date", "last_used"}, Kind::Date, "", 0, 0, nullptr}}},
      {"change_request", "CM.L2-3.4.3",
       {{"change_id", {"cr_id", "change_no"}, Kind::Id, "CHG", 0, 0, nullptr},
        {"requested_by", {"requester", "submitter"}, Kind::Name, "", 0, 0, nullptr},
        {"approved_by", {"approver", "cab_approver"}, Kind::Name, "", 0, 0, nullptr},
        {"window_start", {"scheduled", "start"}, Kind::Date, "", 0, 0, nullptr},
        {"risk", {"risk_level", "impact"}, Kind::Enum, "low|med|high", 0, 0, "high"}}},
      {"backup_job", "MP.L2-3.8.9",
       {{"job_name", {"job", "backup_set"}, Kind::Enum, "nightly|weekly|db_full|files", 0, 0,
         nullptr},
        {"started_at", {"start_time", "began"}, Kind::Date, "", 0, 0, nullptr},
        {"size_gb", {"gb", "volume_gb"}, Kind::Int, "", 1, 900, "> 500"},
        {"result", {"status", "outcome"}, Kind::Enum, "ok|failed|partial", 0, 0, "failed"},
        {"retention_days", {"retention", "keep_days"}, Kind::Int, "", 7, 365, "< 30"}}},
      {"account_roster", "IA.L2-3.5.3",
       {{"username", {"login", "user_name"}, Kind::Name, "", 0, 0, nullptr},
        {"department", {"dept", "team"}, Kind::Enum, "it|hr|fin|ops", 0, 0, nullptr},
        {"manager", {"supervisor", "reports_to"}, Kind::Name, "", 0, 0, nullptr},
        {"created_on", {"created", "opened"}, Kind::Date, "", 0, 0, nullptr},
        {"mfa_enabled", {"mfa", "two_factor"}, Kind::Bool, "", 0, 0, nullptr}}},
      {"vulnerability_scan", "RA.L2-3.11.2",
       {{"cve_id", {"cve", "vuln_id"}, Kind::Id, "CVE-", 0, 0, nullptr},
        {"target_host", {"target", "asset_host"}, Kind::Host, "", 0, 0, nullptr},
        {"cvss", {"cvss_score", "base_score"}, Kind::Int, "", 1, 10, ">= 7"},
        {"first_seen", {"detected_on", "found"}, Kind::Date, "", 0, 0, nullptr},
        {"fix_due", {"due_date", "remediate_by"}, Kind::Date, "", 0, 0, nullptr}}},
      {"badge_access", "PE.L2-3.10.1",
       {{"badge_id", {"badge", "card_no"}, Kind::Id, "B", 0, 0, nullptr},
        {"door", {"reader", "entry_point"}, Kind::Enum, "lobby|dc|lab|roof", 0, 0, nullptr},
        {"swiped_at", {"swipe_time", "event_date"}, Kind::Date, "", 0, 0, nullptr},
        {"granted", {"allowed", "access_ok"}, Kind::Bool, "", 0, 0, nullptr},
        {"site", {"building", "campus"}, Kind::Enum, "hq|east|west", 0, 0, nullptr}}},
  };
}

// Columns that belong to no schema (extra_columns variation, mapping noise).
const std::vector<ColumnDef>& extra_columns() {
  static const std::vector<ColumnDef> extras = {
      {"notes", {"", ""}, Kind::Enum, "ok|n/a|tbd|check", 0, 0, nullptr},
      {"row_no", {"", ""}, Kind::Int, "", 1, 99, nullptr},
      {"batch", {"", ""}, Kind::Int, "", 100, 999, nullptr},
      {"feed", {"", ""}, Kind::Enum, "csv|api|manual", 0, 0, nullptr},
  };
  return extras;
}

const std::vector<SchemaDef>& schemas() {
  static const std::vector<SchemaDef> table = [] {
    auto t = make_schemas();
    // Every name of an identifying column must be unique in the whole table.
    std::multiset<std::string> all;
    for (const auto& s : t) {
      for (const auto& c : s.columns) {
        all.insert(c.name);
        for (const char* syn : c.synonyms) all.insert(syn);
      }
    }
    for (const auto& c : extra_columns()) {
      if (all.count(c.name) != 0) {
        throw std::logic_error(std::string("synth: extra column '") + c.name +
                               "' is also a schema column name");
      }
      all.insert(c.name);
    }
    for (const auto& s : t) {
      const auto& key = s.columns.front();
      for (const std::string name : {key.name, key.synonyms[0], key.synonyms[1]}) {
        if (all.count(name) != 1) {
          throw std::logic_error("synth: identifying column name '" + name + "' of " + s.label +
                                 " is not unique");
        }
      }
    }
    return t;
  }();
  return table;
}

const char* const kNames[] = {"ana", "ben", "chen", "dev", "eli",  "fay", "gus", "hana",
                              "ivan", "jo", "kai", "lena", "max", "nia",  "omar", "pia",
                              "raj", "sam", "tess", "uma", "vic", "wen", "yuri", "zoe"};
const char* const kHostPrefixes[] = {"srv", "db", "web", "ws"};

std::vector<std::string> split_values(const char* values) {
  std::vector<std::string> out;
  std::string current;
  for (const char* p = values; *p; ++p) {
    if (*p == '|') {
      out.push_back(current);
      current.clear();
    } else {
      current.push_back(*p);
    }
  }
  out.push_back(current);
  return out;
}

std::string zero_padded(int64_t v, int width) {
  std::string s = std::to_string(v);
  return std::string(static_cast<std::size_t>(std::max<int>(0, width - static_cast<int>(s.size()))),
                     '0') +
         s;
}

std::string make_value(const ColumnDef& c, SplitMix64& rng) {
  switch (c.kind) {
    case Kind::Id:
      return c.values + zero_padded(rng.between(0, 9999), 4);
    case Kind::Date:
      return std::to_string(rng.between(2023, 2025)) + "-" + zero_padded(rng.between(1, 12), 2) +
             "-" + zero_padded(rng.between(1, 28), 2);
    case Kind::Name:
      return kNames[rng.below(std::size(kNames))];
    case Kind::Enum: {
      const auto values = split_values(c.values);
      return values[rng.below(values.size())];
    }
    case Kind::Int:
      return std::to_string(rng.between(c.lo, c.hi));
    case Kind::Bool:
      return rng.chance(1, 2) ? "Y" : "N";
    case Kind::Host:
      return std::string(kHostPrefixes[rng.below(std::size(kHostPrefixes))]) +
             zero_padded(rng.between(1, 99), 2);
  }
  return "";
}

std::string upper(std::string s) {
  for (auto& ch : s) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  return s;
}

// "review_date" -> "Review_Date".
std::string title(std::string s) {
  bool start = true;
  for (auto& ch : s) {
    if (start) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    start = ch == '_';
  }
  return s;
}

std::string case_variant(const std::string& name, SplitMix64& rng) {
  return rng.chance(1, 2) ? upper(name) : title(name);
}

// `k` distinct values of [0, n), in increasing order.
std::vector<std::size_t> pick_sorted(std::size_t n, std::size_t k, SplitMix64& rng) {
  std::vector<std::size_t> all(n);
  for (std::size_t i = 0; i < n; ++i) all[i] = i;
  shuffle_in_place(all, rng);
  all.resize(std::min(k, n));
  std::sort(all.begin(), all.end());
  return all;
}

struct Header {
  std::string text;
  const ColumnDef* column;
  bool identifying;
};

std::string render_table(const std::vector<Header>& headers,
                         const std::vector<std::vector<std::string>>& rows) {
  std::string out;
  for (std::size_t i = 0; i < headers.size(); ++i) {
    if (i) out += '\t';
    out += headers[i].text;
  }
  for (const auto& row : rows) {
    out += '\n';
    for (std::size_t i = 0; i < headers.size(); ++i) {
      if (i) out += '\t';
      out += row[i];
    }
  }
  return out;
}

// ---------------------------------------------------------------------------

const char* kClassificationInstruction = "Classify this document and return the schema label.";
const char* kMappingInstruction = "Map the file headers to the expected columns and return JSON.";
const char* kRulesInstruction =
    "Generate a compliance rule for this schema and pattern and return JSON.";

enum Variation { Full, Partial, Renamed, Shuffled, MixedCase, Minimal, ExtraColumns, kVariations };

InstructionExample classification_example(SplitMix64& rng) {
  const auto& table = schemas();
  const SchemaDef& schema = table[rng.below(table.size())];
  const auto variation = static_cast<Variation>(rng.below(kVariations));
  const std::size_t m = schema.columns.size();

  std::vector<Header> headers;
  auto header_of = [&](std::size_t i) {
    return Header{schema.columns[i].name, &schema.columns[i], i == 0};
  };
  switch (variation) {
    case Full:
    case Renamed:
    case Shuffled:
    case MixedCase:
    case ExtraColumns:
      for (std::size_t i = 0; i < m; ++i) headers.push_back(header_of(i));
      break;
    case Partial:
    case Minimal: {
      // The identifying column plus 2 (minimal) or 2..m-2 (partial) others.
      const auto others = static_cast<int64_t>(m) - 1;
      const std::size_t k =
          variation == Minimal ? 2 : static_cast<std::size_t>(rng.between(2, others - 1));
      headers.push_back(header_of(0));
      for (std::size_t i : pick_sorted(m - 1, k, rng)) headers.push_back(header_of(i + 1));
      if (variation == Minimal) shuffle_in_place(headers, rng);
      break;
    }
    case kVariations:
      break;
  }
  if (variation == Renamed) {
    bool any = false;
    for (auto& h : headers) {
      if (rng.chance(1, 2)) {
        h.text = h.column->synonyms[rng.below(2)];
        any = true;
      }
    }
    if (!any) headers.front().text = headers.front().column->synonyms[rng.below(2)];
  }
  if (variation == Shuffled) shuffle_in_place(headers, rng);
  if (variation == MixedCase) {
    for (auto& h : headers) h.text = case_variant(h.text, rng);
  }
  if (variation == ExtraColumns) {
    const auto& extras = extra_columns();
    const std::size_t count = static_cast<std::size_t>(rng.between(1, 2));
    for (std::size_t e : pick_sorted(extras.size(), count, rng)) {
      const auto at = static_cast<std::ptrdiff_t>(rng.below(headers.size() + 1));
      headers.insert(headers.begin() + at, Header{extras[e].name, &extras[e], false});
    }
  }

  std::vector<std::vector<std::string>> rows(static_cast<std::size_t>(rng.between(2, 3)));
  for (auto& row : rows) {
    for (const auto& h : headers) row.push_back(make_value(*h.column, rng));
  }
  // Keep the input short enough for tiny demo models: fewer rows first, then
  // fewer columns (never the identifying one, never below three).
  std::string input = render_table(headers, rows);
  while (input.size() > kMaxClassificationInputBytes) {
    if (rows.size() > 2) {
      rows.pop_back();
    } else {
      std::size_t drop = headers.size();
      for (std::size_t i = headers.size(); i > 0; --i) {
        if (!headers[i - 1].identifying) {
          drop = i - 1;
          break;
        }
      }
      if (headers.size() <= 3 || drop == headers.size()) {
        throw std::logic_error("synth: classification input cannot be made short enough");
      }
      headers.erase(headers.begin() + static_cast<std::ptrdiff_t>(drop));
      for (auto& row : rows) row.erase(row.begin() + static_cast<std::ptrdiff_t>(drop));
    }
    input = render_table(headers, rows);
  }
  return {kClassificationInstruction, input, schema.label};
}

InstructionExample mapping_example(SplitMix64& rng) {
  const auto& table = schemas();
  const SchemaDef& schema = table[rng.below(table.size())];
  const std::size_t m = schema.columns.size();
  // Expected columns: 3..m of the schema's columns, in table order.
  const auto chosen =
      pick_sorted(m, static_cast<std::size_t>(rng.between(3, static_cast<int64_t>(m))), rng);

  struct Fate {
    const ColumnDef* column;
    std::optional<std::string> header;  // nullopt: absent from the file
  };
  std::vector<Fate> fates;
  for (std::size_t i : chosen) {
    const ColumnDef& c = schema.columns[i];
    const uint64_t r = rng.below(20);
    std::optional<std::string> header;
    if (r < 7) {
      header = c.name;
    } else if (r < 13) {
      header = c.synonyms[rng.below(2)];
    } else if (r < 16) {
      header = case_variant(c.name, rng);
    }
    fates.push_back({&c, header});
  }
  // At least two expected columns are present.
  std::size_t present = 0;
  for (const auto& f : fates) present += f.header ? 1 : 0;
  for (auto& f : fates) {
    if (present >= 2) break;
    if (!f.header) {
      f.header = f.column->name;
      ++present;
    }
  }

  std::vector<std::string> file_headers;
  for (const auto& f : fates) {
    if (f.header) file_headers.push_back(*f.header);
  }
  const auto& extras = extra_columns();
  for (std::size_t e : pick_sorted(extras.size(), rng.below(2), rng)) {
    file_headers.push_back(extras[e].name);
  }
  shuffle_in_place(file_headers, rng);

  ordered_json expected = ordered_json::array();
  for (const auto& f : fates) expected.push_back(f.column->name);
  ordered_json input;
  input["file_headers"] = file_headers;
  input["expected_columns"] = expected;

  ordered_json mapping = ordered_json::object();
  for (const auto& h : file_headers) {
    for (const auto& f : fates) {
      if (f.header && *f.header == h) mapping[h] = f.column->name;
    }
  }
  ordered_json unmapped = ordered_json::array();
  for (const auto& f : fates) {
    if (!f.header) unmapped.push_back(f.column->name);
  }
  ordered_json output;
  output["mapping"] = mapping;
  output["unmapped_expected"] = unmapped;
  return {kMappingInstruction, input.dump(), output.dump()};
}

struct Pattern {
  const char* name;
  const char* violation_type;
  const char* severity;
  const char* objective;
};

// The order is the order of the pattern index drawn below.
const Pattern kPatterns[] = {
    {"missing_value", "incomplete_record", "MEDIUM", "AU.L2-3.3.1"},
    {"expired", "expired_record", "HIGH", "CA.L2-3.12.3"},
    {"stale_review", "stale_record", "LOW", "AU.L2-3.3.5"},
    {"threshold", "threshold_breach", "HIGH", "RA.L2-3.11.1"},
    {"disallowed_value", "prohibited_value", "CRITICAL", "AC.L2-3.1.2"},
    {"control_disabled", "control_disabled", "HIGH", "SC.L2-3.13.2"},
};

// The where clause of pattern `p` over `columns`, or nullopt when no column
// has the kind the pattern needs.
std::optional<std::string> where_clause(std::size_t p,
                                        const std::vector<const ColumnDef*>& columns) {
  auto first = [&](auto&& pred) -> const ColumnDef* {
    for (const auto* c : columns) {
      if (pred(*c)) return c;
    }
    return nullptr;
  };
  const ColumnDef* c = nullptr;
  switch (p) {
    case 0:
      return std::string(columns.front()->name) + " IS NULL";
    case 1:
      c = first([](const ColumnDef& d) { return d.kind == Kind::Date; });
      if (c) return std::string(c->name) + " < CURRENT_DATE";
      break;
    case 2:
      for (auto it = columns.rbegin(); it != columns.rend(); ++it) {
        if ((*it)->kind == Kind::Date) return std::string((*it)->name) + " < CURRENT_DATE - 365";
      }
      break;
    case 3:
      c = first([](const ColumnDef& d) { return d.kind == Kind::Int && d.rule; });
      if (c) return std::string(c->name) + " " + c->rule;
      break;
    case 4:
      c = first([](const ColumnDef& d) { return d.kind == Kind::Enum && d.rule; });
      if (c) return std::string(c->name) + " = '" + c->rule + "'";
      break;
    case 5:
      c = first([](const ColumnDef& d) { return d.kind == Kind::Bool; });
      if (c) return std::string(c->name) + " = 'N'";
      break;
    default:
      break;
  }
  return std::nullopt;
}

InstructionExample rules_example(SplitMix64& rng) {
  const auto& table = schemas();
  const SchemaDef& schema = table[rng.below(table.size())];
  std::vector<const ColumnDef*> columns;
  for (const auto& c : schema.columns) columns.push_back(&c);
  // Half of the time one non-identifying column is left out, which can move
  // the rule to another column.
  if (rng.chance(1, 2)) {
    columns.erase(columns.begin() + 1 + static_cast<std::ptrdiff_t>(rng.below(columns.size() - 1)));
  }
  std::vector<std::pair<std::size_t, std::string>> possible;
  for (std::size_t p = 0; p < std::size(kPatterns); ++p) {
    if (auto where = where_clause(p, columns)) possible.emplace_back(p, *where);
  }
  const auto& [p, where] = possible[rng.below(possible.size())];
  const Pattern& pattern = kPatterns[p];

  ordered_json names = ordered_json::array();
  for (const auto* c : columns) names.push_back(c->name);
  ordered_json input;
  input["schema_label"] = schema.label;
  input["columns"] = names;
  input["pattern_type"] = pattern.name;
  ordered_json output;
  output["violation_type"] = pattern.violation_type;
  output["severity"] = pattern.severity;
  output["where_clause"] = where;
  output["objective_ids"] = ordered_json::array({schema.objective, pattern.objective});
  return {kRulesInstruction, input.dump(), output.dump()};
}

}  // namespace

std::optional<SynthTask> synth_task_from_name(std::string_view name) {
  if (name == "classification") return SynthTask::Classification;
  if (name == "mapping") return SynthTask::Mapping;
  if (name == "rules") return SynthTask::Rules;
  return std::nullopt;
}

const char* synth_task_name(SynthTask task) {
  switch (task) {
    case SynthTask::Classification:
      return "classification";
    case SynthTask::Mapping:
      return "mapping";
    case SynthTask::Rules:
      return "rules";
  }
  return "?";
}

std::vector<std::string> synth_schema_labels() {
  std::vector<std::string> out;
  for (const auto& s : schemas()) out.push_back(s.label);
  return out;
}

std::vector<InstructionExample> synthesize(SynthTask task, int64_t n, uint64_t seed) {
  if (n < 1) {
    throw InputError("synthetic data: the number of examples (--n, data.synth_n) must be at "
                     "least 1, found " +
                     std::to_string(n));
  }
  const uint64_t task_seed = derive_seed(seed, static_cast<uint64_t>(task));
  std::vector<InstructionExample> out;
  out.reserve(static_cast<std::size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    SplitMix64 rng(derive_seed(task_seed, static_cast<uint64_t>(i)));
    switch (task) {
      case SynthTask::Classification:
        out.push_back(classification_example(rng));
        break;
      case SynthTask::Mapping:
        out.push_back(mapping_example(rng));
        break;
      case SynthTask::Rules:
        out.push_back(rules_example(rng));
        break;
    }
  }
  return out;
}

std::string to_jsonl(const std::vector<InstructionExample>& examples) {
  std::string out;
  for (const auto& ex : examples) {
    ordered_json line;
    line["instruction"] = ex.instruction;
    line["input"] = ex.input;
    line["output"] = ex.output;
    out += line.dump();
    out += '\n';
  }
  return out;
}

void write_synth_jsonl(const std::string& path, SynthTask task, int64_t n, uint64_t seed) {
  io::write_file_atomic(path, to_jsonl(synthesize(task, n, seed)));
}

Dataset synthesize_dataset(SynthTask task, int64_t n, uint64_t seed) {
  const std::string text = to_jsonl(synthesize(task, n, seed));
  const std::string source = std::string("synth:") + synth_task_name(task) +
                             ":n=" + std::to_string(n) + ":seed=" + std::to_string(seed);
  return parse_jsonl(text, source, {DataFormat::Instruction, BadLinePolicy::Error});
}

}  // namespace peftfw::data
