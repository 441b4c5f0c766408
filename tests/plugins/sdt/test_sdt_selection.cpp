// SDT / SDLoRA dimension selection (plugins/sdt/selection.cpp) against tests/oracles/sdt_selection.py,
// a re-implementation of the reference (furiosa-ai/ssm-peft sd_lora.py) in its own (state, channel)
// layout, plus the budget arithmetic and its errors. The oracle runs with the python named by the
// environment variable PEFTFW_PYTHON, else the compile definition PEFTFW_PYTHON.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <unistd.h>
#include <vector>

#include "../../../plugins/sdt/selection.hpp"
#include "../../common/expect_error.hpp"
#include "peftfw/error.hpp"

using peftfw::sdt::Amount;
using peftfw::sdt::Budget;
using peftfw::sdt::LayerSelection;
using peftfw::testing::expect_input_error;
namespace sdt = peftfw::sdt;

namespace {

std::string python() {
  if (const char* env = std::getenv("PEFTFW_PYTHON"); env != nullptr && *env != '\0') return env;
#ifdef PEFTFW_PYTHON
  return PEFTFW_PYTHON;
#else
  return "";
#endif
}

// An amount as the oracle's command line reads it: a float always carries a '.' (fraction), an int never.
std::string cli(const Amount& a) {
  if (const double* f = std::get_if<double>(&a)) {
    std::ostringstream out;
    out.precision(17);
    out << *f;
    std::string s = out.str();
    if (s.find_first_of(".eE") == std::string::npos) s += ".0";
    return s;
  }
  return std::to_string(std::get<int64_t>(a));
}

struct Case {
  std::string name;
  int seed;
  int64_t D, N;
  Budget channel, state;
  bool ties;
  int64_t expect_channels, expect_states;  // the budget arithmetic, by hand
};

nlohmann::json run_oracle(const Case& c) {
  const std::string py = python();
  if (py.empty()) {
    ADD_FAILURE() << "set PEFTFW_PYTHON (environment or compile definition) to a python with torch";
    return {};
  }
  const std::string out = ::testing::TempDir() + "sdt_selection_" + c.name + "_" + std::to_string(getpid()) + ".json";
  std::ostringstream cmd;
  cmd << "OMP_WAIT_POLICY=PASSIVE '" << py << "' '" << PEFTFW_TEST_DATA_DIR << "/oracles/sdt_selection.py'"
      << " --seed " << c.seed << " --channels " << c.D << " --states " << c.N
      << " --freeze-channels " << cli(c.channel.freeze) << " --freeze-states " << cli(c.state.freeze)
      << " --zero-channels " << cli(c.channel.zero) << " --zero-states " << cli(c.state.zero)
      << (c.ties ? " --ties" : "") << " --out '" << out << "' 2>&1";
  std::string log;
  FILE* pipe = popen(cmd.str().c_str(), "r");
  if (pipe == nullptr) {
    ADD_FAILURE() << "cannot run " << cmd.str();
    return {};
  }
  char buffer[512];
  while (fgets(buffer, sizeof buffer, pipe) != nullptr) log += buffer;
  const int status = pclose(pipe);
  if (status != 0) {
    ADD_FAILURE() << "oracle failed (" << status << "): " << cmd.str() << "\n" << log;
    return {};
  }
  std::ifstream in(out);
  nlohmann::json j = nlohmann::json::parse(in);
  std::remove(out.c_str());
  return j;
}

torch::Tensor from_json_2d(const nlohmann::json& rows) {
  const int64_t r = static_cast<int64_t>(rows.size());
  const int64_t c = static_cast<int64_t>(rows.at(0).size());
  std::vector<float> v;
  v.reserve(static_cast<size_t>(r * c));
  for (const auto& row : rows) {
    for (const auto& x : row) v.push_back(static_cast<float>(x.get<double>()));  // float32 values, exact
  }
  return torch::tensor(v, torch::kFloat).reshape({r, c});
}

std::vector<int64_t> true_indices(const torch::Tensor& t) {
  const torch::Tensor i = torch::nonzero(t).reshape({-1}).contiguous();
  return std::vector<int64_t>(i.data_ptr<int64_t>(), i.data_ptr<int64_t>() + i.numel());
}

std::vector<int64_t> as_vector(const torch::Tensor& t) {
  const torch::Tensor c = t.contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

void check_against_oracle(const Case& c) {
  SCOPED_TRACE(c.name);
  const nlohmann::json j = run_oracle(c);
  if (j.is_null()) return;
  const int64_t D = c.D, N = c.N;

  // Budget arithmetic: by hand, ours, the oracle's.
  EXPECT_EQ(sdt::trainable_count(D, c.channel, "channel"), c.expect_channels);
  EXPECT_EQ(sdt::trainable_count(N, c.state, "state"), c.expect_states);
  EXPECT_EQ(j["num_train"]["channel"].get<int64_t>(), c.expect_channels);
  EXPECT_EQ(j["num_train"]["state"].get<int64_t>(), c.expect_states);
  EXPECT_EQ(j["num_train_bc"]["state"].get<int64_t>(), N);  // B/C: every state of a selected channel

  const torch::Tensor delta_sc = from_json_2d(j["delta_state_channel"]);  // reference layout [N, D]
  ASSERT_EQ(delta_sc.sizes(), (std::vector<int64_t>{N, D}));
  const torch::Tensor delta = delta_sc.t().contiguous();  // ours: [D, N]
  const LayerSelection sel = sdt::select(delta, c.channel, c.state);

  // Indices, in importance order.
  EXPECT_EQ(sel.channels, j["channels"].get<std::vector<int64_t>>());
  EXPECT_EQ(sel.states, j["states"].get<std::vector<std::vector<int64_t>>>());
  EXPECT_EQ(sel.zeroed_channels, j["zeroed_channels"].get<std::vector<int64_t>>());
  EXPECT_EQ(sel.num_channels(), c.expect_channels);
  EXPECT_EQ(sel.num_states(), c.expect_states);

  // Counts of the flat trainable vectors.
  EXPECT_EQ(sel.a_trainable(), c.expect_channels * c.expect_states);
  EXPECT_EQ(sel.a_trainable(), j["trainable"]["A_log"].get<int64_t>());
  EXPECT_EQ(sel.bc_trainable(), N * c.expect_channels);
  EXPECT_EQ(sel.bc_trainable(), j["trainable"]["x_proj_B"].get<int64_t>());
  EXPECT_EQ(sel.bc_trainable(), j["trainable"]["x_proj_C"].get<int64_t>());
  EXPECT_EQ(sel.a_mask.sum().item<int64_t>(), sel.a_trainable());
  EXPECT_EQ(sel.bc_mask.sum().item<int64_t>(), sel.bc_trainable());

  // A_log mask [D, N] from the oracle's (state, channel) flat indices s * D + c, and its fill order.
  const auto a_fill = j["a_fill_order"].get<std::vector<int64_t>>();
  torch::Tensor expected_a = torch::zeros({D, N}, torch::kBool);
  for (int64_t f : a_fill) expected_a.index_put_({f % D, f / D}, true);
  EXPECT_TRUE(torch::equal(sel.a_mask, expected_a));
  // code[d][n] = n * D + d: gathering it gives the positions of the flat vector's entries.
  const torch::Tensor code_a = torch::arange(N * D, torch::kLong).reshape({N, D}).t().contiguous();
  const torch::Tensor gathered = sdt::gather_a_log(sel.a_mask, code_a);
  EXPECT_EQ(as_vector(gathered), a_fill);
  EXPECT_TRUE(torch::equal(sdt::scatter_a_log(sel.a_mask, gathered), code_a.masked_fill(~sel.a_mask, 0)));

  // Zeroed channels: whole rows of a_zero_mask, disjoint from the trainable mask.
  EXPECT_EQ(true_indices(sel.a_zero_mask.any(1)), j["a_zero_channels"].get<std::vector<int64_t>>());
  EXPECT_TRUE(torch::equal(sel.a_zero_mask.any(1), sel.a_zero_mask.all(1)));
  EXPECT_FALSE((sel.a_zero_mask & sel.a_mask).any().item<bool>());

  // B/C: whole columns of the selected channels, filled row-major (state, channel).
  EXPECT_EQ(true_indices(sel.bc_mask.any(0)), j["bc_columns"].get<std::vector<int64_t>>());
  EXPECT_TRUE(torch::equal(sel.bc_mask.any(0), sel.bc_mask.all(0)));
  const torch::Tensor code_bc = torch::arange(N * D, torch::kLong).reshape({N, D});
  EXPECT_EQ(as_vector(sdt::gather(sel.bc_mask, code_bc)), j["bc_fill_order"].get<std::vector<int64_t>>());

  // build_train_param: adapter (k + 1) / 4, A_log base = the delta itself, B base = 0.
  const torch::Tensor adapter_a = torch::arange(1, sel.a_trainable() + 1, torch::kFloat) / 4;
  const torch::Tensor adapter_bc = torch::arange(1, sel.bc_trainable() + 1, torch::kFloat) / 4;
  const torch::Tensor a_eff = from_json_2d(j["apply"]["a_log_effective_state_channel"]).t();
  EXPECT_TRUE(torch::equal(sdt::apply_a_log(delta, sel, adapter_a), a_eff));
  EXPECT_TRUE(torch::equal(sdt::apply_bc(torch::zeros({N, D}), sel, adapter_bc), from_json_2d(j["apply"]["b_effective"])));

  if (c.ties) {
    // The case must really have ties; ours go to the lower index, as the oracle's stable sort.
    EXPECT_GT(j["channel_tie_groups"].get<int64_t>(), 0);
    const torch::Tensor importance = delta.square().sum(1);
    for (size_t i = 1; i < sel.channels.size(); ++i) {
      const float prev = importance[sel.channels[i - 1]].item<float>();
      const float cur = importance[sel.channels[i]].item<float>();
      EXPECT_GE(prev, cur);
      if (prev == cur) {
        EXPECT_LT(sel.channels[i - 1], sel.channels[i]);
      }
    }
  } else {
    // Without ties, the reference's literal torch.argsort(-imp) (not stable) selects the same.
    EXPECT_TRUE(j["literal_argsort_agrees"].get<bool>());
  }
}

Budget budget(Amount freeze, Amount zero = int64_t{0}) { return Budget{freeze, zero}; }

}  // namespace

// ---- against the oracle ------------------------------------------------------------------------

TEST(SdtSelection, OracleSmallCounts) {
  // int budgets are counts: 64 - 50 = 14 channels, 16 - 12 = 4 states.
  check_against_oracle({"small_counts", 1, 64, 16, budget(int64_t{50}), budget(int64_t{12}), false, 14, 4});
}

TEST(SdtSelection, OracleMamba130mConfig) {
  // n0.75_d0.99 on mamba-130m: 1536 - round(0.99 * 1536) = 1536 - 1521 = 15 channels,
  // 16 - round(0.75 * 16) = 4 states.
  check_against_oracle({"mamba130m", 7, 1536, 16, budget(0.99), budget(0.75), false, 15, 4});
}

TEST(SdtSelection, OracleZeroedChannels) {
  // 96 - round(0.5 * 96) - 10 = 38 channels (10 zeroed); 8 - round(0.25 * 8) - 1 = 5 states.
  check_against_oracle({"zero", 3, 96, 8, budget(0.5, int64_t{10}), budget(0.25, int64_t{1}), false, 38, 5});
}

TEST(SdtSelection, OracleTies) {
  // A delta of multiples of 0.5: many equal importances. 200 - round(0.9 * 200) = 20; 16 - 12 = 4.
  check_against_oracle({"ties", 5, 200, 16, budget(0.9), budget(0.75), true, 20, 4});
}

// ---- by hand -----------------------------------------------------------------------------------

TEST(SdtSelection, HandExampleFillOrderAndZeroing) {
  // delta_A_log [D=3, N=2]; channel importance 9.01, 4, 0.5.
  const torch::Tensor delta = torch::tensor({0.1f, 3.0f, 2.0f, 0.0f, 0.5f, 0.5f}).reshape({3, 2});
  const LayerSelection sel = sdt::select(delta, budget(int64_t{0}, int64_t{1}), budget(int64_t{1}));
  EXPECT_EQ(sel.channels, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(sel.states, (std::vector<std::vector<int64_t>>{{1}, {0}}));
  EXPECT_EQ(sel.zeroed_channels, (std::vector<int64_t>{2}));
  // The flat vector runs over (state, channel): state 0 (channel 1) first, then state 1 (channel 0).
  const torch::Tensor dense = torch::tensor({11.0f, 12.0f, 21.0f, 22.0f, 31.0f, 32.0f}).reshape({3, 2});
  EXPECT_TRUE(torch::equal(sdt::gather_a_log(sel.a_mask, dense), torch::tensor({21.0f, 12.0f})));
  const torch::Tensor a_log = torch::zeros({3, 2});
  const torch::Tensor eff = sdt::apply_a_log(a_log, sel, torch::tensor({5.0f, 7.0f}), 2.0);
  EXPECT_TRUE(torch::equal(eff, torch::tensor({0.0f, 14.0f, 10.0f, 0.0f, 10.0f, 10.0f}).reshape({3, 2})));
  // B/C [N=2, D=3]: columns 0 and 1, row-major.
  EXPECT_TRUE(torch::equal(sel.bc_mask, torch::tensor({true, true, false, true, true, false}).reshape({2, 3})));
  EXPECT_TRUE(torch::equal(sdt::scatter_rows(sel.bc_mask, torch::tensor({1.0f, 2.0f, 3.0f, 4.0f})),
                           torch::tensor({1.0f, 2.0f, 0.0f, 3.0f, 4.0f, 0.0f}).reshape({2, 3})));
}

// ---- budgets -----------------------------------------------------------------------------------

TEST(SdtBudget, FractionsAndCounts) {
  EXPECT_EQ(sdt::trainable_count(1536, budget(0.0)), 1536);
  EXPECT_EQ(sdt::trainable_count(1536, budget(1.0)), 0);             // fraction 1.0: everything
  EXPECT_EQ(sdt::trainable_count(1536, budget(int64_t{1})), 1535);   // count 1: one row
  EXPECT_EQ(sdt::trainable_count(1536, budget(int64_t{0})), 1536);
  EXPECT_EQ(sdt::trainable_count(1536, budget(int64_t{1536})), 0);
  EXPECT_EQ(sdt::trainable_count(1536, budget(0.99)), 1536 - 1521);  // mamba-130m
  EXPECT_EQ(sdt::trainable_count(4096, budget(0.99)), 4096 - 4055);  // mamba-1.4b: 41
  EXPECT_EQ(sdt::trainable_count(5120, budget(0.99)), 5120 - 5069);  // mamba-2.8b: 51
  EXPECT_EQ(sdt::trainable_count(16, budget(0.75)), 4);
  EXPECT_EQ(sdt::trainable_count(16, budget(0.9)), 2);                // round(14.4) = 14
  EXPECT_EQ(sdt::trainable_count(16, budget(0.95)), 1);               // round(15.2) = 15
  // Python's round: halves go to the even integer (not std::round's away from zero).
  EXPECT_EQ(sdt::trainable_count(10, budget(0.25)), 10 - 2);          // round(2.5) = 2
  EXPECT_EQ(sdt::trainable_count(14, budget(0.25)), 14 - 4);          // round(3.5) = 4
  EXPECT_EQ(sdt::resolve(Amount{0.5}, 5), 2);                          // round(2.5) = 2
  // freeze and zero each rounded on their own.
  EXPECT_EQ(sdt::trainable_count(96, budget(0.5, int64_t{10})), 38);
  EXPECT_EQ(sdt::trainable_count(100, budget(0.3, 0.2)), 50);
}

TEST(SdtBudget, ImpossibleBudgetsNameTheNumbers) {
  expect_input_error([] { sdt::trainable_count(1536, budget(0.99, int64_t{20}), "channel"); },
                     {"channel", "0.99", "1521", "20", "1541", "1536"});
  expect_input_error([] { sdt::trainable_count(3, budget(0.5, 0.5), "state"); },
                     {"state", "round(0.5 * 3) = 2", "= 4", "3 states"});
  expect_input_error([] { sdt::trainable_count(16, budget(int64_t{17}), "state"); },
                     {"state freeze", "17", "[0, 16]"});
  expect_input_error([] { sdt::trainable_count(16, budget(int64_t{0}, int64_t{-1}), "state"); },
                     {"state zero", "-1", "[0, 16]"});
  expect_input_error([] { sdt::trainable_count(64, budget(1.5), "channel"); }, {"channel freeze", "1.5", "[0, 1]"});
  expect_input_error([] { sdt::trainable_count(64, budget(-0.1), "channel"); }, {"-0.1", "[0, 1]"});
  expect_input_error([] { sdt::trainable_count(64, budget(std::numeric_limits<double>::quiet_NaN())); },
                     {"nan", "[0, 1]"});
}

TEST(SdtBudget, SelectNeedsSomethingToTrain) {
  const torch::Tensor delta = torch::arange(1, 64 * 16 + 1, torch::kFloat).reshape({64, 16});
  expect_input_error([&] { sdt::select(delta, budget(1.0), budget(0.5)); },
                     {"channel budget", "round(1.0 * 64) = 64", "none of the 64 channels"});
  expect_input_error([&] { sdt::select(delta, budget(0.5), budget(int64_t{12}, int64_t{4})); },
                     {"state budget", "12", "4", "none of the 16 states"});
  expect_input_error([&] { sdt::select(delta, budget(0.99, int64_t{1}), budget(0.5)); },
                     {"channel", "0.99", "63", "64"});
}

// ---- the delta ---------------------------------------------------------------------------------

TEST(SdtSelection, RejectsBadDeltas) {
  expect_input_error([] { sdt::select(torch::zeros({64, 16}), budget(0.5), budget(0.5)); },
                     {"delta_A_log", "[64, 16]", "all zero"});
  torch::Tensor nan = torch::ones({8, 4});
  nan[2][1] = std::numeric_limits<float>::quiet_NaN();
  expect_input_error([&] { sdt::select(nan, budget(0.5), budget(0.5)); }, {"1 non-finite"});
  expect_input_error([] { sdt::select(torch::ones({8}), budget(0.5), budget(0.5)); }, {"2-D", "[8]"});
  expect_input_error([] { sdt::select(torch::ones({8, 4}, torch::kLong), budget(0.5), budget(0.5)); },
                     {"floating-point"});
}

TEST(SdtSelection, NonzeroDeltaSummingToZeroIsAccepted) {
  // The reference asserts torch.sum(delta) != 0, which would also reject this delta; we only
  // reject an all-zero delta.
  const torch::Tensor delta = torch::tensor({1.0f, -1.0f, 0.5f, -0.5f}).reshape({2, 2});
  const LayerSelection sel = sdt::select(delta, budget(int64_t{1}), budget(int64_t{1}));
  EXPECT_EQ(sel.channels, (std::vector<int64_t>{0}));
  EXPECT_EQ(sel.states, (std::vector<std::vector<int64_t>>{{0}}));  // tie: the lower index
}

TEST(SdtSelection, ScatterGatherCheckSizes) {
  const torch::Tensor mask = torch::tensor({true, false, true, true}).reshape({2, 2});
  expect_input_error([&] { sdt::scatter_rows(mask, torch::ones({2})); }, {"3 values", "[2]"});
  expect_input_error([&] { sdt::gather(mask, torch::ones({4})); }, {"[2, 2]", "[4]"});
  expect_input_error([&] { sdt::scatter_rows(mask.to(torch::kFloat), torch::ones({3})); }, {"bool"});
  const torch::Tensor v = torch::tensor({1.0, 2.0, 3.0});
  EXPECT_TRUE(torch::equal(sdt::gather(mask, sdt::scatter_rows(mask, v)), v));
  // A_log: column-major over [D, N] = row-major over (state, channel).
  EXPECT_TRUE(torch::equal(sdt::scatter_a_log(mask, v), torch::tensor({1.0, 0.0, 2.0, 3.0}).reshape({2, 2})));
}
