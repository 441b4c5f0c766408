// Tests of adapter target resolution, the coverage table and parameter counts.
//
// Inventories are built by hand here, with the module names and roles of a
// Granite 4.0-H hybrid: a miniature one, and one with Granite-4.0-H-Micro's
// dimensions whose counts the seed study's logs give (PEFT's own output, an
// independent oracle). Every other expected number is worked out in comments.
#include "peftfw/adapters/targets.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "peftfw/error.hpp"

namespace peftfw::adapters {
namespace {

struct Dims {
  int64_t hidden, in_proj_out, conv_dim, conv_kernel, heads, inner, q, kv, mlp, vocab;
  std::vector<std::string> kinds;  // per layer: "mamba" or "attention"
  bool tied = true;
  int64_t experts = 0;  // > 0 adds a MoE block (router + 3D experts)
};

const char* kConvWhy = "depthwise conv1d: train it with [ssm] train = [\"conv1d\"]";
const char* kExpertsWhy = "3D expert weights are not linear modules";
const char* kNormWhy = "norm weights are vectors";

class Builder {
 public:
  ModelInventory inv;

  void linear(const std::string& name, const std::string& kind, int layer, const std::string& role,
              int64_t in, int64_t out) {
    add(name, "linear", kind, layer, role, true, "", in, out);
    param(name + ".weight", {out, in}, name, kind, layer);
  }
  void fixed(const std::string& name, const std::string& type, const std::string& kind, int layer,
             const std::string& role, const std::string& why) {
    add(name, type, kind, layer, role, false, why, 0, 0);
  }
  void norm(const std::string& name, int64_t dim, const std::string& kind, int layer,
            const std::string& role) {
    fixed(name, "norm", kind, layer, role, kNormWhy);
    param(name + ".weight", {dim}, name, kind, layer);
  }
  void param(const std::string& name, std::vector<int64_t> shape, const std::string& module,
             const std::string& kind, int layer, const std::string& group = "") {
    ParamDesc p;
    p.name = name;
    p.shape = std::move(shape);
    p.module = module;
    p.layer_kind = kind;
    p.layer = layer;
    p.ssm_group = group;
    inv.params.push_back(p);
  }

