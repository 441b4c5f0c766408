// The seed study's evaluation metrics (scripts/eval_models.py), torch-free.
//
// Each scorer follows the study's Python statement by statement; the helpers
// below give the Python semantics those statements rely on (str.strip's
// whitespace set, str.replace's single pass, dict.get, ==, set(), truthiness).
// docs/evaluation.md lists the few places where we cannot match Python
// exactly (json.loads versus nlohmann, non-ASCII case mapping).
#include "peftfw/eval/metrics.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <utility>
#include <variant>

#include <nlohmann/json.hpp>

#include "peftfw/error.hpp"

namespace peftfw::eval {

using nlohmann::json;
using nlohmann::ordered_json;

namespace {

// ---------------------------------------------------------------------------
// Python string semantics on UTF-8 bytes.

// str.isspace() code points: the ones str.strip() removes.
bool is_python_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// Decodes the UTF-8 sequence starting at s[i]. Returns its length and code
// point, or nullopt for a malformed sequence (never whitespace, so stripping
// stops there).
std::optional<std::pair<size_t, uint32_t>> decode_utf8(std::string_view s, size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  size_t len = 0;
  uint32_t cp = 0;
  if (b0 < 0x80) return std::make_pair(size_t{1}, uint32_t{b0});
  if ((b0 & 0xE0) == 0xC0) {
    len = 2;
    cp = b0 & 0x1F;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3;
    cp = b0 & 0x0F;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4;
    cp = b0 & 0x07;
  } else {
    return std::nullopt;
  }
  if (i + len > s.size()) return std::nullopt;
  for (size_t k = 1; k < len; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) return std::nullopt;
    cp = (cp << 6) | (b & 0x3F);
  }
  return std::make_pair(len, cp);
}

// str.strip() with no argument.
std::string_view py_strip(std::string_view s) {
  size_t begin = 0;
  while (begin < s.size()) {
    const auto d = decode_utf8(s, begin);
    if (!d || !is_python_space(d->second)) break;
    begin += d->first;
  }
  size_t end = s.size();
  while (end > begin) {
    // Step back to the lead byte of the last code point (at most 3 continuation bytes).
    size_t start = end - 1;
    while (start > begin && end - start < 4 &&
           (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) {
      --start;
    }
    const auto d = decode_utf8(s, start);
    if (!d || start + d->first != end || !is_python_space(d->second)) break;
    end = start;
  }
  return s.substr(begin, end - begin);
}

// str.lower() / str.upper(), ASCII letters only (see docs/evaluation.md).
std::string ascii_lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

std::string ascii_upper(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  }
  return out;
}

// str.replace(old, ""): one left-to-right pass over non-overlapping matches;
// text that forms `old` only after a removal stays.
std::string py_remove(std::string_view s, std::string_view old) {
  std::string out;
  size_t pos = 0;
  while (true) {
    const size_t hit = s.find(old, pos);
    if (hit == std::string_view::npos) break;
    out.append(s.substr(pos, hit - pos));
    pos = hit + old.size();
  }
  out.append(s.substr(pos));
  return out;
}

// ---------------------------------------------------------------------------
// Python object semantics on parsed JSON values.

// type(x).__name__ of what json.loads would have returned.
const char* py_type(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "NoneType";
    case json::value_t::boolean:
      return "bool";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
      return "int";
    case json::value_t::number_float:
      return "float";
    case json::value_t::string:
      return "str";
    case json::value_t::array:
      return "list";
    case json::value_t::object:
      return "dict";
    default:
      return "object";
  }
}

// bool(x).
bool py_truthy(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return false;
    case json::value_t::boolean:
      return v.get<bool>();
    case json::value_t::number_integer:
      return v.get<int64_t>() != 0;
    case json::value_t::number_unsigned:
      return v.get<uint64_t>() != 0;
    case json::value_t::number_float:
      return v.get<double>() != 0.0;
    case json::value_t::string:
    case json::value_t::array:
    case json::value_t::object:
      return !v.empty();
    default:
      return false;
  }
}

bool is_integral(const json& v) {
  return v.is_boolean() || v.is_number_integer();  // number_integer covers unsigned
}

// An int or bool as (negative?, magnitude); Python's True == 1 == 1.0.
std::pair<bool, uint64_t> int_parts(const json& v) {
  if (v.is_boolean()) return {false, v.get<bool>() ? 1u : 0u};
  if (v.is_number_unsigned()) return {false, v.get<uint64_t>()};
  const int64_t i = v.get<int64_t>();
  if (i < 0) return {true, static_cast<uint64_t>(-(i + 1)) + 1u};
  return {false, static_cast<uint64_t>(i)};
}

