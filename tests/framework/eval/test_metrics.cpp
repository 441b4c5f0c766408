// Tests for peftfw/eval/metrics.hpp: the seed study's scoring rules
// (scripts/eval_models.py), one hand-made case per rule. Every expected value
// is worked out by hand in the comment beside it, following the study's
// Python statements.
#include "peftfw/eval/metrics.hpp"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "peftfw/error.hpp"

namespace peftfw::eval {
namespace {

// ---------------------------------------------------------------------------
// Classification

TEST(ClassificationScore, RoleTokensAreRemovedAfterLowerCasing) {
  // strip -> "schema_label_7<|end_of_text|>" (lower-cased) -> token removed.
  auto s = score_classification("  Schema_Label_7<|end_of_text|>", "schema_label_7");
  EXPECT_TRUE(s.exact_match);
  EXPECT_EQ(s.predicted, "schema_label_7");
  // lower() runs before the removal, so an upper-cased token is removed too.
  s = score_classification("label_a<|END_OF_TEXT|>", "label_a");
  EXPECT_TRUE(s.exact_match);
  // Removed anywhere in the first line, then stripped: "label_a ".strip().
  s = score_classification("<|end_of_role|>label_a <|end_of_text|>", "label_a");
  EXPECT_TRUE(s.exact_match);
}

TEST(ClassificationScore, TokenRemovalIsOnePassInTheStudysOrder) {
  // end_of_text is removed first (one pass), which leaves a new
  // "<|end_of_text|>" that nobody removes: pred = "label_a<|end_of_text|>".
  auto s = score_classification("label_a<|end_of<|end_of_text|>_text|>", "label_a");
  EXPECT_FALSE(s.exact_match);
  EXPECT_TRUE(s.contains_match);
  EXPECT_EQ(s.predicted, "label_a<|end_of_text|>");
  // end_of_role is removed second, joining "<|end_of_" + "text|>": same result.
  s = score_classification("label_a<|end_of_<|end_of_role|>text|>", "label_a");
  EXPECT_EQ(s.predicted, "label_a<|end_of_text|>");
  EXPECT_FALSE(s.exact_match);
}

TEST(ClassificationScore, CaseIsIgnoredOnBothSides) {
  // expected.strip().lower() = "invoice_v2"; pred lower = "invoice_v2".
  auto s = score_classification("Invoice_V2", " INVOICE_v2 \n");
  EXPECT_TRUE(s.exact_match);
  EXPECT_TRUE(s.contains_match);
  EXPECT_EQ(s.expected, "invoice_v2");
}

TEST(ClassificationScore, OnlyTheFirstLineCounts) {
  // strip -> "label_b  \nlabel_c"; first line "label_b  " -> "label_b".
  auto s = score_classification("\n  label_b  \nlabel_c", "label_c");
  EXPECT_FALSE(s.exact_match);
  EXPECT_FALSE(s.contains_match);  // label_c is on line 2: the paper's "anywhere" is wrong
  s = score_classification("\n  label_b  \nlabel_c", "label_b");
  EXPECT_TRUE(s.exact_match);
}

TEST(ClassificationScore, ContainsIsASubstringOfTheFirstLine) {
  auto s = score_classification("The label is LABEL_B.\nMore text", "label_b");
  EXPECT_FALSE(s.exact_match);
  EXPECT_TRUE(s.contains_match);  // "label_b" in "the label is label_b."
}

TEST(ClassificationScore, EmptyAndMultiLineExpected) {
  // "" in s is always True in Python; exact only for an empty prediction.
  auto s = score_classification("anything", "  ");
  EXPECT_TRUE(s.contains_match);
  EXPECT_FALSE(s.exact_match);
  // First line "<|end_of_role|>" -> removed -> "" == "".
  s = score_classification("<|end_of_role|>\nlabel", "");
  EXPECT_TRUE(s.exact_match);
  // The expected text is not cut to a line: "a\nb" can never equal a first line.
  s = score_classification("a\nb", "a\nb");
  EXPECT_FALSE(s.exact_match);
  EXPECT_FALSE(s.contains_match);
}

TEST(ClassificationScore, StripUsesPythonsWhitespaceSet) {
  // U+00A0, U+3000 and U+001C are str.isspace() in Python.
  auto s = score_classification("\xC2\xA0label_a\xE3\x80\x80\x1C", "label_a");
  EXPECT_TRUE(s.exact_match);
  // U+200B (zero width space) is not whitespace: it stays.
  s = score_classification("label_a\xE2\x80\x8B", "label_a");
  EXPECT_FALSE(s.exact_match);
  EXPECT_TRUE(s.contains_match);
}

TEST(ClassificationAggregate, PercentagesRoundedLikePython) {
  // exact: 1 of 3 -> 1/3*100 = 33.333... -> 33.33
  // contains: 2 of 3 -> 66.666... -> 66.67
  TaskScores t = evaluate(Task::Classification, {{"label_a", "label_a"},
                                                 {"it is label_b", "label_b"},
                                                 {"label_x", "label_c"}});
  EXPECT_EQ(t.count, 3u);
  EXPECT_EQ(t.errors, 0u);
  ASSERT_EQ(t.metrics.size(), 2u);
  EXPECT_EQ(t.metrics[0].name, "exact_match");
  EXPECT_DOUBLE_EQ(t.at("exact_match").value, 33.33);
  EXPECT_DOUBLE_EQ(t.at("exact_match").unrounded, 100.0 / 3.0);
  EXPECT_DOUBLE_EQ(t.at("contains_match").value, 66.67);
}

// ---------------------------------------------------------------------------
// Mapping

const char* kMapExpected = R"({"mapping": {"a": "A", "b": "B"}, "unmapped_expected": ["c"]})";

MappingScore map_ok(const char* pred, const char* expected) {
  Outcome<MappingScore> o = score_mapping(pred, expected);
  EXPECT_TRUE(o.ok()) << (o.error ? o.error->what : "");
  return o.score.value_or(MappingScore{});
}

TEST(MappingScore, JsonEmbeddedInProse) {
  // First '{' to last '}' is the whole object; 2/2 keys right, {"c"} == {"c"}.
  MappingScore s = map_ok(
      R"(Here you go: {"mapping": {"b": "B", "a": "A"}, "unmapped_expected": ["c"]} Hope it )"
      R"(helps.)",
      kMapExpected);
  EXPECT_TRUE(s.json_valid);
  EXPECT_DOUBLE_EQ(s.mapping_accuracy, 1.0);
  EXPECT_DOUBLE_EQ(s.unmapped_accuracy, 1.0);
}

TEST(MappingScore, FirstBraceToLastBraceCanSpanProse) {
  // '{...} and {oops}' is one span and does not parse: invalid, all 0.
  MappingScore s = map_ok(R"({"mapping": {"a": "A"}} and {oops})", kMapExpected);
  EXPECT_FALSE(s.json_valid);
  EXPECT_EQ(s.mapping_accuracy, 0.0);
  // '}' before '{': nothing to parse.
  s = map_ok("} {", kMapExpected);
  EXPECT_FALSE(s.json_valid);
}

TEST(MappingScore, PartialMappingAndMissingUnmapped) {
  // a right, b wrong -> 1/2; exp {"c"} vs pred {} -> 0/1.
  MappingScore s =
      map_ok(R"({"mapping": {"a": "A", "b": "X"}, "unmapped_expected": []})", kMapExpected);
  EXPECT_TRUE(s.json_valid);
  EXPECT_DOUBLE_EQ(s.mapping_accuracy, 0.5);
  EXPECT_DOUBLE_EQ(s.unmapped_accuracy, 0.0);
  // Partial overlap: exp {"c","d"}, pred {"c","e"} -> |{"c"}| / 2.
  s = map_ok(R"({"mapping": {}, "unmapped_expected": ["c", "e"]})",
             R"({"mapping": {"a": "A"}, "unmapped_expected": ["c", "d"]})");
  EXPECT_DOUBLE_EQ(s.mapping_accuracy, 0.0);
  EXPECT_DOUBLE_EQ(s.unmapped_accuracy, 0.5);
}

TEST(MappingScore, EmptyExpectedMappingScoresZero) {
  // Expected mapping {} -> mapping_accuracy stays 0 even for an empty prediction;
  // unmapped sets {"x","y"} == {"y","x"} in a different order -> 1.0.
  MappingScore s = map_ok(R"({"mapping": {}, "unmapped_expected": ["y", "x", "y"]})",
                          R"({"mapping": {}, "unmapped_expected": ["x", "y"]})");
  EXPECT_EQ(s.mapping_accuracy, 0.0);
  EXPECT_DOUBLE_EQ(s.unmapped_accuracy, 1.0);
}

TEST(MappingScore, UnmappedBothEmptyOrOnlyPredicted) {
  // Neither side has unmapped_expected -> both sets empty -> 1.0.
  MappingScore s = map_ok(R"({"mapping": {"a": "A"}})", R"({"mapping": {"a": "A"}})");
  EXPECT_DOUBLE_EQ(s.mapping_accuracy, 1.0);
  EXPECT_DOUBLE_EQ(s.unmapped_accuracy, 1.0);
  // Nothing expected, something predicted -> 0.
  s = map_ok(R"({"mapping": {"a": "A"}, "unmapped_expected": ["z"]})",
             R"({"mapping": {"a": "A"}, "unmapped_expected": []})");
  EXPECT_DOUBLE_EQ(s.unmapped_accuracy, 0.0);
}

TEST(MappingScore, ExpectedNullMatchesMissingKey) {
  // pred_mapping.get("b") is None == None: 2/2.
  MappingScore s = map_ok(R"({"mapping": {"a": "A"}})", R"({"mapping": {"a": "A", "b": null}})");
  EXPECT_DOUBLE_EQ(s.mapping_accuracy, 1.0);
}

TEST(MappingScore, PythonEqualityOfValues) {
  // 1 == 1.0 and True == 1 in Python; "1" != 1; [1] == [1.0]. 3 of 4.
  MappingScore s = map_ok(R"({"mapping": {"a": 1.0, "b": true, "c": "1", "d": [1.0]}})",
                          R"({"mapping": {"a": 1, "b": 1, "c": 1, "d": [1]}})");
  EXPECT_DOUBLE_EQ(s.mapping_accuracy, 0.75);
  // Sets collapse 1, 1.0 and True: {1, True} == {1.0} -> 1.0.
  s = map_ok(R"({"unmapped_expected": [1.0]})", R"({"unmapped_expected": [1, true]})");
  EXPECT_DOUBLE_EQ(s.unmapped_accuracy, 1.0);
}

TEST(MappingScore, DuplicateKeysLastWins) {
  // json.loads keeps the last "a": "A" -> 1/1.
  MappingScore s = map_ok(R"({"mapping": {"a": "X", "a": "A"}})", R"({"mapping": {"a": "A"}})");
  EXPECT_DOUBLE_EQ(s.mapping_accuracy, 1.0);
}

TEST(MappingScore, UnmappedAsStringIsASetOfCharacters) {
  // set("ab") == {"a","b"} == set(["b","a"]) -> 1.0 (a quirk of set()).
  MappingScore s = map_ok(R"({"unmapped_expected": ["b", "a"]})", R"({"unmapped_expected": "ab"})");
  EXPECT_DOUBLE_EQ(s.unmapped_accuracy, 1.0);
}

TEST(MappingScore, InvalidExpectedScoresZeroWithoutError) {
  // json.loads(expected) fails first: json_valid False even for a good prediction.
  MappingScore s = map_ok(R"({"mapping": {"a": "A"}})", "not json");
  EXPECT_FALSE(s.json_valid);
  EXPECT_EQ(s.unmapped_accuracy, 0.0);
  // A BOM makes json.loads raise JSONDecodeError ("Unexpected UTF-8 BOM").
  s = map_ok(R"({"mapping": {"a": "A"}})", "\xEF\xBB\xBF{\"mapping\": {\"a\": \"A\"}}");
  EXPECT_FALSE(s.json_valid);
}

TEST(MappingScore, PythonExceptionsBecomeErrors) {
  // pred "mapping": null -> None.get(k) raises AttributeError.
  auto o = score_mapping(R"({"mapping": null})", kMapExpected);
  ASSERT_FALSE(o.ok());
  EXPECT_NE(o.error->what.find("'NoneType' object has no attribute 'get'"), std::string::npos);
  // pred "mapping" a list -> AttributeError too.
  EXPECT_FALSE(score_mapping(R"({"mapping": ["a"]})", kMapExpected).ok());
  // Expected JSON that is not an object -> exp_obj.get raises (pred parsed)...
  EXPECT_FALSE(score_mapping(R"({"mapping": {}})", "[1, 2]").ok());
  // ...but an unparsable prediction returns first: zeros, no error.
  EXPECT_TRUE(score_mapping("no json", "[1, 2]").ok());
  // Unhashable element in unmapped_expected -> TypeError.
  o = score_mapping(R"({"unmapped_expected": [["x"]]})", kMapExpected);
  ASSERT_FALSE(o.ok());
  EXPECT_NE(o.error->what.find("unhashable type: 'list'"), std::string::npos);
  // unmapped_expected: null -> set(None) raises TypeError.
  EXPECT_FALSE(score_mapping(R"({"mapping": {}})", R"({"unmapped_expected": null})").ok());
}

TEST(MappingScore, PredMappingNotObjectIsFineWhenExpectedMappingIsEmpty) {
  // exp_mapping {} is falsy, so pred_mapping.get is never called: no error;
  // mapping 0, unmapped both missing -> 1.0.
  MappingScore s = map_ok(R"({"mapping": "x"})", R"({"mapping": {}})");
  EXPECT_EQ(s.mapping_accuracy, 0.0);
  EXPECT_DOUBLE_EQ(s.unmapped_accuracy, 1.0);
}

TEST(MappingAggregate, InvalidJsonCountsZeroErrorsAreLeftOut) {
  // e1 (1, 1), e2 (0.5, 0), e3 invalid (0, 0), e4 empty expected mapping
  // (0, 1), e5 raises -> left out: n = 4, errors = 1.
  // json_valid 3/4 = 75.0; mapping (1 + 0.5 + 0 + 0)/4 = 37.5;
  // unmapped (1 + 0 + 0 + 1)/4 = 50.0.
  TaskScores t = evaluate(
      Task::Mapping,
      {{R"({"mapping": {"a": "A", "b": "B"}, "unmapped_expected": ["c"]})", kMapExpected},
       {R"({"mapping": {"a": "A", "b": "X"}})", kMapExpected},
       {"I cannot map these columns.", kMapExpected},
       {R"({"mapping": {"q": "r"}, "unmapped_expected": ["x"]})",
        R"({"mapping": {}, "unmapped_expected": ["x"]})"},
       {R"({"mapping": null})", kMapExpected}});
  EXPECT_EQ(t.count, 4u);
  EXPECT_EQ(t.errors, 1u);
  EXPECT_EQ(t.total(), 5u);
  ASSERT_EQ(t.error_messages.size(), 1u);
  EXPECT_EQ(t.error_messages[0].rfind("example 4: AttributeError", 0), 0u);
  ASSERT_EQ(t.metrics.size(), 3u);
  EXPECT_EQ(t.metrics[0].name, "json_valid");
  EXPECT_EQ(t.metrics[0].study_key, "json_valid_pct");
  EXPECT_DOUBLE_EQ(t.at("json_valid").value, 75.0);
  EXPECT_DOUBLE_EQ(t.at("mapping_accuracy").value, 37.5);
  EXPECT_DOUBLE_EQ(t.at("unmapped_accuracy").value, 50.0);
}

TEST(MappingAggregate, AllErrorsGiveNoScores) {
  TaskScores t = evaluate(Task::Mapping, {{R"({"mapping": 3})", kMapExpected}});
  EXPECT_EQ(t.count, 0u);
  EXPECT_EQ(t.errors, 1u);
  EXPECT_TRUE(t.metrics.empty());
  EXPECT_THROW(t.at("json_valid"), InputError);
}

// ---------------------------------------------------------------------------
// Rules

const char* kRuleExpected =
    R"({"violation_type": "Access_Control", "severity": "HIGH", "where_clause": "x > 1", )"
    R"("objective_ids": ["AC.1"]})";

RuleScore rule_ok(const char* pred, const char* expected = kRuleExpected) {
  Outcome<RuleScore> o = score_rules(pred, expected);
  EXPECT_TRUE(o.ok()) << (o.error ? o.error->what : "");
  return o.score.value_or(RuleScore{});
}

TEST(RuleScore, CaseInsensitiveComparisons) {
  // "high".upper() == "HIGH"; "ACCESS_CONTROL".lower() == "access_control".
  RuleScore s = rule_ok(
      R"(Rule: {"violation_type": "ACCESS_CONTROL", "severity": "high", "where_clause": "", )"
      R"("objective_ids": []})");
  EXPECT_TRUE(s.json_valid);
  EXPECT_TRUE(s.has_all_fields());  // presence only: "" and [] count
  EXPECT_TRUE(s.severity_correct);
  EXPECT_TRUE(s.violation_type_correct);
  s = rule_ok(R"({"violation_type": "Access", "severity": "Medium"})");
  EXPECT_FALSE(s.severity_correct);
  EXPECT_FALSE(s.violation_type_correct);
  EXPECT_FALSE(s.has_where_clause);
}

TEST(RuleScore, ObjectiveIdsMustBeAList) {
  RuleScore s = rule_ok(R"({"objective_ids": "AC.1"})");
  EXPECT_FALSE(s.has_objective_ids);
  s = rule_ok(R"({"objective_ids": null})");
  EXPECT_FALSE(s.has_objective_ids);
  s = rule_ok(R"({"objective_ids": ["AC.1"]})");
  EXPECT_TRUE(s.has_objective_ids);
}

TEST(RuleScore, MissingExpectedFieldDefaultsToEmptyString) {
  // exp.get("severity", "") = "" and "".upper() == "": correct.
  RuleScore s = rule_ok(R"({"severity": ""})", R"({"violation_type": "x"})");
  EXPECT_TRUE(s.severity_correct);
}

TEST(RuleScore, InvalidJsonOnEitherSide) {
  RuleScore s = rule_ok("severity: HIGH");
  EXPECT_FALSE(s.json_valid);
  EXPECT_FALSE(s.has_severity);
  // Unparsable expected output: everything False, even for a perfect prediction.
  s = rule_ok(kRuleExpected, "{broken");
  EXPECT_FALSE(s.json_valid);
  EXPECT_FALSE(s.has_severity);
}

TEST(RuleScore, PythonExceptionsBecomeErrors) {
  // None.upper() raises.
  auto o = score_rules(R"({"severity": null})", kRuleExpected);
  ASSERT_FALSE(o.ok());
  EXPECT_NE(o.error->what.find("'NoneType' object has no attribute 'upper'"), std::string::npos);
  // A number has no lower().
  EXPECT_FALSE(score_rules(R"({"violation_type": 3})", kRuleExpected).ok());
  // Expected severity null -> None.upper() on the right side.
  EXPECT_FALSE(score_rules(R"({"severity": "LOW"})", R"({"severity": null})").ok());
  // Expected is a list: only raises when a comparison needs exp_obj.get.
  EXPECT_FALSE(score_rules(R"({"severity": "LOW"})", "[1]").ok());
  RuleScore s = rule_ok(R"({"where_clause": "w"})", "[1]");
  EXPECT_TRUE(s.json_valid);
  EXPECT_TRUE(s.has_where_clause);
}

TEST(RuleAggregate, MinOfRatesDiffersFromShareOfExamples) {
  // Each example lacks a different field, so every presence rate is 3/4 while
  // no example has all four:
  //   all_fields_study = min(75, 75, 75, 75) = 75.0 (the study's has_all_fields_pct)
  //   all_fields_share = 0/4 = 0.0
  // severity_correct: e1, e3 -> 2/4 = 50.0; violation_type_correct: e2, e4 -> 50.0.
  // e5 raises (severity null) and is left out of n.
  const char* exp =
      R"({"violation_type": "vt", "severity": "LOW", "where_clause": "w", "objective_ids": ["o"]})";
  TaskScores t = evaluate(
      Task::Rules,
      {{R"({"severity": "low", "where_clause": "w", "objective_ids": ["o"]})", exp},
       {R"({"violation_type": "VT", "where_clause": "w", "objective_ids": ["o"]})", exp},
       {R"({"violation_type": "other", "severity": "Low", "objective_ids": ["o"]})", exp},
       {R"({"violation_type": "vt", "severity": "HIGH", "where_clause": "w", )"
        R"("objective_ids": "o"})",
        exp},
       {R"({"severity": null})", exp}});
  EXPECT_EQ(t.count, 4u);
  EXPECT_EQ(t.errors, 1u);
  EXPECT_DOUBLE_EQ(t.at("json_valid").value, 100.0);
  EXPECT_DOUBLE_EQ(t.at("all_fields_study").value, 75.0);
  EXPECT_EQ(t.at("all_fields_study").study_key, "has_all_fields_pct");
  EXPECT_DOUBLE_EQ(t.at("all_fields_share").value, 0.0);
  EXPECT_EQ(t.at("all_fields_share").study_key, "");
  EXPECT_DOUBLE_EQ(t.at("severity_correct").value, 50.0);
  EXPECT_DOUBLE_EQ(t.at("violation_type_correct").value, 50.0);
  EXPECT_DOUBLE_EQ(t.at("has_violation_type").value, 75.0);
  EXPECT_DOUBLE_EQ(t.at("has_objective_ids").value, 75.0);
  std::vector<std::string> names;
  for (const Metric& m : t.metrics) names.push_back(m.name);
  EXPECT_EQ(names, (std::vector<std::string>{"json_valid", "all_fields_study", "all_fields_share",
                                             "severity_correct", "violation_type_correct",
                                             "has_violation_type", "has_severity",
                                             "has_where_clause", "has_objective_ids"}));
}

TEST(RuleAggregate, InvalidJsonCountsZero) {
  // e1 complete and correct, e2 invalid, e3 has only severity (correct):
  // json_valid 2/3 = 66.67; presence rates 1/3, 2/3, 1/3, 1/3 -> study min 33.33;
  // share 1/3 = 33.33; severity 2/3 = 66.67; violation_type 1/3 = 33.33.
  TaskScores t = evaluate(Task::Rules, {{kRuleExpected, kRuleExpected},
                                        {"Sorry, I can't.", kRuleExpected},
                                        {R"({"severity": "High"})", kRuleExpected}});
  EXPECT_EQ(t.count, 3u);
  EXPECT_DOUBLE_EQ(t.at("json_valid").value, 66.67);
  EXPECT_DOUBLE_EQ(t.at("all_fields_study").value, 33.33);
  EXPECT_DOUBLE_EQ(t.at("all_fields_share").value, 33.33);
  EXPECT_DOUBLE_EQ(t.at("severity_correct").value, 66.67);
  EXPECT_DOUBLE_EQ(t.at("violation_type_correct").value, 33.33);
}

// ---------------------------------------------------------------------------
// Rounding, tasks, reports

TEST(PythonRound, CorrectlyRoundedTiesToEven) {
  EXPECT_EQ(python_round(0.125, 2), 0.12);  // exact tie -> even
  EXPECT_EQ(python_round(0.375, 2), 0.38);  // exact tie -> even
  EXPECT_EQ(python_round(2.675, 2), 2.67);  // the double is 2.67499999...
  EXPECT_EQ(python_round(1.005, 2), 1.0);   // the double is 1.00499999...
  EXPECT_EQ(python_round(100.0 * 2 / 3, 2), 66.67);
  EXPECT_EQ(format_percent(40.8), "40.8");
  EXPECT_EQ(format_percent(0.0), "0.0");
  EXPECT_EQ(format_percent(96.03), "96.03");
  EXPECT_EQ(format_percent(100.0), "100.0");
}

TEST(Tasks, NamesAndStudyNames) {
  EXPECT_EQ(parse_task("classification"), Task::Classification);
  EXPECT_EQ(parse_task("mapping"), Task::Mapping);
  EXPECT_EQ(parse_task("rules"), Task::Rules);
  EXPECT_STREQ(task_name(Task::Rules), "rules");
  try {
    parse_task("rule_generation");
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("use 'rules'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(parse_task("Mapping"), InputError);
}

TEST(Report, TableHasOneRowPerRunAndOneColumnPerMetric) {
  TaskScores c1 = evaluate(Task::Classification, {{"a", "a"}, {"b", "c"}});  // 50.0, 50.0
  TaskScores c2 = evaluate(Task::Classification, {{"a", "a"}, {"c", "c"}});  // 100.0, 100.0
  TaskScores m2 = evaluate(Task::Mapping, {{R"({"mapping": null})", kMapExpected},
                                           {R"({"mapping": {"a": "A", "b": "B"}})",
                                            kMapExpected}});  // n 2, 1 error: 100, 100, 0
  const std::string table = render_table({{"base", {c1}}, {"v4", {c2, m2}}});
  EXPECT_EQ(table,
            "| run | classification.exact_match | classification.contains_match | "
            "classification.n | mapping.json_valid | mapping.mapping_accuracy | "
            "mapping.unmapped_accuracy | mapping.n | mapping.errors |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
            "| base | 50.0 | 50.0 | 2 | - | - | - | - | - |\n"
            "| v4 | 100.0 | 100.0 | 2 | 100.0 | 100.0 | 0.0 | 2 | 1 |\n");
  EXPECT_THROW(render_table({{"dup", {c1, c2}}}), InputError);
}

TEST(Report, JsonKeepsMetricOrderAndStudyKeys) {
  TaskScores r = evaluate(Task::Rules, {{kRuleExpected, kRuleExpected}});
  nlohmann::ordered_json j = to_json(r);
  EXPECT_EQ(j["task"], "rules");
  EXPECT_EQ(j["examples"], 1);
  EXPECT_EQ(j["count"], 1);
  EXPECT_EQ(j["errors"], 0);
  EXPECT_EQ(j["metrics"].begin().key(), "json_valid");
  EXPECT_EQ(j["metrics"]["all_fields_study"], 100.0);
  EXPECT_EQ(j["study_keys"]["all_fields_study"], "has_all_fields_pct");
  EXPECT_FALSE(j["study_keys"].contains("all_fields_share"));
  nlohmann::ordered_json runs = to_json(std::vector<RunScores>{{"v4", {r}}});
  EXPECT_EQ(runs["runs"][0]["run"], "v4");
  EXPECT_EQ(runs["runs"][0]["tasks"]["rules"]["metrics"]["severity_correct"], 100.0);
}

}  // namespace
}  // namespace peftfw::eval