 private:
  void add(const std::string& name, const std::string& type, const std::string& kind, int layer,
           const std::string& role, bool adaptable, const std::string& why, int64_t in,
           int64_t out) {
    ModuleDesc m;
    m.name = name;
    m.type = type;
    m.layer_kind = kind;
    m.role = role;
    m.layer = layer;
    // The architecture gives the name relative to the layer; here: after "model.layers.<i>.".
    const std::string prefix = "model.layers." + std::to_string(layer) + ".";
    if (layer >= 0 && name.rfind(prefix, 0) == 0) m.local_name = name.substr(prefix.size());
    m.in_features = in;
    m.out_features = out;
    m.adaptable = adaptable;
    m.not_adaptable_why = why;
    inv.modules.push_back(m);
  }
};

// The Granite hybrid's modules, in checkpoint order.
ModelInventory build(const Dims& d) {
  Builder b;
  const int64_t H = d.hidden;
  b.inv.architecture = "test_hybrid";
  b.fixed("model.embed_tokens", "embedding", "", -1, "embedding", "embeddings are not supported");
  b.param("model.embed_tokens.weight", {d.vocab, H}, "model.embed_tokens", "", -1);
  for (int i = 0; i < static_cast<int>(d.kinds.size()); ++i) {
    const auto& kind = d.kinds[static_cast<size_t>(i)];
    b.inv.layer_kinds.push_back(kind);
    const auto p = "model.layers." + std::to_string(i) + ".";
    b.norm(p + "input_layernorm", H, kind, i, "norm.input");
    if (kind == "mamba") {
      const auto m = p + "mamba.";
      b.linear(m + "in_proj", kind, i, "mamba.in_proj", H, d.in_proj_out);
      b.fixed(m + "conv1d", "conv1d", kind, i, "mamba.conv1d", kConvWhy);
      b.param(m + "conv1d.weight", {d.conv_dim, 1, d.conv_kernel}, m + "conv1d", kind, i, "conv1d");
      b.param(m + "conv1d.bias", {d.conv_dim}, m + "conv1d", kind, i, "conv1d");
      b.param(m + "dt_bias", {d.heads}, p + "mamba", kind, i, "dt_bias");
      b.param(m + "A_log", {d.heads}, p + "mamba", kind, i, "A_log");
      b.param(m + "D", {d.heads}, p + "mamba", kind, i, "D");
      b.norm(m + "norm", d.inner, kind, i, "mamba.norm");
      b.linear(m + "out_proj", kind, i, "mamba.out_proj", d.inner, H);
    } else {
      const auto a = p + "self_attn.";
      b.linear(a + "q_proj", kind, i, "attention.q", H, d.q);
      b.linear(a + "k_proj", kind, i, "attention.k", H, d.kv);
      b.linear(a + "v_proj", kind, i, "attention.v", H, d.kv);
      b.linear(a + "o_proj", kind, i, "attention.o", d.q, H);
    }
    b.norm(p + "post_attention_layernorm", H, kind, i, "norm.post");
    if (d.experts > 0) {
      const auto e = p + "block_sparse_moe.";
      b.linear(e + "router.layer", kind, i, "moe.router", H, d.experts);
      b.fixed(e + "input_linear", "experts", kind, i, "moe.experts.input", kExpertsWhy);
      b.param(e + "input_linear.weight", {d.experts, 2 * d.mlp, H}, e + "input_linear", kind, i);
      b.fixed(e + "output_linear", "experts", kind, i, "moe.experts.output", kExpertsWhy);
      b.param(e + "output_linear.weight", {d.experts, H, d.mlp}, e + "output_linear", kind, i);
    }
    b.linear(p + "shared_mlp.input_linear", kind, i, "mlp.input", H, 2 * d.mlp);
    b.linear(p + "shared_mlp.output_linear", kind, i, "mlp.output", d.mlp, H);
  }
  b.norm("model.norm", H, "", -1, "norm.final");
  if (!d.tied) b.linear("lm_head", "", -1, "lm_head", H, d.vocab);
  b.inv.ssm_groups = {
      {"A_log", "", false}, {"D", "", false}, {"dt_bias", "", false}, {"conv1d", "", true}};
  return b.inv;
}

// Layers 0, 1, 3 are Mamba, layer 2 attention. H 16, in_proj 16 -> 40,
// out_proj 16 -> 16, q/o 16x16, k/v 16 -> 8, shared MLP 16 -> 64 and 32 -> 16,
// vocab 50, 2 SSM heads, conv 24 channels x 4 taps.
//
// Base parameters:
//   embedding 50*16 = 800; final norm 16
//   Mamba layer: norms 16+16, in_proj 640, conv 96+24, dt_bias/A_log/D 2+2+2,
//     mamba.norm 16, out_proj 256, MLP 1024+512 = 2606 (x3 = 7818)
//   attention layer: norms 32, q 256, k 128, v 128, o 256, MLP 1536 = 2336
//   total 800 + 7818 + 2336 + 16 = 10970 (tied); + lm_head 800 untied = 11770
// LoRA r=2, r*(in+out): in_proj 2*56 = 112, out_proj 2*32 = 64, q/o 2*32 = 64,
//   k/v 2*24 = 48, input_linear 2*80 = 160, output_linear 2*48 = 96,
//   lm_head 2*66 = 132, router (4 experts) 2*20 = 40.
Dims mini() {
  return Dims{16, 40, 24, 4, 2, 16, 16, 8, 32, 50, {"mamba", "mamba", "attention", "mamba"}};
}

// Granite-4.0-H-Micro's dimensions (seed study §6): 40 layers, attention at 5, 15, 25, 35.
Dims micro() {
  Dims d{2048, 8512, 4352, 4, 64, 4096, 2048, 512, 8192, 100352, {}};
  for (int i = 0; i < 40; ++i) d.kinds.push_back(i % 10 == 5 ? "attention" : "mamba");
  return d;
}

const std::vector<std::string> kV1 = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                      "gate_proj", "up_proj", "down_proj"};
const std::vector<std::string> kV2 = {"q_proj",  "k_proj",   "v_proj",       "o_proj",
                                      "in_proj", "out_proj", "input_linear", "output_linear"};

recipe::TargetPattern names(std::vector<std::string> n) {
  recipe::TargetPattern p;
  p.names = std::move(n);
  return p;
}

recipe::TargetPattern regex(std::string r) {
  recipe::TargetPattern p;
  p.is_regex = true;
  p.regex = std::move(r);
  return p;
}

TargetRequest request(std::optional<recipe::TargetPattern> targets,
                      std::string on_unmatched = "error") {
  TargetRequest req;
  req.target_modules = std::move(targets);
  req.on_unmatched = std::move(on_unmatched);
  req.source = "recipes/test.toml [adapter]";
  return req;
}

// The InputError message of `fn`, failing the test if none is thrown.
template <typename Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const InputError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an InputError";
  return "";
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

int count_with(const std::vector<std::string>& modules, const std::string& part) {
  return static_cast<int>(std::count_if(modules.begin(), modules.end(),
                                        [&](const auto& m) { return contains(m, part); }));
}

TEST(ResolveTargets, ListEntryNeedsDotBoundary) {
  auto inv = build(mini());
  // "proj" is neither a full name nor a '.'-bounded suffix of "q_proj".
  auto res = resolve_targets(inv, request(names({"proj", "in_proj"}), "ignore"));
  EXPECT_EQ(res.modules, (std::vector<std::string>{"model.layers.0.mamba.in_proj",
                                                   "model.layers.1.mamba.in_proj",
                                                   "model.layers.3.mamba.in_proj"}));
  EXPECT_TRUE(res.warnings.empty());
  auto msg = error_of([&] { resolve_targets(inv, request(names({"proj", "in_proj"}))); });
  EXPECT_TRUE(contains(msg, "recipes/test.toml [adapter]")) << msg;
  EXPECT_TRUE(contains(msg, "entry \"proj\" matches no module")) << msg;
  EXPECT_TRUE(contains(msg,
                       "(\"in_proj\" and \"mamba.in_proj\" match "
                       "model.layers.0.mamba.in_proj; \"proj\" does not)"))
      << msg;
}

TEST(ResolveTargets, FullNamesAndDottedSuffixes) {
  auto inv = build(mini());
  auto res = resolve_targets(
      inv, request(names({"model.layers.2.self_attn.q_proj", "layers.0.mamba.in_proj",
                          "shared_mlp.output_linear", "q_proj"}),
                   "warn"));
  // Inventory order, each module once (q_proj is named twice).
  EXPECT_EQ(
      res.modules,
      (std::vector<std::string>{
          "model.layers.0.mamba.in_proj", "model.layers.0.shared_mlp.output_linear",
          "model.layers.1.shared_mlp.output_linear", "model.layers.2.self_attn.q_proj",
          "model.layers.2.shared_mlp.output_linear", "model.layers.3.shared_mlp.output_linear"}));
  EXPECT_TRUE(res.warnings.empty());
}

TEST(ResolveTargets, RegexMustMatchTheWholeName) {
  auto inv = build(mini());
  auto res = resolve_targets(
      inv, request(regex(R"(model\.layers\.\d+\.(mamba\.in_proj|self_attn\.q_proj))")));
  EXPECT_EQ(res.modules.size(), 4u);  // 3 in_proj + 1 q_proj: every kind covered
  EXPECT_EQ(count_with(res.modules, "in_proj"), 3);

  // "in_proj" alone is a partial match, which PEFT's re.fullmatch rejects.
  auto msg = error_of([&] { resolve_targets(inv, request(regex("in_proj"), "ignore")); });
  EXPECT_TRUE(contains(msg, "regex \"in_proj\" matches no module name")) << msg;
  EXPECT_TRUE(contains(msg, R"(e.g. target_modules = 'model\.layers\.\d+\.mamba\.in_proj' or )"
                            R"('.*\.in_proj'; a plain name needs the list form, ["in_proj"])"))
      << msg;
  EXPECT_TRUE(contains(msg, "no module is selected")) << msg;

  msg = error_of([&] { resolve_targets(inv, request(regex("(unclosed"), "ignore")); });
  EXPECT_TRUE(contains(msg, "not a valid ECMAScript regex")) << msg;
}

TEST(ResolveTargets, AllLinearSkipsTheHeadAndTakesTheRouter) {
  auto d = mini();
  d.tied = false;
  d.experts = 4;
  auto inv = build(d);
  auto res = resolve_targets(inv, request(regex("all-linear")));
  // Per Mamba layer: in_proj, out_proj, router, 2 shared MLP = 5 (x3);
  // attention: q, k, v, o, router, 2 shared MLP = 7. 22 in all; no lm_head, no experts.
  EXPECT_EQ(res.modules.size(), 22u);
  EXPECT_EQ(count_with(res.modules, "router.layer"), 4);
  EXPECT_EQ(count_with(res.modules, "lm_head"), 0);
  EXPECT_EQ(count_with(res.modules, "block_sparse_moe.input_linear"), 0);
  EXPECT_EQ(count_with(res.modules, "conv1d"), 0);
}

TEST(ResolveTargets, ExcludeModules) {
  auto inv = build(mini());
  auto req = request(regex("all-linear"));
  req.exclude_modules = names({"out_proj", "self_attn.k_proj"});
  auto res = resolve_targets(inv, req);
  // Linear modules: Mamba 3 x 4 = 12, attention 6; 18 minus 3 out_proj and 1 k_proj = 14.
  EXPECT_EQ(res.modules.size(), 14u);
  EXPECT_EQ(count_with(res.modules, "out_proj"), 0);
  EXPECT_EQ(count_with(res.modules, "k_proj"), 0);

  req.exclude_modules = regex(R"(.*\.shared_mlp\..*)");
  EXPECT_EQ(resolve_targets(inv, req).modules.size(), 10u);  // 18 - 4 x 2

  // An exclude entry that matches nothing is a problem too (a typo there would go unnoticed).
  req.exclude_modules = names({"out_prj"});
  auto msg = error_of([&] { resolve_targets(inv, req); });
  EXPECT_TRUE(contains(msg, "exclude_modules: entry \"out_prj\" matches no module")) << msg;
  EXPECT_TRUE(contains(msg, "did you mean \"mamba.out_proj\"")) << msg;

  // Excluding everything selected leaves nothing: always an error.
  auto all = request(names({"q_proj"}), "ignore");
  all.exclude_modules = names({"self_attn.q_proj"});
  msg = error_of([&] { resolve_targets(inv, all); });
  EXPECT_TRUE(
      contains(msg, "exclude_modules removes every module that target_modules / roles select (1)"))
      << msg;
}

TEST(ResolveTargets, ExcludingANonAdaptableMatchIsFine) {
  auto inv = build(mini());
  auto req = request(regex(R"(.*\.mamba\..*)"), "ignore");
  req.exclude_modules = names({"conv1d", "mamba.norm"});
  auto res = resolve_targets(inv, req);
  EXPECT_EQ(res.modules.size(), 6u);  // in_proj + out_proj in 3 layers
}

TEST(ResolveTargets, Roles) {
  auto inv = build(mini());
  TargetRequest req = request(std::nullopt, "warn");
  req.roles = {"mamba"};
  auto res = resolve_targets(inv, req);
  // "mamba" covers mamba.in_proj / mamba.out_proj; mamba.conv1d and
  // mamba.norm are not adaptable and are skipped by the prefix.
  EXPECT_EQ(res.modules.size(), 6u);
  EXPECT_EQ(count_with(res.modules, "conv1d"), 0);
  ASSERT_EQ(res.warnings.size(), 1u);
  EXPECT_TRUE(contains(res.warnings[0], "no module of the 1 attention layer is adapted"))
      << res.warnings[0];

  // Exact roles and a prefix, united with target_modules.
  req = request(names({"out_proj"}));
  req.roles = {"attention.q", "mlp"};
  res = resolve_targets(inv, req);
  EXPECT_EQ(res.modules.size(), 12u);  // 3 out_proj + 1 q_proj + 4 x 2 shared MLP
  EXPECT_EQ(count_with(res.modules, "k_proj"), 0);
  EXPECT_EQ(res.modules.front(), "model.layers.0.mamba.out_proj");

  // A misspelt role is reported with the close one, beside the kind it leaves bare.
  req = request(std::nullopt);
  req.roles = {"attention.q", "mamba.inproj"};
  auto msg = error_of([&] { resolve_targets(inv, req); });
  EXPECT_TRUE(contains(msg, "roles entry \"mamba.inproj\" matches no module role")) << msg;
  EXPECT_TRUE(contains(msg, "did you mean \"mamba.in_proj\"")) << msg;
  EXPECT_TRUE(contains(msg, "no module of the 3 mamba layers is adapted")) << msg;

  // A role naming only modules that cannot be adapted is always an error.
  req = request(names({"in_proj", "q_proj"}), "ignore");
  req.roles = {"mamba.conv1d"};
  msg = error_of([&] { resolve_targets(inv, req); });
  EXPECT_TRUE(
      contains(msg, "roles entry \"mamba.conv1d\" matches only modules that cannot be adapted"))
      << msg;
  EXPECT_TRUE(contains(msg, kConvWhy)) << msg;
}

TEST(ResolveTargets, NothingRequested) {
  auto inv = build(mini());
  for (auto targets : {std::optional<recipe::TargetPattern>{}, std::optional(names({}))}) {
    auto msg = error_of([&] { resolve_targets(inv, request(targets)); });
    EXPECT_TRUE(contains(msg, "target_modules")) << msg;
    EXPECT_TRUE(contains(msg, "roles")) << msg;
    // Examples built from this model's names.
    EXPECT_TRUE(contains(msg,
                         "  target_modules = [\"mamba.in_proj\", \"mamba.out_proj\", "
                         "\"self_attn.k_proj\""))
        << msg;
    EXPECT_TRUE(contains(msg, "  roles = [\"attention\", \"mamba\", \"mlp\"]\n")) << msg;
  }
  auto msg = error_of([&] { resolve_targets(inv, request(names(kV2), "loud")); });
  EXPECT_TRUE(contains(msg, "on_unmatched = \"loud\"")) << msg;
}

// The seed study's V1 run: Transformer targets on a hybrid.
TEST(ResolveTargets, TransformerTargetsWarnAndAdaptOnlyAttention) {
  auto inv = build(mini());
  auto res = resolve_targets(inv, request(names(kV1), "warn"));
  EXPECT_EQ(res.modules,
            (std::vector<std::string>{
                "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.k_proj",
                "model.layers.2.self_attn.v_proj", "model.layers.2.self_attn.o_proj"}));
  ASSERT_EQ(res.warnings.size(), 2u);
  EXPECT_TRUE(contains(res.warnings[0], "\"gate_proj\", \"up_proj\", \"down_proj\""))
      << res.warnings[0];
  EXPECT_TRUE(contains(res.warnings[1], "no module of the 3 mamba layers is adapted"))
      << res.warnings[1];

  EXPECT_TRUE(resolve_targets(inv, request(names(kV1), "ignore")).warnings.empty());
}

TEST(ResolveTargets, TransformerTargetsFailWithEveryProblemInOneMessage) {
  auto inv = build(mini());
  auto msg = error_of([&] { resolve_targets(inv, request(names(kV1))); });
  EXPECT_TRUE(contains(msg,
                       "recipes/test.toml [adapter]: cannot resolve the adapter's target "
                       "modules (2 problems)"))
      << msg;
  EXPECT_TRUE(contains(msg,
                       "target_modules: 3 entries \"gate_proj\", \"up_proj\", \"down_proj\" "
                       "match no module"))
      << msg;
  // What the MLP is called here, found by role.
  EXPECT_TRUE(contains(msg,
                       "the MLP modules here are shared_mlp.input_linear, "
                       "shared_mlp.output_linear"))
      << msg;
  EXPECT_TRUE(contains(msg,
                       "no module of the 3 mamba layers is adapted; the adaptable modules "
                       "there are mamba.in_proj, mamba.out_proj, shared_mlp.input_linear, "
                       "shared_mlp.output_linear; add them to target_modules, or set "
                       "on_unmatched = \"warn\""))
      << msg;
  // The names that exist, relative to a layer, sorted.
  EXPECT_TRUE(contains(msg,
                       "mamba.in_proj, mamba.out_proj, self_attn.k_proj, self_attn.o_proj, "
                       "self_attn.q_proj, self_attn.v_proj, shared_mlp.input_linear, "
                       "shared_mlp.output_linear."))
      << msg;
  EXPECT_TRUE(contains(msg, "mamba.conv1d")) << msg;  // listed as not adaptable
}

TEST(ResolveTargets, Conv1dIsRefusedEvenWhenIgnoring) {
  auto inv = build(mini());
  auto msg = error_of(
      [&] { resolve_targets(inv, request(names({"in_proj", "q_proj", "conv1d"}), "ignore")); });
  EXPECT_TRUE(contains(msg,
                       "target_modules entry \"conv1d\" selects mamba.conv1d (3 modules, "
                       "model.layers.0.mamba.conv1d ... model.layers.3.mamba.conv1d), which "
                       "cannot be adapted"))
      << msg;
  EXPECT_TRUE(contains(msg, kConvWhy)) << msg;
}

TEST(ResolveTargets, BareInputLinearHitsMoeExperts) {
  auto d = mini();
  d.experts = 4;
  auto inv = build(d);
  // As in PEFT, "input_linear" also matches block_sparse_moe.input_linear.
  auto msg = error_of([&] { resolve_targets(inv, request(names(kV2), "warn")); });
  EXPECT_TRUE(contains(msg, "selects block_sparse_moe.input_linear")) << msg;
  EXPECT_TRUE(contains(msg, kExpertsWhy)) << msg;
  EXPECT_TRUE(contains(msg, "name them fully: \"shared_mlp.input_linear\"")) << msg;
  EXPECT_TRUE(contains(msg, "selects block_sparse_moe.output_linear")) << msg;
}

TEST(ResolveTargets, DidYouMean) {
  auto inv = build(mini());
  auto msg = error_of([&] {
    resolve_targets(
        inv, request(names({"in_prj", "attn.q_proj", "self_attn.out_proj", "all-linear", "xyz"})));
  });
  EXPECT_TRUE(contains(msg, "\"in_prj\": did you mean \"mamba.in_proj\"?")) << msg;
  EXPECT_TRUE(contains(msg, "\"attn.q_proj\": did you mean \"self_attn.q_proj\"?")) << msg;
  // Same leaf under another parent, and a close spelling.
  EXPECT_TRUE(contains(msg,
                       "\"self_attn.out_proj\": did you mean \"mamba.out_proj\" or "
                       "\"self_attn.o_proj\"?"))
      << msg;
  EXPECT_TRUE(contains(msg, "works only as a string: target_modules = \"all-linear\"")) << msg;
  EXPECT_FALSE(contains(msg, "\"xyz\": ")) << msg;  // nothing close: no guess

  // Attention names on a model without attention.
  auto d = mini();
  d.kinds = {"mamba", "mamba"};
  msg = error_of([&] { resolve_targets(build(d), request(names({"q_proj", "in_proj"}))); });
  EXPECT_TRUE(contains(msg, "no adaptable attention module")) << msg;
}

TEST(CoverageTable, FullPartialAndMissing) {
  auto d = mini();
  d.tied = false;
  auto inv = build(d);
  auto v2 = resolve_targets(inv, request(names(kV2))).modules;
  auto table = coverage_table(inv, v2);
  EXPECT_TRUE(contains(table, "Adapter coverage: 18 modules adapted")) << table;
  EXPECT_TRUE(contains(table, "mamba       mamba.in_proj             3 / 3\n")) << table;
  EXPECT_TRUE(contains(table, "attention   shared_mlp.output_linear  1 / 1\n")) << table;
  EXPECT_TRUE(contains(table, "  mamba: 4 of 4 adaptable module types adapted in 3 of 3 layers\n"))
      << table;
  EXPECT_TRUE(
      contains(table, "  attention: 6 of 6 adaptable module types adapted in 1 of 1 layers\n"))
      << table;
  EXPECT_TRUE(contains(table, "outside     lm_head                   0 / 1  <- not adapted\n"))
      << table;
  EXPECT_FALSE(contains(table, "conv1d")) << table;

  auto v1 = resolve_targets(inv, request(names(kV1), "ignore")).modules;
  table = coverage_table(inv, v1);
  EXPECT_TRUE(contains(table, "mamba       mamba.in_proj             0 / 3  <- not adapted\n"))
      << table;
  EXPECT_TRUE(contains(table, "  mamba: 0 of 4 adaptable module types adapted in 0 of 3 layers\n"))
      << table;
  EXPECT_TRUE(
      contains(table, "  attention: 4 of 6 adaptable module types adapted in 1 of 1 layers\n"))
      << table;

  table = coverage_table(inv, {"model.layers.1.mamba.in_proj", "model.layers.2.self_attn.q_proj"});
  EXPECT_TRUE(contains(table, "mamba.in_proj             1 / 3  <- partly adapted\n")) << table;
  EXPECT_TRUE(contains(table, "  mamba: 1 of 4 adaptable module types adapted in 1 of 3 layers\n"))
      << table;

  auto msg = error_of([&] { coverage_table(inv, {"model.layers.0.mamba.conv1d", "nope"}); });
  EXPECT_TRUE(contains(msg, "\"nope\" is not a module")) << msg;
  EXPECT_TRUE(contains(msg, kConvWhy)) << msg;
}

// LoRA's count as arithmetic: r * (in + out) per module, DoRA + out.
CountRule lora_rule(int64_t r, bool dora) {
  CountRule rule;
  rule.name = dora ? "DoRA" : "LoRA";
  rule.settings = "r=" + std::to_string(r);
  rule.added_per_module = [=](const ModuleDesc& m) {
    return r * (m.in_features + m.out_features) + (dora ? m.out_features : 0);
  };
  return rule;
}

TEST(ParameterCount, LoraDoraAndSsmOnTheMiniature) {
  auto inv = build(mini());
  EXPECT_EQ(inv.total_params(), 10970);
  auto v2 = resolve_targets(inv, request(names(kV2))).modules;
  auto v1 = resolve_targets(inv, request(names(kV1), "ignore")).modules;

  // V2: Mamba layer 112 + 64 + 160 + 96 = 432 (x3 = 1296); attention 64 + 48 + 48 + 64 + 160 + 96
  // = 480; 1776 in all, 10970 + 1776 = 12746.
  auto c = count_parameters(inv, v2, lora_rule(2, false), {});
  EXPECT_EQ(c.trainable, 1776);
  EXPECT_EQ(c.all, 12746);
  // V1: attention projections only, 224; all 10970 + 224.
  c = count_parameters(inv, v1, lora_rule(2, false), {});
  EXPECT_EQ(c.trainable, 224);
  EXPECT_EQ(c.all, 11194);
  // SSM core groups: 3 Mamba layers x 3 tensors x 2 heads = 18, already in "all".
  c = count_parameters(inv, v2, lora_rule(2, false), {"A_log", "D", "dt_bias"});
  EXPECT_EQ(c.trainable, 1794);
  EXPECT_EQ(c.all, 12746);
  // conv1d group: 3 x (96 + 24) = 360.
  EXPECT_EQ(count_parameters(inv, v2, lora_rule(2, false), {"conv1d"}).trainable, 1776 + 360);
  // DoRA adds each module's out features: Mamba 40 + 16 + 64 + 16 = 136 (x3 = 408);
  // attention 16 + 8 + 8 + 16 + 64 + 16 = 128; 536 more, in both counts.
  c = count_parameters(inv, v2, lora_rule(2, true), {});
  EXPECT_EQ(c.trainable, 2312);
  EXPECT_EQ(c.all, 13282);

  auto msg = error_of([&] { count_parameters(inv, v2, lora_rule(2, false), {"A", "D"}); });
  EXPECT_TRUE(contains(msg, "unknown SSM parameter group \"A\"")) << msg;
  EXPECT_TRUE(contains(msg, "\"A_log\"")) << msg;
  msg = error_of([&] { count_parameters(inv, {v2[0], v2[0]}, lora_rule(2, false), {}); });
  EXPECT_TRUE(contains(msg, "listed twice")) << msg;
  // BitFit-like: base tensors trained, counted once even when also in a trained SSM group.
  CountRule base;
  base.name = "base";
  for (const auto& p : inv.params)
    if (p.ssm_group == "D" || p.ssm_group == "A_log") base.base_params.push_back(p.name);
  c = count_parameters(inv, {}, base, {"A_log", "D", "dt_bias"});
  EXPECT_EQ(c.trainable, 18);  // 3 layers x 3 tensors x 2 heads, the A_log/D ones not twice
  EXPECT_EQ(c.all, 10970);
  c = count_parameters(inv, {}, base, {});
  EXPECT_EQ(c.trainable, 12);
}

TEST(ParameterReport, PerKindAndPeftLine) {
  auto inv = build(mini());
  auto v2 = resolve_targets(inv, request(names(kV2))).modules;
  auto report = parameter_report(inv, v2, lora_rule(2, false), {"A_log", "D", "dt_bias"});
  // 100 * 1794 / 12746 = 14.07500... (Python: f"{100 * 1794 / 12746:.4f}" == "14.0750").
  EXPECT_TRUE(
      contains(report, "trainable params: 1,794 || all params: 12,746 || trainable%: 14.0750\n"))
      << report;
  // Mamba: 1296 LoRA + 18 SSM = 1314 over 12 modules; attention: 480 over 6.
  EXPECT_TRUE(contains(
      report, "  mamba            3               12        1,296          18      1,314\n"))
      << report;
  EXPECT_TRUE(contains(
      report, "  attention        1                6          480           0        480\n"))
      << report;
  EXPECT_TRUE(contains(
      report, "  total            4               18        1,776          18      1,794\n"))
      << report;
  EXPECT_FALSE(contains(report, "outside")) << report;  // nothing trained outside the layers
}

TEST(ParameterReport, PeftLineDigits) {
  // The seed study's logs (PEFT 0.18.1 print_trainable_parameters output).
  EXPECT_EQ(peft_parameter_line({28823552, 3220219648}),
            "trainable params: 28,823,552 || all params: 3,220,219,648 || trainable%: 0.8951");
  EXPECT_EQ(peft_parameter_line({851968, 3192248064}),
            "trainable params: 851,968 || all params: 3,192,248,064 || trainable%: 0.0267");
  EXPECT_EQ(peft_parameter_line({28830464, 3220219648}),
            "trainable params: 28,830,464 || all params: 3,220,219,648 || trainable%: 0.8953");
}

// Granite-4.0-H-Micro's shapes against the seed study's PEFT logs.
TEST(ParameterCount, GraniteMicroShapesMatchThePeftLogs) {
  auto inv = build(micro());
  EXPECT_EQ(inv.total_params(), 3191396096);

  auto v1 = resolve_targets(inv, request(names(kV1), "warn"));
  EXPECT_EQ(v1.modules.size(), 16u);
  auto c = count_parameters(inv, v1.modules, lora_rule(16, false), {});
  EXPECT_EQ(c.trainable, 851968);
  EXPECT_EQ(c.all, 3192248064);

  auto v2 = resolve_targets(inv, request(names(kV2)));
  EXPECT_EQ(v2.modules.size(), 168u);
  EXPECT_TRUE(v2.warnings.empty());
  auto report = parameter_report(inv, v2.modules, lora_rule(16, false), {});
  EXPECT_TRUE(contains(report,
                       "trainable params: 28,823,552 || all params: 3,220,219,648 || "
                       "trainable%: 0.8951\n"))
      << report;
  c = count_parameters(inv, v2.modules, lora_rule(16, false), {"A_log", "D", "dt_bias"});
  EXPECT_EQ(c.trainable, 28830464);
  EXPECT_EQ(c.all, 3220219648);

  auto table = coverage_table(inv, v1.modules);
  EXPECT_TRUE(contains(table, "0 / 36  <- not adapted")) << table;
  EXPECT_TRUE(contains(table, "mamba: 0 of 4 adaptable module types adapted in 0 of 36 layers"))
      << table;
}

}  // namespace
}  // namespace peftfw::adapters
