// Persistence plugin "merged": a full HF checkpoint folder with every adapter
// folded into its base weight (W + scale * B A in float32, DoRA's magnitude
// applied) and the co-trained SSM tensors in place, loadable by transformers
// as is. Sharded with model.safetensors.index.json past 5 GB.
#include <torch/torch.h>
#include <torch/version.h>

#include "peftfw/error.hpp"
#include "peftfw/io/safetensors.hpp"
#include "peftfw/io/tensor_bridge.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/model/merge.hpp"
#include "peftfw/plugin/adapter.hpp"
#include "peftfw/plugin/persistence.hpp"
#include "peftfw/plugin/registrar.hpp"

namespace fs = std::filesystem;

namespace peftfw::merged {
namespace {

class MergedFormat final : public PersistencePlugin {
 public:
  std::string id() const override { return "merged"; }

  void check_method(const AdapterMethod& method) const override { refuse_if_weights_cannot_hold(method, id()); }

  void save(const SaveRequest& req, const fs::path& dir) const override {
    TORCH_CHECK(req.model, "merged save needs a model");
    // Under the family's checkpoint keys, so transformers loads it as it loads released files.
    auto tensors = to_checkpoint_keys(req.model->inventory(), merged_state_dict(*req.model));
    if (req.config_json.empty()) throw RuntimeError("merged save needs the model's config.json text");
    write_folder_atomic(dir, [&](const fs::path& tmp) {
      io::save_checkpoint_tensors(tmp.string(), tensors, {{"format", "pt"}});
      io::write_file_atomic((tmp / "config.json").string(), req.config_json);
      if (!req.base_model_dir.empty())
        for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                              "generation_config.json", "vocab.json", "merges.txt"})
          if (fs::exists(req.base_model_dir / f)) fs::copy_file(req.base_model_dir / f, tmp / f);
    });
  }
};

void register_merged(PluginRegistrar& registrar) {
  registrar.add_persistence(std::make_shared<MergedFormat>());
}

}  // namespace
}  // namespace peftfw::merged

PEFTFW_DEFINE_PLUGIN("merged", "persistence", "0.1.0",
                     "full HF checkpoint with adapters merged and SSM tensors in place",
                     peftfw::merged::register_merged)
