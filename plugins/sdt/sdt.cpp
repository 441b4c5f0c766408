// Adapter plugin "sdt": Sparse Dimension Tuning with LoRA (SDT / SDLoRA; Galim et al., ICML 2025),
// as furiosa-ai/ssm-peft implements it on Mamba-1 (../shared/reference/sdlora_study.md), and
// peftfw's extension to Mamba-2 mixers (docs/methods.md).
//
// Two phases in one `peftfw run`:
// 1. Warm-up (AdapterPlugin::warmup_steps): a dense delta of A_log (zero-initialised) trains with
//    LoRA on the target modules. end_warmup() keeps each mixer's delta (the reference's pickled
//    sdlora_grad); the trainer stores it in the run folder and restarts from the base model.
// 2. Training: per mixer, the delta ranks the dimensions (selection.hpp) and only the selected ones
//    train, as flat vectors scattered into zero deltas on every forward (build_train_param):
//    - Mamba-1 (A_log [channel, state]): the selected channels x their selected states of A_log,
//      and, with train_bc, x_proj's B and C weights in the selected channels' columns (all states);
//    - Mamba-2 (A_log [head]): heads are the channels, A_log, D and dt_bias of the selected heads.
//    LoRA (re-initialised) trains on the target modules alongside, through the "lora" plugin.
// Adapter folders store dense deltas (the scattered vectors times alpha), which merged folds exactly.
#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <optional>
#include <sstream>

#include "peftfw/adapters/setup.hpp"
#include "peftfw/blocks/ssm_slots.hpp"
#include "peftfw/error.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/model/inventory.hpp"
#include "peftfw/nn/linear.hpp"
#include "peftfw/plugin/adapter.hpp"
#include "peftfw/plugin/registrar.hpp"
#include "peftfw/plugin/registry.hpp"
#include "selection.hpp"

namespace peftfw::sdt {
namespace {

constexpr char kMethod[] = "sdt";
constexpr char kWarmupDelta[] = "warmup_delta_A_log";  // spec.state key suffix: "<mixer>.warmup_delta_A_log"

struct Settings {
  int64_t warmup_steps;
  Budget channel, state;
  double alpha;
  bool train_bc;
};

Settings settings(const AdapterSpec& spec) {
  Settings s;
  s.warmup_steps = spec.integer("sdt.warmup_iters");
  s.channel = {spec.real("sdt.channel_freeze"), spec.real("sdt.channel_zero")};
  s.state = {spec.real("sdt.state_freeze"), spec.real("sdt.state_zero")};
  s.alpha = spec.real("sdt.alpha");
  s.train_bc = spec.flag("sdt.train_bc");
  return s;
}

AdapterSpec lora_spec(const AdapterSpec& spec) {
  auto l = adapter_spec("lora", {{"r", spec.integer("sdt.lora_r")},
                                 {"alpha", spec.real("sdt.lora_alpha")},
                                 {"dropout", spec.real("sdt.lora_dropout")}});
  l.seed = spec.seed;
  return l;
}

// The mixer's kind from its A_log axes (what the architecture states, through the inventory).
bool is_mamba1(const std::vector<std::string>& axes) { return axes.size() == 2 && axes[0] == "channel"; }

// Mamba-1: A_log' = A_log (zeroed channels filled) + alpha * scatter(selection), through the slot;
// x_proj's B/C rows get + alpha * scatter(bc_mask, .) through its LinearAdapter.
// Mamba-2: A_log, D and dt_bias of the selected heads + alpha * value.
// Dense mode (warm-up, or loading a folder): base + the dense delta.
class SsmDeltas final : public blocks::SsmParameterAdapter {
 public:
  std::map<std::string, torch::Tensor> dense;   // group -> dense delta (warm-up, loading)
  std::map<std::string, torch::Tensor> sparse;  // group -> flat trained vector
  std::shared_ptr<LayerSelection> selection;    // for the sparse vectors
  bool mamba1 = true;
  double alpha = 1.0;

