// The inventory of a block-built model, read off its module tree: every tagged
// child becomes a ModuleDesc, every parameter a ParamDesc, and each decoder
// layer gives the layer index, kind and local names of what it holds.
#include <torch/torch.h>

#include <map>
#include <set>

#include "peftfw/blocks/decoder.hpp"
#include "peftfw/blocks/ssm_slots.hpp"

namespace peftfw::blocks {

namespace {

std::string join(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

struct LayerInfo {
  int index;
  std::string kind;
};

}  // namespace

ModelInventory derive_inventory(HybridLM& model) {
  ModelInventory inv;
  const auto& o = model.options();
  inv.architecture = o.architecture;
  inv.model_type = o.model_type;
  inv.vocab_size = o.vocab_size;
  inv.checkpoint_aliases = o.checkpoint_aliases;
  inv.ignored_checkpoint_prefixes = o.ignored_checkpoint_prefixes;

  // Tags by full module name, layers by prefix, SSM groups of own parameters.
  std::map<std::string, Tag> tags;
  std::map<std::string, LayerInfo> layers;
  std::map<std::string, std::string> param_groups;
  std::map<std::string, std::vector<std::string>> param_axes;
  for (const auto& item : model.named_modules()) {
    const auto& prefix = item.key();
    if (auto* block = dynamic_cast<BlockImpl*>(item.value().get())) {
      for (const auto& e : block->tagged_children()) tags[join(prefix, e.name)] = e.tag;
      for (const auto& [name, group] : block->parameter_groups()) param_groups[join(prefix, name)] = group;
    }
    if (auto* mixer = dynamic_cast<SsmMixer*>(item.value().get())) {
      const auto layout = mixer->state_layout();
      SsmStateDesc st;
      st.module = prefix;
      st.shape = layout.shape;
      st.axes = layout.axes;
      st.conv_channels = layout.conv_channels;
      st.conv_kernel = layout.conv_kernel;
      inv.ssm_states.push_back(std::move(st));
      for (const auto& p : item.value()->named_parameters()) {
        auto axes = mixer->axes_of(p.key());
        if (!axes.empty()) param_axes[join(prefix, p.key())] = std::move(axes);
      }
    }
    if (auto* layer = dynamic_cast<DecoderLayerImpl*>(item.value().get())) {
      layers[prefix] = {static_cast<int>(layer->index()), layer->kind()};
      inv.layer_kinds.push_back(layer->kind());
      inv.layer_parts.push_back(layer->parts());
    }
  }
  if (!o.tie_word_embeddings) tags["lm_head"] = linear("lm_head");

  // The layer a name lies in: its longest layer prefix.
  auto layer_of = [&](const std::string& name) -> std::pair<const std::string*, const LayerInfo*> {
    const std::string* best = nullptr;
    const LayerInfo* info = nullptr;
    for (const auto& [prefix, li] : layers)
      if (name.size() > prefix.size() && name.compare(0, prefix.size(), prefix) == 0 &&
          name[prefix.size()] == '.' && (!best || prefix.size() > best->size())) {
        best = &prefix;
        info = &li;
      }
    return {best, info};
  };

  for (auto& st : inv.ssm_states) {
    auto [prefix, li] = layer_of(st.module);
    st.layer = li ? li->index : -1;
    st.layer_kind = li ? li->kind : "";
  }

  std::set<std::string> module_names;
  for (const auto& item : model.named_modules()) {
    const auto& name = item.key();
    auto tag = tags.find(name);
    if (tag == tags.end()) continue;
    module_names.insert(name);
    ModuleDesc m;
    m.name = name;
    m.type = tag->second.type;
    m.role = tag->second.role;
    auto [prefix, li] = layer_of(name);
    m.layer = li ? li->index : -1;
    m.layer_kind = li ? li->kind : "";
    m.local_name = prefix ? name.substr(prefix->size() + 1) : name;
    if (auto* lin = dynamic_cast<nn::LinearImpl*>(item.value().get())) {
      m.in_features = lin->in_features();
      m.out_features = lin->out_features();
      m.has_bias = lin->bias.defined();
    }
    m.adaptable = tag->second.why_not.empty() && m.type == "linear";
    m.not_adaptable_why = tag->second.why_not;
    inv.modules.push_back(std::move(m));
  }

  auto describe = [&](const std::string& name, const torch::Tensor& value) {
    ParamDesc d;
    d.name = name;
    d.shape = value.sizes().vec();
    if (o.stored_as) d.stored_as = o.stored_as(d.name, d.shape.empty() ? 1 : d.shape.front());
    const auto dot = d.name.rfind('.');
    const std::string owner = dot == std::string::npos ? "" : d.name.substr(0, dot);
    d.module = owner;
    auto [prefix, li] = layer_of(d.name);
    d.layer = li ? li->index : -1;
    d.layer_kind = li ? li->kind : "";
    if (auto a = param_axes.find(d.name); a != param_axes.end()) d.axes = a->second;
    if (auto g = param_groups.find(d.name); g != param_groups.end()) {
      d.ssm_group = g->second;
    } else if (auto t = tags.find(owner); t != tags.end()) {
      d.ssm_group = t->second.ssm_group;
    }
    return d;
  };
  for (const auto& p : model.named_parameters()) inv.params.push_back(describe(p.key(), p.value()));
  for (const auto& b : model.named_buffers()) inv.buffers.push_back(describe(b.key(), b.value()));

  // Default targets: the roles of every adaptable projection inside the layers (the router
  // of a MoE, which picks experts, is left to an explicit request).
  if (o.default_targets.empty()) {
    std::set<std::string> seen;
    for (const auto& m : inv.modules)
      if (m.adaptable && m.layer >= 0 && m.role != "moe.router" && seen.insert(m.role).second)
        inv.default_targets.push_back(m.role);
  } else {
    inv.default_targets = o.default_targets;
  }

  bool any_ssm = false;
  for (const auto& p : inv.params) any_ssm = any_ssm || !p.ssm_group.empty();
  if (any_ssm)
    inv.ssm_groups = {
        {"A_log", "log decay rate, A = -exp(A_log) [Mamba-2: per head; Mamba-1: per channel and state]", false},
        {"D", "skip connection [Mamba-2: per head; Mamba-1: per channel]", false},
        {"dt_bias", "time-step bias before softplus [Mamba-2: dt_bias per head; Mamba-1: dt_proj.bias]", false},
        {"conv1d", "depthwise causal conv weights and bias", true},
    };
  if (o.tie_word_embeddings) inv.optional_checkpoint_keys.push_back("lm_head.weight");
  return inv;
}

}  // namespace peftfw::blocks