// int == float compares exact values in Python (2**53 + 1 != 2.0**53).
bool int_equals_float(const json& i, double d) {
  if (!std::isfinite(d) || d != std::trunc(d)) return false;
  const auto [negative, magnitude] = int_parts(i);
  const double m = std::fabs(d);
  if (m >= 18446744073709551616.0) return false;  // 2^64: beyond any int nlohmann holds
  if (m == 0.0) return magnitude == 0;
  return negative == (d < 0) && static_cast<uint64_t>(m) == magnitude;
}

// Python's a == b for json.loads results.
bool py_equal(const json& a, const json& b) {
  const bool a_num = is_integral(a) || a.is_number_float();
  const bool b_num = is_integral(b) || b.is_number_float();
  if (a_num || b_num) {
    if (!a_num || !b_num) return false;
    if (a.is_number_float() && b.is_number_float()) return a.get<double>() == b.get<double>();
    if (a.is_number_float()) return int_equals_float(b, a.get<double>());
    if (b.is_number_float()) return int_equals_float(a, b.get<double>());
    return int_parts(a) == int_parts(b);
  }
  if (a.type() != b.type()) return false;
  switch (a.type()) {
    case json::value_t::null:
      return true;
    case json::value_t::string:
      return a.get_ref<const std::string&>() == b.get_ref<const std::string&>();
    case json::value_t::array: {
      if (a.size() != b.size()) return false;
      for (size_t i = 0; i < a.size(); ++i) {
        if (!py_equal(a[i], b[i])) return false;
      }
      return true;
    }
    case json::value_t::object: {
      if (a.size() != b.size()) return false;
      for (auto it = a.begin(); it != a.end(); ++it) {
        const auto other = b.find(it.key());
        if (other == b.end() || !py_equal(it.value(), *other)) return false;
      }
      return true;
    }
    default:
      return false;
  }
}

// A Python set of hashable JSON values (None, bool, int, float, str),
// deduplicated with Python equality. The sets here are tiny, so a vector.
using PySet = std::vector<json>;

bool set_contains(const PySet& set, const json& v) {
  return std::any_of(set.begin(), set.end(), [&](const json& e) { return py_equal(e, v); });
}

void set_add(PySet& set, json v) {
  if (!set_contains(set, v)) set.push_back(std::move(v));
}

// set(x): the elements of a list, the characters of a str, the keys of a dict;
// TypeError for anything else or for an unhashable (list, dict) element.
std::variant<PySet, ScoringError> py_set(const json& v, const char* what) {
  PySet out;
  if (v.is_array()) {
    for (const json& e : v) {
      if (e.is_array() || e.is_object()) {
        return ScoringError{std::string("TypeError: unhashable type: '") + py_type(e) + "' (in " +
                            what + ")"};
      }
      set_add(out, e);
    }
  } else if (v.is_string()) {
    const std::string& s = v.get_ref<const std::string&>();
    for (size_t i = 0; i < s.size();) {
      const auto d = decode_utf8(s, i);
      const size_t len = d ? d->first : 1;  // nlohmann validated the UTF-8
      set_add(out, json(s.substr(i, len)));
      i += len;
    }
  } else if (v.is_object()) {
    for (auto it = v.begin(); it != v.end(); ++it) set_add(out, json(it.key()));
  } else {
    return ScoringError{std::string("TypeError: '") + py_type(v) + "' object is not iterable (" +
                        what + ")"};
  }
  return out;
}

// json.loads(text): nullopt where Python raises JSONDecodeError. Python
// rejects a leading BOM ("Unexpected UTF-8 BOM") that nlohmann would skip.
std::optional<json> py_json_loads(std::string_view text) {
  if (text.size() >= 3 && text.substr(0, 3) == "\xEF\xBB\xBF") return std::nullopt;
  json v = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (v.is_discarded()) return std::nullopt;
  return v;
}

// The study's extraction: prediction.strip(), then the text from the first
// '{' to the last '}' (both ASCII, so byte offsets equal Python's), parsed.
std::optional<json> extract_json(std::string_view prediction) {
  const std::string_view text = py_strip(prediction);
  const size_t start = text.find('{');
  const size_t last = text.rfind('}');
  if (start == std::string_view::npos || last == std::string_view::npos || last < start) {
    return std::nullopt;
  }
  return py_json_loads(text.substr(start, last + 1 - start));
}