  torch::Tensor effective(const std::string& group, const torch::Tensor& base) const override {
    if (auto it = dense.find(group); it != dense.end()) return base + it->second.to(base.scalar_type());
    auto it = sparse.find(group);
    if (it == sparse.end()) {
      // Zeroed channels (SDT-P) of A_log even when no entry of it trains.
      if (group == "A_log" && selection && selection->a_zero_mask.any().item<bool>())
        return torch::where(selection->a_zero_mask.to(base.device()).view(base.sizes()),
                            torch::full_like(base, kZeroFillValue), base);
      return base;
    }
    if (mamba1) return apply_a_log(base, *selection, it->second, alpha);
    // Mamba-2: one value per selected head.
    auto channels = torch::tensor(selection->channels, torch::TensorOptions().dtype(torch::kLong).device(base.device()));
    auto out = base.index_add(0, channels, (alpha * it->second).to(base.scalar_type()));
    if (group == "A_log" && selection->a_zero_mask.any().item<bool>())
      out = torch::where(selection->a_zero_mask.to(base.device()).view(base.sizes()), torch::full_like(base, kZeroFillValue), out);
    return out;
  }
};

// x_proj = [dt | B | C] rows: a delta on the B and C rows.
class BcDelta final : public nn::LinearAdapter {
 public:
  int64_t dt_rank = 0;
  torch::Tensor dense;       // [2N, D_inner] (loading)
  torch::Tensor b, c;        // flat [N * channels] (training)
  torch::Tensor bc_mask;     // bool [N, D_inner]
  double alpha = 1.0;

  torch::Tensor delta(const nn::LinearImpl& base) const {
    torch::Tensor rows = dense.defined()
                             ? dense
                             : torch::cat({scatter_rows(bc_mask.to(b.device()), b), scatter_rows(bc_mask.to(c.device()), c)}) * alpha;
    auto zeros = torch::zeros({dt_rank, base.in_features()}, rows.options());
    return torch::cat({zeros, rows});  // [R + 2N, D_inner]
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& base_out, const nn::LinearImpl& base) override {
    auto d = delta(base);
    return base_out + torch::matmul(x, d.t().to(x.scalar_type())).to(base_out.scalar_type());
  }
  torch::Tensor merged_weight(const nn::LinearImpl& base) const override {
    return (base.weight.to(torch::kFloat32) + delta(base).to(torch::kFloat32)).to(base.weight.scalar_type());
  }
};

struct MixerInfo {
  std::string name;
  blocks::SsmMixer* mixer;
  torch::nn::Module* module;
  torch::Tensor a_log;  // the base parameter
  bool mamba1;
};

std::vector<MixerInfo> mixers(CausalLM& model) {
  std::vector<MixerInfo> out;
  for (const auto& m : blocks::named_ssm_mixers(model)) {
    auto own = m.module->named_parameters(/*recurse=*/false);
    auto* a = own.find("A_log");
    if (!a) throw RuntimeError("sdt: mixer " + m.name + " has no A_log parameter");
    out.push_back({m.name, m.mixer, m.module, *a, is_mamba1(m.mixer->axes_of("A_log"))});
  }
  if (out.empty())
    throw InputError("[adapter] method = \"sdt\": this model has no SSM mixer, so there is no dimension to "
                     "select; use \"lora\" for an attention-only model");
  return out;
}

// The selection of one mixer from its warm-up delta (A_log's shape).
LayerSelection select_for(const torch::Tensor& delta, bool mamba1, const Settings& s, const std::string& mixer) {
  try {
    if (mamba1) return select(delta, s.channel, s.state);
    return select(delta.reshape({-1, 1}), s.channel, Budget{int64_t{0}, int64_t{0}});  // heads x one "state"
  } catch (const InputError& e) {
    throw InputError("sdt: " + mixer + ": " + e.what());
  }
}

torch::Tensor zeros_param(torch::nn::Module& module, const std::string& name, std::vector<int64_t> shape,
                          const torch::Device& device) {
  return module.register_parameter(name, torch::zeros(shape, torch::TensorOptions().dtype(torch::kFloat32).device(device)));
}

torch::Tensor frozen(torch::nn::Module& module, const std::string& name, std::vector<int64_t> shape,
                     const torch::Device& device) {
  return module.register_parameter(name, torch::zeros(shape, torch::TensorOptions().dtype(torch::kFloat32).device(device)),
                                   /*requires_grad=*/false);
}

class SdtPlugin final : public AdapterPlugin {
 public:
  std::string id() const override { return kMethod; }
  std::vector<AdapterMethod> methods() const override {
    return {{kMethod,
             "Sparse Dimension Tuning (SDT/SDLoRA): a warm-up ranks SSM channels and states by how far "
             "A_log moves, then only the top ones train, with LoRA on the target modules.",
             AdapterAttach::kModules, false}};
  }

