// Reports about a model inventory.
#include "peftfw/model/report.hpp"

#include <iomanip>
#include <map>
#include <set>
#include <sstream>

namespace peftfw {

std::string with_commas(int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

namespace {
// "mamba.in_proj" for "model.layers.3.mamba.in_proj", as the architecture names it.
std::string local_name(const ModuleDesc& m) {
  return m.layer < 0 || m.local_name.empty() ? m.name : m.local_name;
}
}  // namespace

std::string inventory_report(const ModelInventory& inv) {
  std::ostringstream os;
  std::map<std::string, int> kind_count;
  for (const auto& k : inv.layer_kinds) kind_count[k]++;
  os << "Model: " << inv.architecture << " (model_type " << inv.model_type << "), "
     << inv.layer_kinds.size() << " layers:";
  bool first = true;
  for (const auto& [k, n] : kind_count) os << (first ? " " : ", ") << n << " " << k, first = false;
  os << "\n\nModules per layer kind (adaptable = LoRA-style adapters can wrap it):\n";
  struct Row {
    int count = 0;
    std::string shape, type;
    bool adaptable = false;
  };
  std::map<std::pair<std::string, std::string>, Row> rows;  // (kind, local name)
  for (const auto& m : inv.modules) {
    if (m.layer < 0) continue;
    auto& r = rows[{m.layer_kind, local_name(m)}];
    r.count++;
    r.type = m.type;
    r.adaptable = m.adaptable;
    if (m.type == "linear")
      r.shape = std::to_string(m.out_features) + " x " + std::to_string(m.in_features);
  }
  os << "  " << std::left << std::setw(11) << "layer kind" << std::setw(34) << "module"
     << std::setw(7) << "count" << std::setw(11) << "type" << std::setw(16) << "out x in"
     << "adaptable\n";
  for (const auto& [key, r] : rows) {
    os << "  " << std::setw(11) << key.first << std::setw(34) << key.second << std::setw(7)
       << r.count << std::setw(11) << r.type << std::setw(16) << (r.shape.empty() ? "-" : r.shape)
       << (r.adaptable ? "yes" : "no") << "\n";
  }
  std::vector<std::string> others;
  for (const auto& m : inv.modules)
    if (m.layer < 0) others.push_back(m.name + (m.adaptable ? " (adaptable)" : ""));
  os << "  outside layers: ";
  for (size_t i = 0; i < others.size(); ++i) os << (i ? ", " : "") << others[i];
  os << "\n\nSSM core parameter groups ([ssm] train = [...]):\n";
  for (const auto& g : inv.ssm_groups) {
    int64_t tensors = 0, params = 0;
    for (const auto& p : inv.params)
      if (p.ssm_group == g.name) tensors++, params += p.numel();
    os << "  " << std::setw(9) << g.name << std::right << std::setw(5) << tensors << " tensors "
       << std::setw(12) << with_commas(params) << " params  " << std::left << g.doc
       << (g.optional ? " (optional group)" : "") << "\n";
  }
  os << "\nTotal parameters: " << with_commas(inv.total_params()) << "\n";
  return os.str();
}

}  // namespace peftfw