// d.get(key, default) on a dict.
const json& dict_get(const json& dict, const char* key, const json& fallback) {
  const auto it = dict.find(key);
  return it == dict.end() ? fallback : *it;
}

template <class Score>
Outcome<Score> scored(Score s) {
  return Outcome<Score>{std::move(s), std::nullopt};
}

template <class Score>
Outcome<Score> raised(std::string what) {
  return Outcome<Score>{std::nullopt, ScoringError{std::move(what)}};
}

std::string no_attribute(const json& v, const char* attribute, const char* where) {
  return std::string("AttributeError: '") + py_type(v) + "' object has no attribute '" +
         attribute + "' (" + where + ")";
}

// ---------------------------------------------------------------------------
// Aggregation helpers.

Metric percent(std::string name, double share, std::string study_key) {
  const double unrounded = share * 100;  // the study computes round(share * 100, 2)
  return Metric{std::move(name), python_round(unrounded, 2), unrounded, std::move(study_key)};
}

// sum(values) / n as CPython <= 3.11 computes it: left to right from 0.
double py_mean(const std::vector<double>& values) {
  double sum = 0.0;
  for (const double v : values) sum += v;
  return sum / static_cast<double>(values.size());
}

double share(size_t hits, size_t n) { return static_cast<double>(hits) / static_cast<double>(n); }

// Splits outcomes into the scored ones and the error messages.
template <class Score>
std::vector<Score> split_outcomes(const std::vector<Outcome<Score>>& outcomes, TaskScores& out) {
  std::vector<Score> ok;
  for (size_t i = 0; i < outcomes.size(); ++i) {
    if (outcomes[i].ok()) {
      ok.push_back(*outcomes[i].score);
    } else {
      ++out.errors;
      const std::string what = outcomes[i].error ? outcomes[i].error->what : "unknown error";
      out.error_messages.push_back("example " + std::to_string(i) + ": " + what);
    }
  }
  out.count = ok.size();
  return ok;
}

}  // namespace

// ---------------------------------------------------------------------------

Task parse_task(std::string_view name) {
  if (name == "classification") return Task::Classification;
  if (name == "mapping") return Task::Mapping;
  if (name == "rules") return Task::Rules;
  std::string hint;
  if (name == "document_classification") hint = "; use 'classification'";
  if (name == "schema_mapping") hint = "; use 'mapping'";
  if (name == "rule_generation" || name == "structured_code_generation") hint = "; use 'rules'";
  throw InputError("unknown evaluation task '" + std::string(name) +
                   "': expected one of classification, mapping, rules" + hint);
}

const char* task_name(Task task) {
  switch (task) {
    case Task::Classification:
      return "classification";
    case Task::Mapping:
      return "mapping";
    case Task::Rules:
      return "rules";
  }
  return "unknown";
}

const Metric& TaskScores::at(std::string_view name) const {
  for (const Metric& m : metrics) {
    if (m.name == name) return m;
  }
  std::string known;
  for (const Metric& m : metrics) known += (known.empty() ? "" : ", ") + m.name;
  throw InputError("task '" + std::string(task_name(task)) + "' has no metric '" +
                   std::string(name) + "'" +
                   (known.empty() ? std::string(" (no examples were scored)")
                                  : " (it has: " + known + ")"));
}

ClassificationScore score_classification(std::string_view prediction, std::string_view expected) {
  // pred_clean = prediction.strip().lower().split("\n")[0].strip()
  std::string pred = ascii_lower(py_strip(prediction));
  pred = std::string(py_strip(std::string_view(pred).substr(0, pred.find('\n'))));
  // for tok in [...]: pred_clean = pred_clean.replace(tok, "").strip()
  for (const char* tok : {"<|end_of_text|>", "<|end_of_role|>"}) {
    pred = std::string(py_strip(py_remove(pred, tok)));
  }
  ClassificationScore s;
  s.expected = ascii_lower(py_strip(expected));
  s.exact_match = pred == s.expected;
  s.contains_match = pred.find(s.expected) != std::string::npos;  // "" is in every string
  s.predicted = std::move(pred);
  return s;
}

