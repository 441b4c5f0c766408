// Adapter plugin "initial_state": initial-state tuning (ssm-peft's SSMPEFT benchmark entries 016/017;
// "S0 tuning"). Every SSM mixer learns the state h0 each sequence starts from (Mamba-1 [channel,
// state]; Mamba-2 [head, head_dim, state]) and, with conv_window, the K-1 conv inputs ahead of it
// ([conv channels, K-1]) in place of the zero padding. Zero-initialised, so training starts from the
// pretrained model. Every packed sequence starts from the learned state; the mixers apply it on the
// reference and CUDA scans, with padding, and carry it into the decoding cache (see
// peftfw/blocks/ssm_slots.hpp). At inference it costs no extra step.
#include <torch/torch.h>
#include <torch/version.h>

#include "peftfw/blocks/ssm_slots.hpp"
#include "peftfw/error.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/model/inventory.hpp"
#include "peftfw/plugin/adapter.hpp"
#include "peftfw/plugin/registrar.hpp"

namespace peftfw::initial_state {
namespace {

constexpr char kMethod[] = "initial_state";

class InitialState final : public blocks::SsmStateAdapter {
 public:
  InitialState(torch::Tensor state, torch::Tensor conv) : state_(std::move(state)), conv_(std::move(conv)) {}
  blocks::SsmStateTerms terms() const override {
    blocks::SsmStateTerms t;
    t.initial_state = state_;
    t.initial_conv = conv_;
    return t;
  }

 private:
  torch::Tensor state_, conv_;
};

bool with_conv(const AdapterSpec& spec) { return spec.flag("initial_state.conv_window"); }

class InitialStatePlugin final : public AdapterPlugin {
 public:
  std::string id() const override { return kMethod; }
  std::vector<AdapterMethod> methods() const override {
    return {{kMethod,
             "a learned initial SSM state per mixer (optionally its conv window) that every sequence "
             "starts from; base weights stay frozen.",
             AdapterAttach::kState, false}};
  }

  std::vector<recipe::SectionSpec> recipe_sections() const override {
    using namespace recipe::keys;
    return {{"initial_state", "Initial-state tuning (method = \"initial_state\").", {
        flag("conv_window", false,
             "Also learn the K-1 conv inputs ahead of each sequence (in place of zero padding), as "
             "ssm-peft's initial state + conv state tuning."),
    }}};
  }

  AdapterLabel label(const AdapterSpec& spec) const override {
    return {"initial state", with_conv(spec) ? "with conv window" : ""};
  }

  std::vector<ParamDesc> added_tensors(const AdapterSpec& spec, const ModelInventory& inv) const override {
    std::vector<ParamDesc> out;
    for (const auto& st : inv.ssm_states) {
      ParamDesc p;
      p.name = st.module + ".initial_state";
      p.shape = st.shape;
      p.module = st.module;
      p.layer = st.layer;
      p.layer_kind = st.layer_kind;
      p.axes = st.axes;
      out.push_back(p);
      if (with_conv(spec) && st.conv_kernel > 1) {
        p.name = st.module + ".initial_conv";
        p.shape = {st.conv_channels, st.conv_kernel - 1};
        p.axes = {"conv_channel", "position"};
        out.push_back(p);
      }
    }
    return out;
  }

  AdapterResult apply(CausalLM& model, const AdapterSpec& spec,
                      const std::vector<std::string>& modules) const override {
    (void)modules;
    AdapterResult result;
    for (const auto& m : blocks::named_ssm_mixers(model)) {
      const auto params = m.module->parameters();
      const auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(
          params.empty() ? torch::Device(torch::kCPU) : params.front().device());
      const auto layout = m.mixer->state_layout();
      auto state = m.module->register_parameter("initial_state", torch::zeros(layout.shape, opts));
      result.added_tensors.push_back(m.name + ".initial_state");
      result.trainable_params += state.numel();
      torch::Tensor conv;
      if (with_conv(spec) && layout.conv_kernel > 1) {
        conv = m.module->register_parameter("initial_conv",
                                            torch::zeros({layout.conv_channels, layout.conv_kernel - 1}, opts));
        result.added_tensors.push_back(m.name + ".initial_conv");
        result.trainable_params += conv.numel();
      }
      m.mixer->set_state_adapter(std::make_shared<InitialState>(state, conv));
    }
    if (result.added_tensors.empty())
      throw InputError("[adapter] method = \"initial_state\": this model has no SSM mixer, so there is no "
                       "state to learn; use \"lora\" for an attention-only model");
    return result;
  }
};

void register_initial_state(PluginRegistrar& registrar) {
  registrar.add_adapter(std::make_shared<InitialStatePlugin>());
}

}  // namespace
}  // namespace peftfw::initial_state

PEFTFW_DEFINE_PLUGIN("initial_state", "adapter", "0.1.0",
                     "Initial-state tuning: a learned initial SSM state (and conv window) per mixer",
                     peftfw::initial_state::register_initial_state)
