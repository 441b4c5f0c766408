// Shared config.json field readers.
#include "peftfw/blocks/config_fields.hpp"

#include <limits>
#include <nlohmann/json.hpp>

#include "peftfw/error.hpp"

namespace peftfw::blocks {

void refuse(const io::JsonConfig& j, const std::string& field, const std::string& why) {
  throw InputError(j.path() + ": field '" + field + "': " + why);
}

int64_t positive(const io::JsonConfig& j, const std::string& key, int64_t value) {
  constexpr int64_t kMax = int64_t{1} << 26;
  if (value <= 0) refuse(j, key, "must be a positive integer, found " + std::to_string(value));
  if (value > kMax)
    refuse(j, key, "found " + std::to_string(value) + ", more than the limit " + std::to_string(kMax) +
                       "; is the config's value a typo?");
  return value;
}

int64_t require_dim(const io::JsonConfig& j, const std::string& key) {
  return positive(j, key, j.require_int(key));
}

int64_t dim_or(const io::JsonConfig& j, const std::string& key, int64_t fallback) {
  return positive(j, key, j.is_unset(key) ? fallback : j.require_int(key));
}

void expect_model_type(const io::JsonConfig& j, const std::vector<std::string>& expected) {
  const auto model_type = j.get_string("model_type", "");
  std::string list;
  for (const auto& e : expected) {
    if (e == model_type) return;
    list += (list.empty() ? "\"" : " or \"") + e + "\"";
  }
  refuse(j, "model_type", "expected " + list + ", found \"" + model_type + "\"");
}

int64_t kv_heads(const io::JsonConfig& j, int64_t heads, int64_t absent) {
  const std::string key = "num_key_value_heads";
  const int64_t kv = j.has(key) && j.is_unset(key) ? heads : dim_or(j, key, absent);
  if (heads % kv != 0)
    refuse(j, key, "must divide num_attention_heads (" + std::to_string(heads) + "), found " + std::to_string(kv));
  return kv;
}

std::pair<double, double> time_step_limit(const io::JsonConfig& j) {
  std::pair<double, double> out{0.0, std::numeric_limits<double>::infinity()};
  if (j.is_unset("time_step_limit")) return out;
  const auto& lim = j.raw()["time_step_limit"];
  auto number = [&](const nlohmann::json& v) -> double {
    if (v.is_number()) return v.get<double>();
    if (v.is_object() && v.contains("__float__") && v["__float__"].is_string()) {
      const auto s = v["__float__"].get<std::string>();
      if (s == "Infinity") return std::numeric_limits<double>::infinity();
      if (s == "-Infinity") return -std::numeric_limits<double>::infinity();
    }
    refuse(j, "time_step_limit", "expected [min, max] numbers, found " + v.dump());
  };
  if (!lim.is_array() || lim.size() != 2)
    refuse(j, "time_step_limit", "expected [min, max], found " + lim.dump());
  out = {number(lim[0]), number(lim[1])};
  if (!(out.first <= out.second)) refuse(j, "time_step_limit", "min must be <= max, found " + lim.dump());
  return out;
}

std::string activation(const io::JsonConfig& j, const std::string& key,
                       const std::vector<std::string>& allowed, const std::string& fallback) {
  const auto act = j.get_string(key, fallback);
  std::string list;
  for (const auto& a : allowed) {
    if (a == act) return act;
    list += (list.empty() ? "\"" : ", \"") + a + "\"";
  }
  refuse(j, key, "supported: " + list + "; found \"" + act + "\"");
}

RopeFields rope_fields(const io::JsonConfig& j, double default_partial) {
  RopeFields r;
  r.partial_rotary_factor = j.get_float("partial_rotary_factor", default_partial);
  r.theta = j.get_float("rope_theta", 10000.0);
  if (auto rp = j.optional_child("rope_parameters")) {
    const auto type = rp->get_string("rope_type", "default");
    if (type != "default")
      refuse(j, "rope_parameters.rope_type", "only \"default\" RoPE is supported, found \"" + type + "\"");
    r.theta = rp->get_float("rope_theta", r.theta);
    r.partial_rotary_factor = rp->get_float("partial_rotary_factor", r.partial_rotary_factor);
  }
  if (!(r.partial_rotary_factor > 0.0 && r.partial_rotary_factor <= 1.0))
    refuse(j, "partial_rotary_factor", "must be in (0, 1], found " + std::to_string(r.partial_rotary_factor));
  return r;
}

int64_t dim_or_auto(const io::JsonConfig& j, const std::string& key, int64_t automatic) {
  const auto it = j.raw().find(key);
  if (it == j.raw().end() || it->is_null()) return automatic;
  if (it->is_string()) {
    if (*it == "auto") return automatic;
    refuse(j, key, "expected a positive integer or \"auto\", found \"" + it->get<std::string>() + "\"");
  }
  return require_dim(j, key);
}

}  // namespace peftfw::blocks