  std::vector<recipe::SectionSpec> recipe_sections() const override {
    using namespace recipe::keys;
    // clang-format off
    return {{"sdt", "Sparse Dimension Tuning (method = \"sdt\"); defaults are ssm-peft's shipped configs.", {
      integer("warmup_iters", 500, "Warm-up optimizer steps with a dense A_log delta and LoRA before the dimensions are selected (the reference's num_warmup_it + 1).").at_least(1),
      real   ("channel_freeze", 0.99, "Fraction of channels (Mamba-2: heads) frozen: round(f x channels) of the least changed.").between(0, 1),
      real   ("state_freeze", 0.75, "Fraction of states frozen per selected channel (Mamba-1 A_log).").between(0, 1),
      real   ("channel_zero", 0.0, "Fraction of channels pruned (A_log set to 10: state erased each step; SDT-P).").between(0, 1),
      real   ("state_zero", 0.0, "Fraction of states left untrained beyond the frozen ones (the reference never zeroes a state).").between(0, 1),
      real   ("alpha", 1.0, "Scale of the sparse deltas (the reference's sdlora_alpha)."),
      flag   ("train_bc", true, "Mamba-1: also train x_proj's B and C weights in the selected channels' columns."),
      integer("lora_r", 8, "Rank of the LoRA on the target modules (the reference's proj_lora_r).").at_least(1).at_most(65536),
      real   ("lora_alpha", 8.0, "LoRA scale numerator: scale = lora_alpha / lora_r."),
      real   ("lora_dropout", 0.1, "Dropout on the LoRA input while training.").between(0, 1),
    }}};
    // clang-format on
  }

  AdapterLabel label(const AdapterSpec& spec) const override {
    const auto s = settings(spec);
    std::ostringstream o;
    o << "channels d" << std::get<double>(s.channel.freeze) << ", states n" << std::get<double>(s.state.freeze)
      << ", warm-up " << s.warmup_steps << " steps, LoRA r=" << spec.integer("sdt.lora_r");
    return {"SDT", o.str()};
  }

  std::optional<AdapterSpec> module_adapter_spec(const AdapterSpec& spec) const override { return lora_spec(spec); }

  int64_t added_parameters(const AdapterSpec& spec, const ModuleDesc& module) const override {
    return PluginRegistry::instance().adapter_for_method("lora")->added_parameters(lora_spec(spec), module);
  }

  // The trained tensors after the warm-up: the budgets' arithmetic per mixer.
  std::vector<ParamDesc> added_tensors(const AdapterSpec& spec, const ModelInventory& inv) const override {
    const auto s = settings(spec);
    std::vector<ParamDesc> out;
    for (const auto& st : inv.ssm_states) {
      const ParamDesc* a = nullptr;
      for (const auto& p : inv.params)
        if (p.name == st.module + ".A_log") a = &p;
      if (!a) continue;
      auto add = [&](const std::string& leaf, int64_t n) {
        ParamDesc p;
        p.name = st.module + "." + leaf;
        p.shape = {n};
        p.module = st.module;
        p.layer = st.layer;
        p.layer_kind = st.layer_kind;
        out.push_back(p);
      };
      // A budget that leaves nothing to train is refused here, before any warm-up.
      auto none_left = [&](int64_t size, const char* what, const char* key) {
        return InputError("[sdt] " + std::string(key) + " leaves no " + what + " of " + st.module + "'s " +
                          std::to_string(size) + " to train (the frozen share rounds to all of them); lower it");
      };
      if (is_mamba1(a->axes)) {
        const int64_t D = a->shape[0], N = a->shape[1];
        const int64_t ch = trainable_count(D, s.channel, "channel"), stt = trainable_count(N, s.state, "state");
        if (ch == 0) throw none_left(D, "channel", "channel_freeze + channel_zero");
        if (stt == 0) throw none_left(N, "state", "state_freeze + state_zero");
        add("sdt_A_log", ch * stt);
        if (s.train_bc) {
          add("sdt_B", N * ch);
          add("sdt_C", N * ch);
        }
      } else {
        const int64_t ch = trainable_count(a->shape[0], s.channel, "head");
        if (ch == 0) throw none_left(a->shape[0], "head", "channel_freeze + channel_zero");
        for (const char* g : {"sdt_A_log", "sdt_D", "sdt_dt_bias"}) add(g, ch);
      }
    }
    return out;
  }

  int64_t warmup_steps(const AdapterSpec& spec) const override {
    return spec.state.empty() && !spec.for_loading ? settings(spec).warmup_steps : 0;
  }