Outcome<MappingScore> score_mapping(std::string_view prediction, std::string_view expected) {
  MappingScore r;
  const std::optional<json> exp = py_json_loads(expected);
  if (!exp) return scored(r);
  const std::optional<json> pred = extract_json(prediction);
  if (!pred) return scored(r);
  r.json_valid = true;  // pred starts with '{', so a successful parse is a dict

  if (!exp->is_object()) {
    return raised<MappingScore>(no_attribute(*exp, "get", "the expected output is not an object"));
  }
  const json empty_dict = json::object();
  const json empty_list = json::array();
  const json& exp_mapping = dict_get(*exp, "mapping", empty_dict);
  const json& pred_mapping = dict_get(*pred, "mapping", empty_dict);
  if (py_truthy(exp_mapping)) {
    if (!exp_mapping.is_object()) {
      return raised<MappingScore>(no_attribute(exp_mapping, "items", "expected \"mapping\""));
    }
    if (!pred_mapping.is_object()) {
      return raised<MappingScore>(no_attribute(pred_mapping, "get", "predicted \"mapping\""));
    }
    const json none;  // pred_mapping.get(k) is None for a missing key
    size_t correct = 0;
    for (auto it = exp_mapping.begin(); it != exp_mapping.end(); ++it) {
      const auto got = pred_mapping.find(it.key());
      if (py_equal(got == pred_mapping.end() ? none : *got, it.value())) ++correct;
    }
    r.mapping_accuracy = share(correct, exp_mapping.size());
  }

  auto exp_set = py_set(dict_get(*exp, "unmapped_expected", empty_list),
                        "expected \"unmapped_expected\"");
  if (auto* e = std::get_if<ScoringError>(&exp_set)) return raised<MappingScore>(e->what);
  auto pred_set = py_set(dict_get(*pred, "unmapped_expected", empty_list),
                         "predicted \"unmapped_expected\"");
  if (auto* e = std::get_if<ScoringError>(&pred_set)) return raised<MappingScore>(e->what);
  const PySet& want = std::get<PySet>(exp_set);
  const PySet& got = std::get<PySet>(pred_set);
  if (!want.empty() || !got.empty()) {
    const size_t overlap = static_cast<size_t>(std::count_if(
        want.begin(), want.end(), [&](const json& v) { return set_contains(got, v); }));
    if (want.size() == got.size() && overlap == want.size()) {
      r.unmapped_accuracy = 1.0;
    } else if (!want.empty()) {
      r.unmapped_accuracy = share(overlap, want.size());
    }  // else: nothing expected but something predicted: 0
  } else {
    r.unmapped_accuracy = 1.0;
  }
  return scored(r);
}

Outcome<RuleScore> score_rules(std::string_view prediction, std::string_view expected) {
  RuleScore r;
  const std::optional<json> exp = py_json_loads(expected);
  if (!exp) return scored(r);
  const std::optional<json> pred = extract_json(prediction);
  if (!pred) return scored(r);
  r.json_valid = true;

  r.has_violation_type = pred->contains("violation_type");
  r.has_severity = pred->contains("severity");
  r.has_where_clause = pred->contains("where_clause");
  r.has_objective_ids = pred->contains("objective_ids") && (*pred)["objective_ids"].is_array();

  // pred_obj.get(f, "").upper() == exp_obj.get(f, "").upper(): the left side
  // is evaluated first, and both sides must be strings (None.upper() raises).
  const json empty_str = "";
  const auto compare = [&](const char* field,
                           std::string (*fold)(std::string_view)) -> std::optional<bool> {
    const json& p = (*pred)[field];
    if (!p.is_string()) return std::nullopt;
    if (!exp->is_object()) return std::nullopt;
    const json& e = dict_get(*exp, field, empty_str);
    if (!e.is_string()) return std::nullopt;
    return fold(p.get_ref<const std::string&>()) == fold(e.get_ref<const std::string&>());
  };
  const auto why = [&](const char* field, const char* method) {
    const json& p = (*pred)[field];
    if (!p.is_string()) {
      return no_attribute(p, method, (std::string("predicted \"") + field + "\"").c_str());
    }
    if (!exp->is_object()) {
      return no_attribute(*exp, "get", "the expected output is not an object");
    }
    return no_attribute(dict_get(*exp, field, empty_str), method,
                        (std::string("expected \"") + field + "\"").c_str());
  };
  if (r.has_severity) {
    const auto same = compare("severity", ascii_upper);
    if (!same) return raised<RuleScore>(why("severity", "upper"));
    r.severity_correct = *same;
  }
  if (r.has_violation_type) {
    const auto same = compare("violation_type", ascii_lower);
    if (!same) return raised<RuleScore>(why("violation_type", "lower"));
    r.violation_type_correct = *same;
  }
  return scored(r);
}

// ---------------------------------------------------------------------------

