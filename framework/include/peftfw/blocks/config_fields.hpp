// Reading config.json fields that many families share, with errors that name
// the file, the field and what was expected.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "peftfw/io/json_config.hpp"

namespace peftfw::blocks {

[[noreturn]] void refuse(const io::JsonConfig& j, const std::string& field, const std::string& why);

// A dimension: positive, and at most 2^26 so that products of a few cannot overflow before
// the memory check sees the model's size.
int64_t positive(const io::JsonConfig& j, const std::string& key, int64_t value);
int64_t require_dim(const io::JsonConfig& j, const std::string& key);
int64_t dim_or(const io::JsonConfig& j, const std::string& key, int64_t fallback);

// The config's model_type must be one of `expected`.
void expect_model_type(const io::JsonConfig& j, const std::vector<std::string>& expected);

// time_step_limit [min, max] (transformers >= 5 writes infinities as {"__float__": "Infinity"}).
// Returns (0, inf) when unset.
std::pair<double, double> time_step_limit(const io::JsonConfig& j);

// num_key_value_heads: null means one KV head per query head, absent means `absent`; it must
// divide num_attention_heads (`heads`).
int64_t kv_heads(const io::JsonConfig& j, int64_t heads, int64_t absent);

// A dimension that may be "auto" (or null, or absent): then `automatic` (Mamba's time_step_rank).
int64_t dim_or_auto(const io::JsonConfig& j, const std::string& key, int64_t automatic);
// `hidden_act` (or `key`) must be one of `allowed`; returns it.
std::string activation(const io::JsonConfig& j, const std::string& key,
                       const std::vector<std::string>& allowed, const std::string& fallback);

// rope_parameters (or the legacy top-level fields): theta and partial_rotary_factor; only the
// "default" rope_type is accepted.
struct RopeFields {
  double theta = 10000.0;
  double partial_rotary_factor = 1.0;
};
RopeFields rope_fields(const io::JsonConfig& j, double default_partial = 1.0);

}  // namespace peftfw::blocks
