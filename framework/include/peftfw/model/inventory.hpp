// What a model is made of, described from its config alone (no weights, no
// tensor storage). Architecture plugins produce it; `peftfw plan`, target
// resolution, coverage tables and parameter reports read it.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace peftfw {

// One module of the model, named exactly as in the checkpoint
// (e.g. "model.layers.0.mamba.in_proj").
struct ModuleDesc {
  std::string name;
  std::string type;        // "linear", "conv1d", "norm", "embedding", "experts", "router"
  std::string layer_kind;  // "mamba", "attention", ... or "" for non-layer modules
  std::string role;        // e.g. "attention.q", "mamba.in_proj", "mlp.input", "moe.experts"
  int layer = -1;          // decoder layer index, -1 for embeddings / final norm / head
  // Name relative to its layer ("mamba.in_proj"), or the full name outside the layers.
  std::string local_name;
  int64_t in_features = 0;
  int64_t out_features = 0;
  bool has_bias = false;
  bool adaptable = false;          // LoRA-style adapters may wrap it
  std::string not_adaptable_why;   // reason shown when a user targets it anyway
};

// One parameter tensor, named exactly as in the checkpoint.
struct ParamDesc {
  std::string name;
  std::vector<int64_t> shape;
  std::string module;        // owning module name
  std::string layer_kind;
  int layer = -1;
  std::string ssm_group;     // e.g. "A_log" when the tensor belongs to an SSM core group
  // Where checkpoints store it when not under `name`: one key (a rename) or several, each holding
  // an equal slice in order (stored_slices): one per slice of dim 0 (e.g. one per expert), or, with
  // k keys per slice of dim 0, k blocks of dim 1 each (e.g. an expert's gate then up rows). Empty:
  // `name`. Loading accepts either form; merged exports write these keys.
  std::vector<std::string> stored_as;
  // What each axis indexes, for SSM core tensors an adapter may reach inside (from the mixer):
  // Mamba-1 A_log {"channel", "state"}, D {"channel"}; Mamba-2 A_log, D, dt_bias {"head"}.
  // Empty for other tensors.
  std::vector<std::string> axes;
  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

// The view of a tensor of `shape` as `keys` equal stored slices ([keys, slice shape...]): keys ==
// shape[0] splits dim 0; keys == k * shape[0] also splits dim 1 in k. Empty when neither fits.
std::vector<int64_t> stored_slices(const std::vector<int64_t>& shape, int64_t keys);

// The recurrent state of one SSM mixer, per sequence: what state adapters (a learned initial state
// or state offset) are shaped after.
struct SsmStateDesc {
  std::string module;               // the mixer's full name, e.g. "backbone.layers.0.mixer"
  int layer = -1;
  std::string layer_kind;
  std::vector<int64_t> shape;       // Mamba-1 [channel, state]; Mamba-2 [head, head_dim, state]
  std::vector<std::string> axes;
  int64_t conv_channels = 0;        // the mixer's causal conv: channels and kernel width
  int64_t conv_kernel = 0;
  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

// A named group of SSM core tensors that can be co-trained ([ssm] train = [...]).
struct SsmGroupDesc {
  std::string name;   // "A_log", "D", "dt_bias", "conv1d"
  std::string doc;
  bool optional = false;  // not part of the default core set
};

// What one decoder layer holds: its residual units, each a list of parallel parts
// ({{"mamba"}, {"moe", "mlp"}} for a layer with a MoE and a shared MLP; {{"attention", "mamba"}, {"mlp"}}
// for Falcon-H1's parallel mixers).
using LayerParts = std::vector<std::vector<std::string>>;

struct ModelInventory {
  std::string architecture;              // plugin id
  std::string model_type;                // config's model_type
  int64_t vocab_size = 0;
  std::vector<std::string> layer_kinds;  // per decoder layer
  std::vector<LayerParts> layer_parts;   // per decoder layer (may be empty for old plugins)
  std::vector<ModuleDesc> modules;
  std::vector<ParamDesc> params;         // every distinct trainable tensor (tied ones once)
  // Persistent buffers: loaded from and saved to checkpoints, never trained or counted
  // (e.g. a MoE router's expert-selection bias).
  std::vector<ParamDesc> buffers;
  std::vector<SsmGroupDesc> ssm_groups;
  std::vector<SsmStateDesc> ssm_states;  // one per SSM mixer, in module order
  // The architecture's default targets: roles adapted when a recipe names no target_modules
  // and no roles (every adaptable projection of every layer kind). Empty: no defaults.
  std::vector<std::string> default_targets;
  // Checkpoint keys that may be absent because they alias another tensor
  // (e.g. a tied lm_head.weight).
  std::vector<std::string> optional_checkpoint_keys;
  // Other keys files use for a tensor: (alias key, parameter name), e.g. Mamba-2's legacy
  // ("backbone.embedding.weight", "backbone.embeddings.weight").
  std::vector<std::pair<std::string, std::string>> checkpoint_aliases;
  // Checkpoint keys under these prefixes are not part of the model and are skipped on load
  // (e.g. multi-token-prediction heads, "mtp.").
  std::vector<std::string> ignored_checkpoint_prefixes;

  int64_t total_params() const {
    int64_t n = 0;
    for (const auto& p : params) n += p.numel();
    return n;
  }
  const ModuleDesc* find_module(const std::string& name) const {
    for (const auto& m : modules)
      if (m.name == name) return &m;
    return nullptr;
  }
};

}  // namespace peftfw