TaskScores aggregate_classification(const std::vector<ClassificationScore>& scores) {
  TaskScores out;
  out.task = Task::Classification;
  out.count = scores.size();
  if (scores.empty()) return out;
  const size_t n = scores.size();
  const auto exact = static_cast<size_t>(std::count_if(
      scores.begin(), scores.end(), [](const ClassificationScore& s) { return s.exact_match; }));
  const auto contains = static_cast<size_t>(std::count_if(
      scores.begin(), scores.end(), [](const ClassificationScore& s) { return s.contains_match; }));
  out.metrics.push_back(percent("exact_match", share(exact, n), "exact_match"));
  out.metrics.push_back(percent("contains_match", share(contains, n), "contains_match"));
  return out;
}

TaskScores aggregate_mapping(const std::vector<Outcome<MappingScore>>& outcomes) {
  TaskScores out;
  out.task = Task::Mapping;
  const std::vector<MappingScore> ok = split_outcomes(outcomes, out);
  if (ok.empty()) return out;
  const size_t n = ok.size();
  size_t valid = 0;
  std::vector<double> mapping, unmapped;
  for (const MappingScore& s : ok) {
    valid += s.json_valid ? 1 : 0;
    mapping.push_back(s.mapping_accuracy);
    unmapped.push_back(s.unmapped_accuracy);
  }
  out.metrics.push_back(percent("json_valid", share(valid, n), "json_valid_pct"));
  out.metrics.push_back(percent("mapping_accuracy", py_mean(mapping), "mapping_accuracy"));
  out.metrics.push_back(percent("unmapped_accuracy", py_mean(unmapped), "unmapped_accuracy"));
  return out;
}

TaskScores aggregate_rules(const std::vector<Outcome<RuleScore>>& outcomes) {
  TaskScores out;
  out.task = Task::Rules;
  const std::vector<RuleScore> ok = split_outcomes(outcomes, out);
  if (ok.empty()) return out;
  const size_t n = ok.size();
  const auto rate = [&](bool RuleScore::*flag) {
    return share(static_cast<size_t>(std::count_if(ok.begin(), ok.end(),
                                                   [&](const RuleScore& s) { return s.*flag; })),
                 n);
  };
  const double has_vt = rate(&RuleScore::has_violation_type);
  const double has_sev = rate(&RuleScore::has_severity);
  const double has_wc = rate(&RuleScore::has_where_clause);
  const double has_oid = rate(&RuleScore::has_objective_ids);
  const auto all = static_cast<size_t>(std::count_if(
      ok.begin(), ok.end(), [](const RuleScore& s) { return s.has_all_fields(); }));
  out.metrics.push_back(percent("json_valid", rate(&RuleScore::json_valid), "json_valid_pct"));
  out.metrics.push_back(percent("all_fields_study", std::min({has_vt, has_sev, has_wc, has_oid}),
                                "has_all_fields_pct"));
  out.metrics.push_back(percent("all_fields_share", share(all, n), ""));
  out.metrics.push_back(
      percent("severity_correct", rate(&RuleScore::severity_correct), "severity_correct"));
  out.metrics.push_back(percent("violation_type_correct",
                                rate(&RuleScore::violation_type_correct),
                                "violation_type_correct"));
  out.metrics.push_back(percent("has_violation_type", has_vt, ""));
  out.metrics.push_back(percent("has_severity", has_sev, ""));
  out.metrics.push_back(percent("has_where_clause", has_wc, ""));
  out.metrics.push_back(percent("has_objective_ids", has_oid, ""));
  return out;
}

TaskScores evaluate(Task task, const std::vector<Example>& examples) {
  switch (task) {
    case Task::Classification: {
      std::vector<ClassificationScore> scores;
      for (const Example& e : examples) {
        scores.push_back(score_classification(e.prediction, e.expected));
      }
      return aggregate_classification(scores);
    }
    case Task::Mapping: {
      std::vector<Outcome<MappingScore>> outcomes;
      for (const Example& e : examples) outcomes.push_back(score_mapping(e.prediction, e.expected));
      return aggregate_mapping(outcomes);
    }
    case Task::Rules: {
      std::vector<Outcome<RuleScore>> outcomes;
      for (const Example& e : examples) outcomes.push_back(score_rules(e.prediction, e.expected));
      return aggregate_rules(outcomes);
    }
  }
  throw RuntimeError("evaluate: unhandled task");
}

// ---------------------------------------------------------------------------

