// Target resolution, coverage table and parameter counts for adapters.
//
// PEFT's own check only fires when no module at all matches, so a recipe with
// Transformer names on a hybrid trains a few percent of what it meant to.
// Here every selector entry must match something and every layer kind must
// get at least one adapted module, unless the recipe says otherwise.
#include "peftfw/adapters/targets.hpp"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "peftfw/error.hpp"
#include "peftfw/model/report.hpp"

namespace peftfw::adapters {

namespace {

std::string quote(const std::string& s) { return "\"" + s + "\""; }

std::string join(const std::vector<std::string>& items, const std::string& sep = ", ") {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

std::vector<std::string> quoted(const std::vector<std::string>& items) {
  std::vector<std::string> out;
  for (const auto& s : items) out.push_back(quote(s));
  return out;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string lower(std::string s) {
  for (auto& c : s)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return s;
}

// "model.layers.3.mamba.in_proj" -> "in_proj"
std::string leaf(const std::string& name) {
  auto pos = name.rfind('.');
  return pos == std::string::npos ? name : name.substr(pos + 1);
}

// The name relative to its layer ("mamba.in_proj"), as the architecture gives it; modules
// outside the layers keep their full name.
std::string local_name(const ModuleDesc& m) {
  return m.layer < 0 || m.local_name.empty() ? m.name : m.local_name;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// PEFT's rule for a list entry: the full name, or a '.'-bounded suffix of it.
bool name_matches(const std::string& name, const std::string& entry) {
  return !entry.empty() && (name == entry || ends_with(name, "." + entry));
}

// A role entry matches the role itself or the roles below it ("mamba" ->
// "mamba.in_proj").
bool role_matches(const std::string& role, const std::string& entry) {
  return !entry.empty() && (role == entry || (role.size() > entry.size() &&
                                              role.compare(0, entry.size(), entry) == 0 &&
                                              role[entry.size()] == '.'));
}

// Layer kinds in the order they first occur, with their layer counts.
std::vector<std::pair<std::string, int>> kinds_in_order(const ModelInventory& inv) {
  std::vector<std::pair<std::string, int>> kinds;
  for (const auto& k : inv.layer_kinds) {
    auto it = std::find_if(kinds.begin(), kinds.end(), [&](const auto& p) { return p.first == k; });
    if (it == kinds.end())
      kinds.emplace_back(k, 1);
    else
      it->second++;
  }
  return kinds;
}

std::string layers_phrase(int n, const std::string& kind) {
  return std::to_string(n) + " " + kind + (n == 1 ? " layer" : " layers");
}

// Distinct local names of the inventory's modules meeting `pred`, sorted.
template <typename Pred>
std::vector<std::string> sorted_local_names(const ModelInventory& inv, Pred pred) {
  std::set<std::string> names;
  for (const auto& m : inv.modules)
    if (pred(m)) names.insert(local_name(m));
  return {names.begin(), names.end()};
}

// Names used by other architectures for the MLP and attention projections.
// An entry among them that matches nothing is answered with the modules that
// play that role here (looked up by role, not by model family).
bool is_mlp_alias(const std::string& n) {
  static const std::set<std::string> kNames = {
      "gate_proj", "up_proj", "down_proj", "gate_up_proj",  "w1",           "w2", "w3", "fc1",
      "fc2",       "c_fc",    "mlp",       "dense_h_to_4h", "dense_4h_to_h"};
  return kNames.count(n) > 0;
}

bool is_attention_alias(const std::string& n) {
  static const std::set<std::string> kNames = {
      "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv",
      "wqkv",   "wq",     "wk",     "wv",     "wo",       "query",           "key",    "value"};
  return kNames.count(n) > 0;
}

// Text telling the user which module names exist; continuation lines start
// with `indent`.
std::string existing_names(const ModelInventory& inv, const std::string& indent = "    ") {
  auto adaptable = sorted_local_names(inv, [](const ModuleDesc& m) { return m.adaptable; });
  auto fixed =
      sorted_local_names(inv, [](const ModuleDesc& m) { return !m.adaptable && m.layer >= 0; });
  auto outside =
      sorted_local_names(inv, [](const ModuleDesc& m) { return !m.adaptable && m.layer < 0; });
  std::string s = "Adaptable modules here (names relative to a layer): " +
                  (adaptable.empty() ? std::string("none") : join(adaptable)) + ".";
  if (!fixed.empty() || !outside.empty()) {
    s += "\n" + indent + "Not adaptable: " + join(fixed);
    if (!outside.empty())
      s += (fixed.empty() ? "" : "; ") + std::string("outside the layers: ") + join(outside);
    s += ".";
  }
  return s;
}

// "mamba.conv1d (36 modules, model.layers.0.mamba.conv1d ... model.layers.39.mamba.conv1d)",
// "mamba.conv1d (model.layers.0.mamba.conv1d)" or "model.norm".
std::string name_span(const std::string& local, const std::vector<const ModuleDesc*>& ms) {
  if (ms.size() == 1)
    return ms.front()->name == local ? local : local + " (" + ms.front()->name + ")";
  return local + " (" + std::to_string(ms.size()) + " modules, " + ms.front()->name + " ... " +
         ms.back()->name + ")";
}

// Examples for messages, taken from the model at hand: its first adaptable
// module inside a layer (or anywhere).
struct Example {
  std::string full, local, leaf, regex;
};

Example example_of(const ModelInventory& inv) {
  const ModuleDesc* pick = nullptr;
  for (const auto& m : inv.modules)
    if (m.adaptable && (!pick || (pick->layer < 0 && m.layer >= 0))) pick = &m;
  if (!pick) return {};
  Example ex{pick->name, local_name(*pick), leaf(pick->name), ""};
  // The full name as a regex, any layer: model\.layers\.\d+\.mamba\.in_proj
  auto escape = [](const std::string& text) {
    std::string out;
    for (char c : text) out += c == '.' ? std::string("\\.") : std::string(1, c);
    return out;
  };
  // The layer's own name ends in its index ("model.layers.3"): any index matches.
  const std::string local = local_name(*pick);
  const bool in_layer = pick->layer >= 0 && local != pick->name;
  const std::string layer_name = in_layer ? pick->name.substr(0, pick->name.size() - local.size() - 1) : "";
  const std::string index = std::to_string(pick->layer);
  if (!in_layer || layer_name.size() <= index.size() ||
      layer_name.compare(layer_name.size() - index.size(), index.size(), index) != 0) {
    ex.regex = escape(pick->name);
  } else {
    ex.regex = escape(layer_name.substr(0, layer_name.size() - index.size())) + "\\d+\\." + escape(local);
  }
  return ex;
}

class Resolver {
 public:
  Resolver(const ModelInventory& inv, const TargetRequest& req)
      : inv_(inv),
        req_(req),
        selected_by_(inv.modules.size(), -1),
        excluded_(inv.modules.size(), false) {}

  TargetResolution run() {
    check_request();
    if (req_.target_modules) select_by_pattern(*req_.target_modules);
    select_by_roles();
    if (req_.exclude_modules) exclude(*req_.exclude_modules);

    std::vector<const ModuleDesc*> adapted;
    for (size_t i = 0; i < inv_.modules.size(); ++i)
      if (is_final(i) && inv_.modules[i].adaptable) adapted.push_back(&inv_.modules[i]);
    check_not_adaptable();
    if (adapted.empty()) {
      nothing_selected();
    } else {
      check_kind_coverage();
    }

    const bool fail_on_problems = req_.on_unmatched == "error" || adapted.empty();
    if (!errors_.empty() || !nothing_selected_.empty() ||
        (fail_on_problems && !problems_.empty())) {
      // Causes first, the empty selection they lead to last.
      std::vector<std::string> all = errors_;
      if (fail_on_problems) all.insert(all.end(), problems_.begin(), problems_.end());
      if (!nothing_selected_.empty()) all.push_back(nothing_selected_);
      std::string msg = req_.source + ": cannot resolve the adapter's target modules (" +
                        std::to_string(all.size()) + (all.size() == 1 ? " problem" : " problems") +
                        "):";
      for (const auto& p : all) msg += "\n  - " + p;
      throw InputError(msg);
    }

    TargetResolution res;
    for (const auto* m : adapted) res.modules.push_back(m->name);
    if (used_defaults_) res.default_roles = roles_;
    if (req_.on_unmatched == "warn")
      for (const auto& p : problems_) res.warnings.push_back(req_.source + ": " + p);
    return res;
  }

 private:
  std::vector<std::string> roles_;  // the request's roles, or the architecture's defaults
  bool used_defaults_ = false;

  bool is_final(size_t i) const { return selected_by_[i] >= 0 && !excluded_[i]; }

  void check_request() {
    const auto& u = req_.on_unmatched;
    if (u != "error" && u != "warn" && u != "ignore")
      throw InputError(req_.source + ": on_unmatched = " + quote(u) +
                       " is not one of \"error\", \"warn\", \"ignore\"");
    const bool has_targets = req_.target_modules &&
                             (req_.target_modules->is_regex || !req_.target_modules->names.empty());
    roles_ = req_.roles;
    if (!has_targets && req_.roles.empty() && !inv_.default_targets.empty()) {
      // Nothing named: the architecture's default targets (every adaptable projection).
      roles_ = inv_.default_targets;
      used_defaults_ = true;
      return;
    }
    if (!has_targets && req_.roles.empty()) {
      // The examples adapt every adaptable module inside the layers.
      auto locals =
          sorted_local_names(inv_, [](const ModuleDesc& m) { return m.adaptable && m.layer >= 0; });
      std::set<std::string> top_roles;
      for (const auto& m : inv_.modules)
        if (m.adaptable && m.layer >= 0) top_roles.insert(m.role.substr(0, m.role.find('.')));
      throw InputError(
          req_.source +
          ": no modules to adapt. Set target_modules (as in PEFT: a list of module names, each "
          "matching a full name or a '.'-bounded suffix of it; or a string, a regex over full "
          "names; or \"all-linear\"), or roles (module roles as the architecture names them; "
          "an entry also matches the roles below it), or both (they are united). For this "
          "model, either of\n"
          "  target_modules = [" +
          join(quoted(locals)) +
          "]\n"
          "  roles = [" +
          join(quoted({top_roles.begin(), top_roles.end()})) +
          "]\n"
          "adapts every adaptable module in every layer.\n" +
          existing_names(inv_, ""));
    }
  }

  int add_selector(std::string label) {
    selectors_.push_back(std::move(label));
    return static_cast<int>(selectors_.size()) - 1;
  }

  void select(size_t i, int selector) {
    if (selected_by_[i] < 0) selected_by_[i] = selector;
  }

  // Compiles a user regex; a bad one is always an error.
  std::optional<std::regex> compile(const std::string& key, const std::string& text) {
    try {
      return std::regex(text, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      errors_.push_back(key + " regex " + quote(text) + " is not a valid ECMAScript regex (" +
                        e.what() + ")");
      return std::nullopt;
    }
  }

  void select_by_pattern(const recipe::TargetPattern& pat) {
    if (pat.is_regex && pat.regex == "all-linear") {
      int sel = add_selector("target_modules = \"all-linear\"");
      bool any = false;
      for (size_t i = 0; i < inv_.modules.size(); ++i) {
        const auto& m = inv_.modules[i];
        // As PEFT: every linear layer except the output head. Linear modules
        // the architecture marks not adaptable are left out of the shorthand.
        if (m.type == "linear" && m.role != "lm_head" && m.adaptable) {
          select(i, sel);
          any = true;
        }
      }
      if (!any)
        problems_.push_back(
            "target_modules = \"all-linear\" matches no module: this model has "
            "no adaptable linear module besides the output head.\n    " +
            existing_names(inv_));
      return;
    }
    if (pat.is_regex) {
      auto re = compile("target_modules", pat.regex);
      if (!re) return;
      int sel = add_selector("target_modules regex " + quote(pat.regex));
      bool any = false;
      for (size_t i = 0; i < inv_.modules.size(); ++i) {
        if (std::regex_match(inv_.modules[i].name, *re)) {
          select(i, sel);
          any = true;
        }
      }
      if (!any) problems_.push_back(regex_unmatched("target_modules", pat.regex));
      return;
    }
    std::vector<std::string> unmatched;
    for (const auto& entry : pat.names) {
      int sel = add_selector("target_modules entry " + quote(entry));
      bool any = false;
      for (size_t i = 0; i < inv_.modules.size(); ++i) {
        if (name_matches(inv_.modules[i].name, entry)) {
          select(i, sel);
          any = true;
        }
      }
      if (!any) unmatched.push_back(entry);
    }
    if (!unmatched.empty()) problems_.push_back(names_unmatched("target_modules", unmatched));
  }

  void select_by_roles() {
    std::vector<std::string> unmatched;
    for (const auto& entry : roles_) {
      int sel = add_selector((used_defaults_ ? "default target " : "roles entry ") + quote(entry));
      std::vector<const ModuleDesc*> fixed;
      bool any = false;
      for (size_t i = 0; i < inv_.modules.size(); ++i) {
        const auto& m = inv_.modules[i];
        if (!role_matches(m.role, entry)) continue;
        if (m.adaptable) {
          select(i, sel);
          any = true;
        } else {
          fixed.push_back(&m);
        }
      }
      if (any) continue;
      if (fixed.empty()) {
        unmatched.push_back(entry);
        continue;
      }
      // The role names only modules that cannot take an adapter.
      std::map<std::string, std::vector<std::string>> by_reason;
      std::vector<std::string> reasons;
      for (const auto* m : fixed) {
        auto& names = by_reason[m->not_adaptable_why];
        if (names.empty()) reasons.push_back(m->not_adaptable_why);
        auto local = local_name(*m);
        if (std::find(names.begin(), names.end(), local) == names.end()) names.push_back(local);
      }
      std::string msg =
          "roles entry " + quote(entry) + " matches only modules that cannot be adapted:";
      for (const auto& why : reasons)
        msg += "\n    " + join(by_reason[why]) + ": " + (why.empty() ? "not adaptable" : why);
      errors_.push_back(msg);
    }
    if (unmatched.empty()) return;
    std::set<std::string> role_set;
    for (const auto& m : inv_.modules)
      if (m.adaptable) role_set.insert(m.role);
    std::vector<std::string> roles(role_set.begin(), role_set.end());
    std::string msg = std::string(unmatched.size() == 1 ? "roles entry " : "roles entries ") +
                      join(quoted(unmatched)) + (unmatched.size() == 1 ? " matches" : " match") +
                      " no module role (an entry matches a role equal to it or starting with it "
                      "plus \".\"";
    auto nested = std::find_if(roles.begin(), roles.end(), [](const std::string& r) {
      return r.find('.') != std::string::npos;
    });
    if (nested != roles.end())
      msg += ", so " + quote(nested->substr(0, nested->find('.'))) + " matches " + quote(*nested);
    msg += ").";
    for (const auto& e : unmatched) {
      std::vector<std::pair<size_t, std::string>> close;
      for (const auto& r : roles) {
        size_t d = edit_distance(lower(e), lower(r));
        if (d <= 2 && 2 * d < r.size()) close.emplace_back(d, r);
      }
      std::sort(close.begin(), close.end());
      if (close.empty()) continue;
      std::vector<std::string> names;
      for (size_t i = 0; i < close.size() && i < 3; ++i) names.push_back(quote(close[i].second));
      msg += "\n    " + quote(e) + ": did you mean " + join(names, " or ") + "?";
    }
    msg += "\n    Roles of the adaptable modules here: " +
           (roles.empty() ? std::string("none") : join(roles)) + ".";
    problems_.push_back(msg);
  }

  void exclude(const recipe::TargetPattern& pat) {
    if (pat.is_regex) {
      auto re = compile("exclude_modules", pat.regex);
      if (!re) return;
      bool any = false;
      for (size_t i = 0; i < inv_.modules.size(); ++i) {
        if (std::regex_match(inv_.modules[i].name, *re)) {
          excluded_[i] = true;
          any = true;
        }
      }
      if (!any) problems_.push_back(regex_unmatched("exclude_modules", pat.regex));
      return;
    }
    std::vector<std::string> unmatched;
    for (const auto& entry : pat.names) {
      bool any = false;
      for (size_t i = 0; i < inv_.modules.size(); ++i) {
        if (name_matches(inv_.modules[i].name, entry)) {
          excluded_[i] = true;
          any = true;
        }
      }
      if (!any) unmatched.push_back(entry);
    }
    if (!unmatched.empty()) problems_.push_back(names_unmatched("exclude_modules", unmatched));
  }

  std::string regex_unmatched(const std::string& key, const std::string& regex) const {
    const auto ex = example_of(inv_);
    std::string msg = key + " regex " + quote(regex) +
                      " matches no module name. A string is matched against the whole full name "
                      "(PEFT's re.fullmatch)";
    if (!ex.full.empty()) {
      // TOML literal strings ('...') keep the backslashes as typed.
      msg += ", e.g. " + key + " = '" + ex.regex + "' or '.*\\." + ex.leaf +
             "'; a plain name needs the list form, [" + quote(ex.leaf) + "]";
    }
    return msg + ".\n    " + existing_names(inv_);
  }

  // Why `entry` (a list entry that matched nothing) might have been written,
  // and what to write instead; "" when nothing close exists.
  std::string hint(const std::string& entry) const {
    if (entry.empty()) return "an empty name matches nothing";
    if (entry == "all-linear")
      return "the \"all-linear\" shorthand works only as a string: target_modules = \"all-linear\"";
    const std::string entry_leaf = leaf(entry);
    auto by_role = [&](const std::string& prefix) {
      std::vector<std::string> names;
      for (const auto& m : inv_.modules) {
        auto local = local_name(m);
        if (m.adaptable && role_matches(m.role, prefix) &&
            std::find(names.begin(), names.end(), local) == names.end())
          names.push_back(local);
      }
      return names;
    };
    if (is_mlp_alias(entry_leaf)) {
      auto names = by_role("mlp");
      return names.empty() ? "used for the MLP in other architectures; this model has no "
                             "adaptable MLP module (no role \"mlp.*\")"
                           : "used for the MLP in other architectures; the MLP modules here are " +
                                 join(names);
    }
    if (is_attention_alias(entry_leaf) && by_role("attention").empty())
      return "used for attention in other architectures; this model has no adaptable "
             "attention module (no role \"attention.*\")";

    // Close spellings, or the same leaf under another parent ("attn.q_proj").
    std::vector<std::pair<size_t, std::string>> close;
    const std::string e = lower(entry), el = lower(entry_leaf);
    for (const auto& cand :
         sorted_local_names(inv_, [](const ModuleDesc& m) { return m.adaptable; })) {
      const std::string c = lower(cand), cl = leaf(c);
      const size_t d_full = edit_distance(e, c), d_leaf = edit_distance(el, cl);
      // A dotted entry is compared whole, so "attn.q_proj" suggests
      // self_attn.q_proj but not its k/v/o neighbours.
      const bool bare = entry_leaf == entry;
      if (cl == el)
        close.emplace_back(0, cand);
      else if (d_full <= 2 && 2 * d_full < c.size())
        close.emplace_back(d_full, cand);
      else if (bare && d_leaf <= 2 && 2 * d_leaf < cl.size())
        close.emplace_back(d_leaf, cand);
    }
    if (close.empty()) return "";
    std::stable_sort(close.begin(), close.end(),
                     [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<std::string> names;
    for (size_t i = 0; i < close.size() && i < 4; ++i) names.push_back(quote(close[i].second));
    return "did you mean " + join(names, " or ") + "?";
  }

  std::string names_unmatched(const std::string& key,
                              const std::vector<std::string>& unmatched) const {
    std::string msg = key + ": " +
                      (unmatched.size() == 1 ? std::string("entry ")
                                             : std::to_string(unmatched.size()) + " entries ") +
                      join(quoted(unmatched)) + (unmatched.size() == 1 ? " matches" : " match") +
                      " no module.";
    // Entries with the same hint share a line.
    std::vector<std::pair<std::string, std::vector<std::string>>> hints;
    for (const auto& e : unmatched) {
      auto h = hint(e);
      if (h.empty()) continue;
      auto it =
          std::find_if(hints.begin(), hints.end(), [&](const auto& p) { return p.first == h; });
      if (it == hints.end())
        hints.push_back({h, {e}});
      else
        it->second.push_back(e);
    }
    for (const auto& [h, entries] : hints) msg += "\n    " + join(quoted(entries)) + ": " + h;
    msg += "\n    An entry matches a module's full name or a '.'-bounded suffix of it";
    const auto ex = example_of(inv_);
    if (!ex.full.empty()) {
      msg += " (" + quote(ex.leaf) + (ex.local != ex.leaf ? " and " + quote(ex.local) : "") +
             " match " + ex.full;
      // A piece of the leaf shows the '.' boundary ("proj" does not match "in_proj").
      auto cut = ex.leaf.rfind('_');
      const std::string piece = cut == std::string::npos ? "" : ex.leaf.substr(cut + 1);
      const bool piece_matches =
          std::any_of(inv_.modules.begin(), inv_.modules.end(),
                      [&](const ModuleDesc& m) { return name_matches(m.name, piece); });
      if (!piece.empty() && !piece_matches) msg += "; " + quote(piece) + " does not";
      msg += ")";
    }
    msg += ".";
    msg += "\n    " + existing_names(inv_);
    return msg;
  }

  // Selected modules that cannot take an adapter: always an error.
  void check_not_adaptable() {
    // (selector, local name) -> modules, in first-seen order
    std::vector<std::pair<std::pair<int, std::string>, std::vector<const ModuleDesc*>>> groups;
    for (size_t i = 0; i < inv_.modules.size(); ++i) {
      const auto& m = inv_.modules[i];
      if (!is_final(i) || m.adaptable) continue;
      std::pair<int, std::string> key{selected_by_[i], local_name(m)};
      auto it =
          std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == key; });
      if (it == groups.end())
        groups.push_back({key, {&m}});
      else
        it->second.push_back(&m);
    }
    for (const auto& [key, ms] : groups) {
      const auto& why = ms.front()->not_adaptable_why;
      std::string msg =
          selectors_[static_cast<size_t>(key.first)] + " selects " + name_span(key.second, ms) +
          ", which cannot be adapted: " +
          (why.empty() ? std::string("the architecture marks it not adaptable") : why);
      if (msg.back() != '.') msg += ".";
      // The same selector may also hit adaptable modules (e.g. "input_linear"
      // hitting both shared_mlp.input_linear and MoE experts): name those.
      std::vector<std::string> good;
      for (size_t i = 0; i < inv_.modules.size(); ++i) {
        const auto& m = inv_.modules[i];
        auto local = local_name(m);
        if (selected_by_[i] == key.first && m.adaptable &&
            std::find(good.begin(), good.end(), local) == good.end())
          good.push_back(local);
      }
      if (!good.empty())
        msg += "\n    To keep only the adaptable modules it matches, name them fully: " +
               join(quoted(good)) + ".";
      msg += "\n    Remove it from the selection, or add " + quote(key.second) +
             " to exclude_modules.";
      errors_.push_back(msg);
    }
  }

  void nothing_selected() {
    size_t selected = 0, excluded = 0;
    for (size_t i = 0; i < inv_.modules.size(); ++i) {
      if (selected_by_[i] < 0) continue;
      selected++;
      if (excluded_[i]) excluded++;
    }
    std::string msg = "no module is selected for adaptation";
    if (selected > 0 && excluded == selected)
      msg += ": exclude_modules removes every module that target_modules / roles select (" +
             std::to_string(selected) + ")";
    msg += ".\n    " + existing_names(inv_);
    nothing_selected_ = msg;
  }

  // Every layer kind with adaptable modules must get at least one adapter.
  void check_kind_coverage() {
    for (const auto& [kind, n_layers] : kinds_in_order(inv_)) {
      std::vector<std::string> adaptable;
      bool covered = false;
      for (size_t i = 0; i < inv_.modules.size(); ++i) {
        const auto& m = inv_.modules[i];
        if (m.layer < 0 || m.layer_kind != kind || !m.adaptable) continue;
        auto local = local_name(m);
        if (std::find(adaptable.begin(), adaptable.end(), local) == adaptable.end())
          adaptable.push_back(local);
        covered = covered || is_final(i);
      }
      if (covered || adaptable.empty()) continue;
      std::string msg = "no module of the " + layers_phrase(n_layers, kind) +
                        " is adapted; the adaptable modules there are " + join(adaptable);
      msg += req_.on_unmatched == "error"
                 ? "; add them to target_modules, or set on_unmatched = \"warn\" if leaving "
                   "these layers frozen is intended"
                 : "; add them to target_modules to adapt these layers";
      problems_.push_back(msg);
    }
  }

  const ModelInventory& inv_;
  const TargetRequest& req_;
  std::vector<int> selected_by_;  // index into selectors_ of the first selector, or -1
  std::vector<bool> excluded_;
  std::vector<std::string> selectors_;  // "target_modules entry \"q_proj\"", ...
  std::vector<std::string> errors_;     // always fatal
  std::vector<std::string> problems_;   // fatal, warned or ignored per on_unmatched
  std::string nothing_selected_;        // always fatal, reported after the causes
};

// The adapted modules, looked up; unknown, duplicate or non-adaptable names
// are an input error (a list read from an adapter file can be wrong).
std::vector<const ModuleDesc*> lookup_adapted(const ModelInventory& inv,
                                              const std::vector<std::string>& adapted) {
  std::unordered_map<std::string, const ModuleDesc*> by_name;
  for (const auto& m : inv.modules) by_name.emplace(m.name, &m);
  std::vector<const ModuleDesc*> out;
  std::set<std::string> seen;
  std::vector<std::string> bad;
  for (const auto& name : adapted) {
    auto it = by_name.find(name);
    if (it == by_name.end())
      bad.push_back(quote(name) + " is not a module of this " + inv.architecture + " model");
    else if (!it->second->adaptable)
      bad.push_back(quote(name) + " cannot be adapted: " + it->second->not_adaptable_why);
    else if (!seen.insert(name).second)
      bad.push_back(quote(name) + " is listed twice");
    else
      out.push_back(it->second);
  }
  if (!bad.empty()) {
    std::string msg = "adapted module list is wrong:";
    for (const auto& b : bad) msg += "\n  - " + b;
    throw InputError(msg);
  }
  return out;
}

std::set<std::string> lookup_ssm_groups(const ModelInventory& inv,
                                        const std::vector<std::string>& groups) {
  std::set<std::string> known, out;
  for (const auto& g : inv.ssm_groups) known.insert(g.name);
  std::vector<std::string> unknown;
  for (const auto& g : groups) {
    if (known.count(g))
      out.insert(g);
    else
      unknown.push_back(quote(g));
  }
  if (!unknown.empty())
    throw InputError(
        "unknown SSM parameter group" + std::string(unknown.size() == 1 ? " " : "s ") +
        join(unknown) + "; this " + inv.architecture + " model has " +
        (known.empty() ? std::string("none") : join(quoted({known.begin(), known.end()}))));
  return out;
}

int64_t sat_add(int64_t a, int64_t b) {
  int64_t out = 0;
  return __builtin_add_overflow(a, b, &out) ? std::numeric_limits<int64_t>::max() : out;
}

int64_t added_by(const CountRule& rule, const ModuleDesc& m) {
  return rule.added_per_module ? rule.added_per_module(m) : 0;
}

// The base tensors a rule trains that are not already counted as trained SSM tensors.
std::vector<const ParamDesc*> trained_base(const ModelInventory& inv, const CountRule& rule,
                                           const std::set<std::string>& groups) {
  std::unordered_map<std::string, const ParamDesc*> by_name;
  for (const auto& p : inv.params) by_name.emplace(p.name, &p);
  std::vector<const ParamDesc*> out;
  std::set<std::string> seen;
  for (const auto& name : rule.base_params) {
    auto it = by_name.find(name);
    if (it == by_name.end())
      throw RuntimeError("adapter count: " + quote(name) + " is not a parameter of this " + inv.architecture +
                         " model");
    if (!seen.insert(name).second) continue;
    if (!it->second->ssm_group.empty() && groups.count(it->second->ssm_group)) continue;
    out.push_back(it->second);
  }
  return out;
}

std::string pad(const std::string& s, size_t width) {
  return s.size() >= width ? s : s + std::string(width - s.size(), ' ');
}

std::string rpad(const std::string& s, size_t width) {
  return s.size() >= width ? s : std::string(width - s.size(), ' ') + s;
}

}  // namespace

TargetResolution resolve_targets(const ModelInventory& inventory, const TargetRequest& request) {
  return Resolver(inventory, request).run();
}

std::string coverage_table(const ModelInventory& inv, const std::vector<std::string>& adapted) {
  const auto modules = lookup_adapted(inv, adapted);
  std::set<const ModuleDesc*> is_adapted(modules.begin(), modules.end());

  struct Row {
    std::string kind, module;
    int adapted = 0, present = 0;
  };
  struct KindSummary {
    std::string kind;
    int layers = 0, layers_adapted = 0, types = 0, types_adapted = 0;
    size_t last_row = 0;  // the summary follows this row
  };
  std::vector<Row> rows;
  std::vector<KindSummary> summaries;
  for (const auto& [kind, n_layers] : kinds_in_order(inv)) {
    const size_t first = rows.size();
    std::set<int> layers_adapted;
    for (const auto& m : inv.modules) {
      if (m.layer < 0 || m.layer_kind != kind || !m.adaptable) continue;
      auto local = local_name(m);
      auto it = std::find_if(rows.begin() + static_cast<std::ptrdiff_t>(first), rows.end(),
                             [&](const Row& r) { return r.module == local; });
      if (it == rows.end()) it = rows.insert(rows.end(), Row{kind, local, 0, 0});
      it->present++;
      if (is_adapted.count(&m)) {
        it->adapted++;
        layers_adapted.insert(m.layer);
      }
    }
    if (rows.size() == first) continue;
    KindSummary s;
    s.kind = kind;
    s.layers = n_layers;
    s.layers_adapted = static_cast<int>(layers_adapted.size());
    s.types = static_cast<int>(rows.size() - first);
    s.last_row = rows.size() - 1;
    for (size_t i = first; i < rows.size(); ++i) s.types_adapted += rows[i].adapted > 0 ? 1 : 0;
    summaries.push_back(s);
  }
  for (const auto& m : inv.modules)
    if (m.layer < 0 && m.adaptable)
      rows.push_back(Row{"outside", m.name, is_adapted.count(&m) ? 1 : 0, 1});

  size_t wk = 10, wm = 6, wa = 1, wp = 1;
  for (const auto& r : rows) {
    wk = std::max(wk, r.kind.size());
    wm = std::max(wm, r.module.size());
    wa = std::max(wa, std::to_string(r.adapted).size());
    wp = std::max(wp, std::to_string(r.present).size());
  }
  std::ostringstream os;
  os << "Adapter coverage: " << modules.size() << " modules adapted\n";
  os << "  " << pad("layer kind", wk) << "  " << pad("module", wm) << "  adapted / present\n";
  auto summary = summaries.begin();
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    std::string line = "  " + pad(r.kind, wk) + "  " + pad(r.module, wm) + "  " +
                       rpad(std::to_string(r.adapted), wa) + " / " +
                       pad(std::to_string(r.present), wp);
    if (r.adapted == 0)
      line += "  <- not adapted";
    else if (r.adapted < r.present)
      line += "  <- partly adapted";
    while (!line.empty() && line.back() == ' ') line.pop_back();
    os << line << "\n";
    if (summary != summaries.end() && summary->last_row == i) {
      os << "  " << summary->kind << ": " << summary->types_adapted << " of " << summary->types
         << " adaptable module types adapted in " << summary->layers_adapted << " of "
         << summary->layers << " layers\n";
      ++summary;
    }
  }
  return os.str();
}

ParameterCount count_parameters(const ModelInventory& inv, const std::vector<std::string>& adapted,
                                const CountRule& rule, const std::vector<std::string>& ssm_groups_trained) {
  const auto groups = lookup_ssm_groups(inv, ssm_groups_trained);
  int64_t added = 0;
  for (const auto* m : lookup_adapted(inv, adapted)) added = sat_add(added, added_by(rule, *m));
  for (const auto& t : rule.added_tensors) added = sat_add(added, t.numel());
  int64_t trained = 0;
  for (const auto* p : trained_base(inv, rule, groups)) trained = sat_add(trained, p->numel());
  for (const auto& p : inv.params)
    if (!p.ssm_group.empty() && groups.count(p.ssm_group)) trained = sat_add(trained, p.numel());
  return ParameterCount{sat_add(added, trained), sat_add(inv.total_params(), added)};
}

std::string peft_parameter_line(const ParameterCount& count) {
  // PEFT: f"{100 * trainable_params / all_param:.4f}". Both operands are
  // exact in a double (below 2^53) and the division rounds correctly, as
  // Python's int / int does, so the digits agree with Python's.
  const double pct =
      count.all == 0 ? 0.0
                     : static_cast<double>(100 * count.trainable) / static_cast<double>(count.all);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.4f", pct);
  return "trainable params: " + with_commas(count.trainable) +
         " || all params: " + with_commas(count.all) + " || trainable%: " + buf;
}

std::string parameter_report(const ModelInventory& inv, const std::vector<std::string>& adapted,
                             const CountRule& rule, const std::vector<std::string>& ssm_groups_trained) {
  const auto count = count_parameters(inv, adapted, rule, ssm_groups_trained);
  const auto groups = lookup_ssm_groups(inv, ssm_groups_trained);
  struct Line {
    std::string kind;
    int layers = 0;
    int64_t modules = 0, adapter = 0, ssm = 0;
  };
  std::vector<Line> lines;
  for (const auto& [kind, n] : kinds_in_order(inv)) lines.push_back(Line{kind, n, 0, 0, 0});
  lines.push_back(Line{"outside layers", 0, 0, 0, 0});
  auto line_of = [&](const std::string& kind, int layer) -> Line& {
    if (layer >= 0)
      for (auto& l : lines)
        if (l.kind == kind && l.layers > 0) return l;
    return lines.back();
  };
  for (const auto* m : lookup_adapted(inv, adapted)) {
    auto& l = line_of(m->layer_kind, m->layer);
    l.modules++;
    l.adapter = sat_add(l.adapter, added_by(rule, *m));
  }
  for (const auto* p : trained_base(inv, rule, groups)) {
    auto& l = line_of(p->layer_kind, p->layer);
    l.adapter = sat_add(l.adapter, p->numel());
  }
  for (const auto& t : rule.added_tensors) {
    auto& l = line_of(t.layer_kind, t.layer);
    l.adapter = sat_add(l.adapter, t.numel());
  }
  for (const auto& p : inv.params)
    if (!p.ssm_group.empty() && groups.count(p.ssm_group))
      line_of(p.layer_kind, p.layer).ssm += p.numel();
  if (lines.back().modules == 0 && lines.back().adapter == 0 && lines.back().ssm == 0) lines.pop_back();
  Line total{"total", static_cast<int>(inv.layer_kinds.size()), 0, 0, 0};
  for (const auto& l : lines) {
    total.modules += l.modules;
    total.adapter += l.adapter;
    total.ssm += l.ssm;
  }
  lines.push_back(total);

  const std::string& method = rule.name;
  std::ostringstream os;
  os << "Trainable parameters (" << method << (rule.settings.empty() ? "" : " " + rule.settings)
     << (total.modules > 0 ? " on " + std::to_string(total.modules) + " modules" : std::string()) << "; SSM groups: "
     << (groups.empty() ? std::string("none") : join({groups.begin(), groups.end()})) << "):\n";
  const std::vector<std::string> head = {"layer kind",       "layers",     "adapted modules",
                                         method + " params", "SSM params", "trainable"};
  std::vector<std::vector<std::string>> cells;
  for (const auto& l : lines)
    cells.push_back({l.kind, l.layers > 0 ? std::to_string(l.layers) : "-",
                     std::to_string(l.modules), with_commas(l.adapter), with_commas(l.ssm),
                     with_commas(l.adapter + l.ssm)});
  std::vector<size_t> width(head.size());
  for (size_t c = 0; c < head.size(); ++c) {
    width[c] = head[c].size();
    for (const auto& row : cells) width[c] = std::max(width[c], row[c].size());
  }
  auto print = [&](const std::vector<std::string>& row) {
    os << "  " << pad(row[0], width[0]);
    for (size_t c = 1; c < row.size(); ++c) os << "  " << rpad(row[c], width[c]);
    os << "\n";
  };
  print(head);
  for (const auto& row : cells) print(row);
  os << peft_parameter_line(count) << "\n";
  return os.str();
}

}  // namespace peftfw::adapters
