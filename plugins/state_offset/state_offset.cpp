// Adapter plugin "state_offset": State-offset Tuning (Kang et al., ACL 2025; furiosa-ai/ssm-state-tuning,
// as ssm-peft's STATE_OFFSET_TUNING implements it). Every SSM mixer learns one offset that its
// output reads at every step:
//   readout = "state":  y_t += silu(z_t) * (C_t . h_off),  h_off shaped like the state
//                       (Mamba-1 [channel, state]; Mamba-2 [head, head_dim, state], before the
//                       gated norm there);
//   readout = "output": y_t += silu(z_t) * b,  b shaped like one output (Mamba-1 [channel];
//                       Mamba-2 [head, head_dim]) — the paper's output tuning.
// Zero-initialised, so training starts from the pretrained model. The mixers apply it on every path
// (reference and CUDA scans, packed sequences, decoding); see peftfw/blocks/ssm_slots.hpp.
#include <torch/torch.h>
#include <torch/version.h>

#include "peftfw/blocks/ssm_slots.hpp"
#include "peftfw/error.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/model/inventory.hpp"
#include "peftfw/plugin/adapter.hpp"
#include "peftfw/plugin/registrar.hpp"

namespace peftfw::state_offset {
namespace {

constexpr char kMethod[] = "state_offset";

class Offset final : public blocks::SsmStateAdapter {
 public:
  Offset(torch::Tensor value, bool on_state) : value_(std::move(value)), on_state_(on_state) {}
  blocks::SsmStateTerms terms() const override {
    blocks::SsmStateTerms t;
    (on_state_ ? t.state_offset : t.output_offset) = value_;
    return t;
  }

 private:
  torch::Tensor value_;
  bool on_state_;
};

bool on_state(const AdapterSpec& spec) { return spec.text("state_offset.readout") == "state"; }
const char* leaf(bool state) { return state ? "state_offset" : "output_offset"; }

std::vector<int64_t> shape_of(const std::vector<int64_t>& state_shape, bool state) {
  auto shape = state_shape;
  if (!state) shape.pop_back();  // the "state" axis is last
  return shape;
}

class StateOffsetPlugin final : public AdapterPlugin {
 public:
  std::string id() const override { return kMethod; }
  std::vector<AdapterMethod> methods() const override {
    return {{kMethod,
             "a learned offset in every SSM mixer, read by the output at every step (State-offset "
             "Tuning); base weights stay frozen.",
             AdapterAttach::kState, false}};
  }

  std::vector<recipe::SectionSpec> recipe_sections() const override {
    using namespace recipe::keys;
    return {{"state_offset", "State-offset Tuning (method = \"state_offset\").", {
        choice("readout", "state", {"state", "output"},
               "\"state\": y += silu(z) * (C . h_off), one offset per state entry (Kang et al.'s "
               "state-offset tuning); \"output\": y += silu(z) * b, one per output channel (their "
               "output tuning)."),
    }}};
  }

  AdapterLabel label(const AdapterSpec& spec) const override {
    return {"state offset", std::string("readout=") + (on_state(spec) ? "state" : "output")};
  }

  std::vector<ParamDesc> added_tensors(const AdapterSpec& spec, const ModelInventory& inv) const override {
    std::vector<ParamDesc> out;
    const bool state = on_state(spec);
    for (const auto& st : inv.ssm_states) {
      ParamDesc p;
      p.name = st.module + "." + leaf(state);
      p.shape = shape_of(st.shape, state);
      p.module = st.module;
      p.layer = st.layer;
      p.layer_kind = st.layer_kind;
      p.axes = st.axes;
      if (!state) p.axes.pop_back();
      out.push_back(std::move(p));
    }
    return out;
  }

  AdapterResult apply(CausalLM& model, const AdapterSpec& spec,
                      const std::vector<std::string>& modules) const override {
    (void)modules;
    AdapterResult result;
    const bool state = on_state(spec);
    for (const auto& m : blocks::named_ssm_mixers(model)) {
      const auto params = m.module->parameters();
      const auto device = params.empty() ? torch::Device(torch::kCPU) : params.front().device();
      auto value = m.module->register_parameter(
          leaf(state), torch::zeros(shape_of(m.mixer->state_layout().shape, state),
                                    torch::TensorOptions().dtype(torch::kFloat32).device(device)));
      m.mixer->set_state_adapter(std::make_shared<Offset>(value, state));
      result.added_tensors.push_back(m.name + "." + leaf(state));
      result.trainable_params += value.numel();
    }
    if (result.added_tensors.empty())
      throw InputError("[adapter] method = \"state_offset\": this model has no SSM mixer, so there is no "
                       "state to offset; use \"lora\" for an attention-only model");
    return result;
  }
};

void register_state_offset(PluginRegistrar& registrar) {
  registrar.add_adapter(std::make_shared<StateOffsetPlugin>());
}

}  // namespace
}  // namespace peftfw::state_offset

PEFTFW_DEFINE_PLUGIN("state_offset", "adapter", "0.1.0",
                     "State-offset Tuning: a learned offset to every SSM mixer's state (or output)",
                     peftfw::state_offset::register_state_offset)