double python_round(double x, int ndigits) {
  if (ndigits < 0 || ndigits > 300) {
    throw InputError("python_round: ndigits must be in [0, 300], got " + std::to_string(ndigits));
  }
  if (!std::isfinite(x)) return x;
  // glibc's printf is exact on the binary value and rounds ties to even, as
  // CPython's float.__round__ (_Py_dg_dtoa mode 3) does.
  std::vector<char> buf(400 + static_cast<size_t>(ndigits));
  std::snprintf(buf.data(), buf.size(), "%.*f", ndigits, x);
  return std::strtod(buf.data(), nullptr);
}

std::string format_percent(double rounded) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f", rounded);
  std::string s(buf);
  // repr keeps at least one decimal: 40.80 -> 40.8, 0.00 -> 0.0.
  while (s.size() >= 2 && s.back() == '0' && s[s.size() - 2] != '.') s.pop_back();
  return s;
}

std::string render_table(const std::vector<RunScores>& runs) {
  // Columns in first-seen order: per task its metrics, then n (and errors).
  std::vector<std::pair<std::string, std::string>> columns;  // (task, metric | "n" | "errors")
  const auto add_column = [&](const std::string& task, const std::string& metric) {
    const auto key = std::make_pair(task, metric);
    if (std::find(columns.begin(), columns.end(), key) == columns.end()) columns.push_back(key);
  };
  std::vector<std::string> tasks_seen;
  for (const RunScores& run : runs) {
    std::vector<Task> in_run;
    for (const TaskScores& t : run.tasks) {
      if (std::find(in_run.begin(), in_run.end(), t.task) != in_run.end()) {
        throw InputError("render_table: run '" + run.run + "' lists task '" + task_name(t.task) +
                         "' twice");
      }
      in_run.push_back(t.task);
      const std::string task = task_name(t.task);
      if (std::find(tasks_seen.begin(), tasks_seen.end(), task) == tasks_seen.end()) {
        tasks_seen.push_back(task);
      }
    }
  }
  for (const std::string& task : tasks_seen) {
    bool any_errors = false;
    for (const RunScores& run : runs) {
      for (const TaskScores& t : run.tasks) {
        if (task_name(t.task) != task) continue;
        for (const Metric& m : t.metrics) add_column(task, m.name);
        any_errors = any_errors || t.errors > 0;
      }
    }
    add_column(task, "n");
    if (any_errors) add_column(task, "errors");
  }

  std::string out = "| run |";
  std::string rule = "|---|";
  for (const auto& [task, metric] : columns) {
    out += " " + task + "." + metric + " |";
    rule += "---:|";
  }
  out += "\n" + rule + "\n";
  for (const RunScores& run : runs) {
    out += "| " + run.run + " |";
    for (const auto& [task, metric] : columns) {
      std::string cell = "-";
      for (const TaskScores& t : run.tasks) {
        if (task_name(t.task) != task) continue;
        if (metric == "n") {
          cell = std::to_string(t.total());
        } else if (metric == "errors") {
          cell = std::to_string(t.errors);
        } else {
          for (const Metric& m : t.metrics) {
            if (m.name == metric) cell = format_percent(m.value);
          }
        }
      }
      out += " " + cell + " |";
    }
    out += "\n";
  }
  return out;
}

ordered_json to_json(const TaskScores& scores) {
  ordered_json j;
  j["task"] = task_name(scores.task);
  j["examples"] = scores.total();
  j["count"] = scores.count;
  j["errors"] = scores.errors;
  j["error_messages"] = scores.error_messages;
  ordered_json metrics = ordered_json::object();
  ordered_json unrounded = ordered_json::object();
  ordered_json study_keys = ordered_json::object();
  for (const Metric& m : scores.metrics) {
    metrics[m.name] = m.value;
    unrounded[m.name] = m.unrounded;
    if (!m.study_key.empty()) study_keys[m.name] = m.study_key;
  }
  j["metrics"] = std::move(metrics);
  j["unrounded"] = std::move(unrounded);
  j["study_keys"] = std::move(study_keys);
  return j;
}

ordered_json to_json(const std::vector<RunScores>& runs) {
  ordered_json list = ordered_json::array();
  for (const RunScores& run : runs) {
    ordered_json tasks = ordered_json::object();
    for (const TaskScores& t : run.tasks) tasks[task_name(t.task)] = to_json(t);
    list.push_back(ordered_json{{"run", run.run}, {"tasks", std::move(tasks)}});
  }
  return ordered_json{{"runs", std::move(list)}};
}

}  // namespace peftfw::eval