  std::map<std::string, torch::Tensor> end_warmup(CausalLM& model, const AdapterSpec& spec) const override {
    (void)spec;
    std::map<std::string, torch::Tensor> state;
    for (const auto& m : mixers(model)) {
      auto own = m.module->named_parameters(false);
      auto* d = own.find("sdt_warmup_A_log");
      if (!d) throw std::logic_error("sdt: end_warmup on a model without the warm-up delta");
      state[m.name + "." + kWarmupDelta] = d->detach().to(torch::kCPU, torch::kFloat32).clone();
    }
    return state;
  }

  AdapterResult apply(CausalLM& model, const AdapterSpec& spec, const std::vector<std::string>& modules) const override {
    const auto s = settings(spec);
    std::map<std::string, std::shared_ptr<nn::LinearImpl>> linears;
    for (auto& [name, lin] : nn::named_linears(model)) linears[name] = lin;
    const auto all = mixers(model);
    if (s.train_bc)
      for (const auto& m : all)
        if (m.mamba1 && std::find(modules.begin(), modules.end(), m.name + ".x_proj") != modules.end())
          throw InputError("[adapter] method = \"sdt\" trains x_proj's B and C columns itself ([sdt] train_bc), "
                           "so x_proj cannot also carry LoRA: remove x_proj from target_modules, or set "
                           "[sdt] train_bc = false");
    // LoRA on the target modules, through the plugin that provides it.
    AdapterResult result = PluginRegistry::instance().adapter_for_method("lora")->apply(model, lora_spec(spec), modules);

    for (const auto& m : all) {
      const auto device = m.a_log.device();
      auto deltas = std::make_shared<SsmDeltas>();
      deltas->mamba1 = m.mamba1;
      deltas->alpha = s.alpha;
      auto track = [&](const std::string& leaf, const torch::Tensor& t) {
        if (!t.requires_grad()) return;
        result.added_tensors.push_back(m.name + "." + leaf);
        result.trainable_params += t.numel();
      };
      auto* xproj = m.mamba1 ? linears.at(m.name + ".x_proj").get() : nullptr;
      const int64_t N = m.mamba1 ? m.a_log.size(1) : 0;
      if (spec.for_loading) {
        // What saved_tensors stores: dense deltas.
        if (m.mamba1) {
          deltas->dense["A_log"] = frozen(*m.module, "sdt_delta_A_log", m.a_log.sizes().vec(), device);
          if (s.train_bc) {
            auto bc = std::make_shared<BcDelta>();
            bc->dt_rank = xproj->out_features() - 2 * N;
            bc->dense = frozen(*xproj, "sdt_delta_bc", {2 * N, xproj->in_features()}, device);
            xproj->set_adapter(bc);
          }
        } else {
          for (const char* g : {"A_log", "D", "dt_bias"})
            deltas->dense[g] = frozen(*m.module, std::string("sdt_delta_") + g, {m.a_log.size(0)}, device);
        }
      } else if (spec.state.empty()) {
        // Warm-up: a dense, trained delta of A_log.
        auto d = zeros_param(*m.module, "sdt_warmup_A_log", m.a_log.sizes().vec(), device);
        deltas->dense["A_log"] = d;
        track("sdt_warmup_A_log", d);
      } else {
        auto it = spec.state.find(m.name + "." + kWarmupDelta);
        if (it == spec.state.end())
          throw InputError("sdt: the warm-up result has no delta for " + m.name +
                           " (it was made for another model); remove the run's adapter_state.safetensors or "
                           "start a new run");
        if (it->second.sizes() != m.a_log.sizes())
          throw InputError("sdt: the warm-up delta of " + m.name + " is " + std::to_string(it->second.numel()) +
                           " values, A_log has " + std::to_string(m.a_log.numel()) + " (another model's warm-up)");
        auto chosen = select_for(it->second, m.mamba1, s, m.name);
        chosen.a_mask = chosen.a_mask.to(device);
        chosen.a_zero_mask = chosen.a_zero_mask.to(device);
        chosen.bc_mask = chosen.bc_mask.to(device);
        deltas->selection = std::make_shared<LayerSelection>(std::move(chosen));
        const auto& sel = *deltas->selection;
        if (m.mamba1) {
          auto a = zeros_param(*m.module, "sdt_A_log", {sel.a_trainable()}, device);
          deltas->sparse["A_log"] = a;
          track("sdt_A_log", a);
          if (s.train_bc) {
            auto bc = std::make_shared<BcDelta>();
            bc->dt_rank = xproj->out_features() - 2 * N;
            bc->bc_mask = sel.bc_mask.to(device);
            bc->alpha = s.alpha;
            bc->b = zeros_param(*m.module, "sdt_B", {sel.bc_trainable()}, device);
            bc->c = zeros_param(*m.module, "sdt_C", {sel.bc_trainable()}, device);
            track("sdt_B", bc->b);
            track("sdt_C", bc->c);
            xproj->set_adapter(bc);
          }
        } else {
          for (const char* g : {"A_log", "D", "dt_bias"}) {
            auto p = zeros_param(*m.module, std::string("sdt_") + g, {sel.num_channels()}, device);
            deltas->sparse[g] = p;
            track(std::string("sdt_") + g, p);
          }
        }
      }
      m.mixer->set_parameter_adapter(deltas);
    }
    return result;
  }

  // Dense deltas (alpha folded in) under the names apply(for_loading) gives them.
  std::map<std::string, torch::Tensor> saved_tensors(CausalLM& model, const AdapterSpec& spec,
                                                     const AdapterResult& applied) const override {
    (void)applied;
    const auto s = settings(spec);
    torch::NoGradGuard ng;
    std::map<std::string, torch::Tensor> out;
    std::map<std::string, std::shared_ptr<nn::LinearImpl>> linears;
    for (auto& [name, lin] : nn::named_linears(model)) linears[name] = lin;
    for (const auto& m : mixers(model)) {
      auto* slot = m.mixer->parameter_adapter();
      if (!slot) continue;
      auto own = m.module->named_parameters(false);
      for (const auto& g : m.mamba1 ? std::vector<std::string>{"A_log"} : std::vector<std::string>{"A_log", "D", "dt_bias"})
        out[m.name + ".sdt_delta_" + g] = (slot->effective(g, *own.find(g)) - *own.find(g)).to(torch::kFloat32);
      if (m.mamba1 && s.train_bc) {
        auto& xproj = *linears.at(m.name + ".x_proj");
        auto* bc = dynamic_cast<BcDelta*>(xproj.adapter());
        if (!bc) continue;
        out[m.name + ".x_proj.sdt_delta_bc"] = bc->delta(xproj).narrow(0, bc->dt_rank, 2 * m.a_log.size(1)).to(torch::kFloat32);
      }
    }
    return out;
  }

  // init_from: the selected entries of the stored dense deltas (the selection is spec.state's).
  std::map<std::string, torch::Tensor> trained_from_saved(const AdapterSpec& spec,
                                                          std::map<std::string, torch::Tensor> saved) const override {
    const auto s = settings(spec);
    if (spec.state.empty())
      throw InputError("[adapter] init_from with method \"sdt\" needs the adapter folder's method_state.safetensors "
                       "(the warm-up that chose its dimensions); re-export it with this peftfw");
    std::map<std::string, torch::Tensor> out;
    for (const auto& [key, delta] : spec.state) {
      const auto mixer = key.substr(0, key.size() - std::string(kWarmupDelta).size() - 1);
      const bool mamba1 = delta.dim() == 2;
      const auto sel = select_for(delta, mamba1, s, mixer);
      auto take = [&](const std::string& name) -> torch::Tensor {
        auto it = saved.find(name);
        if (it == saved.end()) throw InputError("[adapter] init_from: the adapter has no tensor '" + name + "'");
        return it->second.to(torch::kFloat32) / s.alpha;
      };
      if (mamba1) {
        auto a = take(mixer + ".sdt_delta_A_log");
        out[mixer + ".sdt_A_log"] = gather_a_log(sel.a_mask, torch::where(sel.a_zero_mask, torch::zeros_like(a), a));
        if (s.train_bc) {
          auto bc = take(mixer + ".x_proj.sdt_delta_bc");
          const int64_t N = delta.size(1);
          out[mixer + ".sdt_B"] = gather(sel.bc_mask, bc.narrow(0, 0, N));
          out[mixer + ".sdt_C"] = gather(sel.bc_mask, bc.narrow(0, N, N));
        }
      } else {
        auto channels = torch::tensor(sel.channels, torch::kLong);
        for (const char* g : {"A_log", "D", "dt_bias"})
          out[mixer + ".sdt_" + g] = take(mixer + ".sdt_delta_" + g).index_select(0, channels);
      }
    }
    return out;
  }
};

void register_sdt(PluginRegistrar& registrar) { registrar.add_adapter(std::make_shared<SdtPlugin>()); }

}  // namespace
}  // namespace peftfw::sdt

PEFTFW_DEFINE_PLUGIN("sdt", "adapter", "0.1.0",
                     "Sparse Dimension Tuning (SDT/SDLoRA) of SSM channels and states, with LoRA",
                     peftfw::sdt::register_sdt)
