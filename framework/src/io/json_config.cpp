// JsonConfig: typed access to config.json-style objects with errors that name
// the file and field; plus the JSON text reader shared by the checkpoint code.
#include "peftfw/io/json_config.hpp"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "peftfw/error.hpp"

namespace peftfw::io {
namespace {

using nlohmann::json;

// Python's json writes these bare tokens for non-finite floats. Before
// parsing they are swapped for marker strings that the parse callback turns
// back into doubles; a NUL makes the marker impossible to confuse with text
// a config would contain.
struct NonFiniteToken {
  const char* token;
  const char* marker_json;  // as written into the text
  const char* marker;       // as the parser decodes it
  double value;
};

const NonFiniteToken kNonFinite[] = {
    {"-Infinity", "\"\\u0000peftfw:-Infinity\"", "\0peftfw:-Infinity",
     -std::numeric_limits<double>::infinity()},
    {"Infinity", "\"\\u0000peftfw:Infinity\"", "\0peftfw:Infinity",
     std::numeric_limits<double>::infinity()},
    {"NaN", "\"\\u0000peftfw:NaN\"", "\0peftfw:NaN", std::numeric_limits<double>::quiet_NaN()},
};

std::string marker_string(const NonFiniteToken& t) {
  return std::string(t.marker, 1 + std::strlen(t.marker + 1));
}

struct Replacement {
  std::size_t original_pos;
  std::size_t original_len;
  std::size_t new_pos;
  std::size_t new_len;
};

// Returns the text with non-finite tokens outside strings replaced.
std::string replace_non_finite(const std::string& text, std::vector<Replacement>& replacements) {
  std::string out;
  out.reserve(text.size());
  bool in_string = false;
  for (std::size_t i = 0; i < text.size();) {
    const char c = text[i];
    if (in_string) {
      out.push_back(c);
      if (c == '\\' && i + 1 < text.size()) {
        out.push_back(text[i + 1]);
        i += 2;
        continue;
      }
      if (c == '"') in_string = false;
      ++i;
      continue;
    }
    if (c == '"') {
      in_string = true;
      out.push_back(c);
      ++i;
      continue;
    }
    bool replaced = false;
    for (const auto& t : kNonFinite) {
      const std::size_t len = std::strlen(t.token);
      if (text.compare(i, len, t.token) == 0) {
        const std::size_t marker_len = std::strlen(t.marker_json);
        replacements.push_back({i, len, out.size(), marker_len});
        out.append(t.marker_json);
        i += len;
        replaced = true;
        break;
      }
    }
    if (!replaced) {
      out.push_back(c);
      ++i;
    }
  }
  return out;
}

std::size_t original_position(std::size_t pos, const std::vector<Replacement>& replacements) {
  std::size_t shift = 0;
  for (const auto& r : replacements) {
    if (pos < r.new_pos) break;
    if (pos < r.new_pos + r.new_len) return r.original_pos;
    shift += r.new_len - r.original_len;
  }
  return pos - shift;
}

// "line:column" (both 1-based) of byte `pos` in `text`.
std::string line_column(const std::string& text, std::size_t pos) {
  pos = std::min(pos, text.size());
  const auto line = 1 + std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(pos),
                                   '\n');
  const std::size_t line_start = pos == 0 ? std::string::npos : text.rfind('\n', pos - 1);
  const std::size_t column = line_start == std::string::npos ? pos + 1 : pos - line_start;
  return std::to_string(line) + ":" + std::to_string(column);
}

// A JSON string value in a message: quoted, cut to 60 bytes (a value is
// shown beside other text, so it gets less room than a line excerpt).
std::string quote_truncated(const std::string& s) {
  const Excerpt e = make_excerpt(s, 60);
  return json(e.text).dump(-1, ' ', false, json::error_handler_t::replace) + e.note();
}

}  // namespace

std::string Excerpt::note() const {
  return cut ? " (" + std::to_string(original) + " bytes in all)" : std::string();
}

Excerpt make_excerpt(std::string_view text, std::size_t max_bytes) {
  Excerpt e;
  e.original = text.size();
  if (text.size() <= max_bytes) {
    e.text = std::string(text);
    return e;
  }
  // Back up to the start of a UTF-8 character (at most 3 continuation bytes)
  // so that the excerpt is not cut inside one.
  std::size_t cut = max_bytes;
  for (int i = 0; i < 3 && cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80; ++i) {
    --cut;
  }
  e.text = std::string(text.substr(0, cut)) + "...";
  e.cut = true;
  return e;
}

std::string excerpt(std::string_view text, std::size_t max_bytes) {
  const Excerpt e = make_excerpt(text, max_bytes);
  return e.text + e.note();
}

std::string json_error_detail(const std::string& what) {
  std::string detail = what;
  if (const auto column = what.find("column "); column != std::string::npos) {
    if (const auto colon = what.find(": ", column); colon != std::string::npos) {
      detail = what.substr(colon + 2);
    }
  } else if (const auto bracket = what.find("] "); bracket != std::string::npos) {
    detail = what.substr(bracket + 2);
  }
  // "...; last read: '<the token so far>'": cut the token, keep the description.
  const std::string marker = "last read: '";
  const auto at = detail.find(marker);
  if (at != std::string::npos && detail.size() > at + marker.size() && detail.back() == '\'') {
    const std::size_t begin = at + marker.size();
    const Excerpt token =
        make_excerpt(std::string_view(detail).substr(begin, detail.size() - 1 - begin));
    return detail.substr(0, begin) + token.text + "'" + token.note();
  }
  return excerpt(detail);
}

std::string describe_json_value(const json& value) {
  switch (value.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return value.get<bool>() ? "boolean true" : "boolean false";
    case json::value_t::string:
      return "string " + quote_truncated(value.get<std::string>());
    case json::value_t::number_integer:
      return "integer " + std::to_string(value.get<int64_t>());
    case json::value_t::number_unsigned:
      return "integer " + std::to_string(value.get<uint64_t>());
    case json::value_t::number_float: {
      const double d = value.get<double>();
      if (std::isnan(d)) return "float NaN";
      if (std::isinf(d)) return d > 0 ? "float Infinity" : "float -Infinity";
      return "float " + value.dump();
    }
    case json::value_t::array:
      return "array of " + std::to_string(value.size()) +
             (value.size() == 1 ? " element" : " elements");
    case json::value_t::object:
      return "object";
    default:
      return "unsupported value";
  }
}

std::string read_text_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT || err == ENOTDIR) throw InputError(path + ": no such file");
    throw RuntimeError(path + ": cannot open: " + std::strerror(err));
  }
  struct stat st {};
  if (::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw InputError(path + ": is a directory, expected a file");
  }
  std::string text;
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      throw RuntimeError(path + ": read failed: " + std::strerror(err));
    }
    text.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return text;
}

json parse_json_text(const std::string& text, const std::string& source) {
  // nlohmann 3.11.3 words an empty input differently from 3.11.2; say it one way on both.
  if (text.empty())
    throw InputError(source + ":1:1: invalid JSON (byte 0): unexpected end of input (the text is empty)");
  // nlohmann's lexer treats a NUL byte as the end of input, which would
  // silently drop the rest of the file.
  if (const auto nul = text.find('\0'); nul != std::string::npos) {
    throw InputError(source + ":" + line_column(text, nul) + ": invalid JSON (byte " +
                     std::to_string(nul) + "): NUL byte in the text");
  }
  std::vector<Replacement> replacements;
  const std::string prepared = replace_non_finite(text, replacements);
  bool marker_as_key = false;
  const json::parser_callback_t restore = [&](int /*depth*/, json::parse_event_t event,
                                              json& parsed) {
    if (replacements.empty() || !parsed.is_string()) return true;
    const auto& s = parsed.get_ref<const std::string&>();
    if (s.empty() || s[0] != '\0') return true;
    for (const auto& t : kNonFinite) {
      if (s == marker_string(t)) {
        if (event == json::parse_event_t::key) {
          marker_as_key = true;
        } else {
          parsed = t.value;
        }
        break;
      }
    }
    return true;
  };
  json result;
  try {
    result = json::parse(prepared, restore);
  } catch (const json::parse_error& e) {
    const std::size_t pos = original_position(e.byte > 0 ? e.byte - 1 : 0, replacements);
    throw InputError(source + ":" + line_column(text, pos) + ": invalid JSON (byte " +
                     std::to_string(pos) + "): " + json_error_detail(e.what()));
  } catch (const json::out_of_range& e) {
    // A number beyond a double (1e999); nlohmann gives no position for it.
    throw InputError(source + ": invalid JSON: " + json_error_detail(e.what()) +
                     " (a number beyond the range of a 64-bit float)");
  }
  if (marker_as_key) {
    throw InputError(source + ": invalid JSON: NaN or Infinity used as an object key");
  }
  return result;
}

JsonConfig::JsonConfig(std::shared_ptr<const json> root, const json* node, std::string source,
                       std::string prefix)
    : root_(std::move(root)), node_(node), source_(std::move(source)), prefix_(std::move(prefix)) {}

JsonConfig JsonConfig::load(const std::string& path) { return parse(read_text_file(path), path); }

JsonConfig JsonConfig::parse(const std::string& text, const std::string& source) {
  auto root = std::make_shared<const json>(parse_json_text(text, source));
  if (!root->is_object()) {
    throw InputError(source + ": expected a JSON object at the top level, found " +
                     describe_json_value(*root));
  }
  const json* node = root.get();
  return JsonConfig(std::move(root), node, source, "");
}

const json* JsonConfig::find(const std::string& key) const {
  const auto it = node_->find(key);
  return it == node_->end() ? nullptr : &*it;
}

bool JsonConfig::has(const std::string& key) const { return find(key) != nullptr; }

bool JsonConfig::is_unset(const std::string& key) const {
  const json* v = find(key);
  return v == nullptr || v->is_null();
}

std::vector<std::string> JsonConfig::keys() const {
  std::vector<std::string> out;
  for (auto it = node_->begin(); it != node_->end(); ++it) out.push_back(it.key());
  return out;
}

const json& JsonConfig::require(const std::string& key) const {
  const json* v = find(key);
  if (v == nullptr) {
    throw InputError(source_ + ": missing required field '" + field_name(key) + "'");
  }
  return *v;
}

void JsonConfig::type_error(const std::string& field, const char* expected,
                            const json& found) const {
  throw InputError(source_ + ": field '" + field + "': expected " + expected + ", found " +
                   describe_json_value(found));
}

int64_t JsonConfig::as_int(const std::string& field, const json& value) const {
  if (value.is_number_unsigned()) {
    const auto u = value.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      type_error(field, "an integer that fits in 64 bits", value);
    }
    return static_cast<int64_t>(u);
  }
  if (value.is_number_integer()) return value.get<int64_t>();
  type_error(field, "an integer", value);
}

double JsonConfig::as_float(const std::string& field, const json& value) const {
  if (value.is_number()) return value.get<double>();
  type_error(field, "a number", value);
}

int64_t JsonConfig::require_int(const std::string& key) const {
  return as_int(field_name(key), require(key));
}

double JsonConfig::require_float(const std::string& key) const {
  return as_float(field_name(key), require(key));
}

std::string JsonConfig::require_string(const std::string& key) const {
  const json& v = require(key);
  if (!v.is_string()) type_error(field_name(key), "a string", v);
  return v.get<std::string>();
}

bool JsonConfig::require_bool(const std::string& key) const {
  const json& v = require(key);
  if (!v.is_boolean()) type_error(field_name(key), "a boolean", v);
  return v.get<bool>();
}

std::vector<int64_t> JsonConfig::require_int_list(const std::string& key) const {
  const json& v = require(key);
  if (!v.is_array()) type_error(field_name(key), "an array of integers", v);
  std::vector<int64_t> out;
  for (std::size_t i = 0; i < v.size(); ++i) {
    out.push_back(as_int(field_name(key) + "[" + std::to_string(i) + "]", v[i]));
  }
  return out;
}

std::vector<double> JsonConfig::require_float_list(const std::string& key) const {
  const json& v = require(key);
  if (!v.is_array()) type_error(field_name(key), "an array of numbers", v);
  std::vector<double> out;
  for (std::size_t i = 0; i < v.size(); ++i) {
    out.push_back(as_float(field_name(key) + "[" + std::to_string(i) + "]", v[i]));
  }
  return out;
}

std::vector<std::string> JsonConfig::require_string_list(const std::string& key) const {
  const json& v = require(key);
  if (!v.is_array()) type_error(field_name(key), "an array of strings", v);
  std::vector<std::string> out;
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (!v[i].is_string()) {
      type_error(field_name(key) + "[" + std::to_string(i) + "]", "a string", v[i]);
    }
    out.push_back(v[i].get<std::string>());
  }
  return out;
}

std::optional<int64_t> JsonConfig::optional_int(const std::string& key) const {
  if (is_unset(key)) return std::nullopt;
  return require_int(key);
}

std::optional<double> JsonConfig::optional_float(const std::string& key) const {
  if (is_unset(key)) return std::nullopt;
  return require_float(key);
}

std::optional<std::string> JsonConfig::optional_string(const std::string& key) const {
  if (is_unset(key)) return std::nullopt;
  return require_string(key);
}

std::optional<bool> JsonConfig::optional_bool(const std::string& key) const {
  if (is_unset(key)) return std::nullopt;
  return require_bool(key);
}

int64_t JsonConfig::get_int(const std::string& key, int64_t fallback) const {
  return optional_int(key).value_or(fallback);
}

double JsonConfig::get_float(const std::string& key, double fallback) const {
  return optional_float(key).value_or(fallback);
}

std::string JsonConfig::get_string(const std::string& key, const std::string& fallback) const {
  return optional_string(key).value_or(fallback);
}

bool JsonConfig::get_bool(const std::string& key, bool fallback) const {
  return optional_bool(key).value_or(fallback);
}

JsonConfig JsonConfig::child(const std::string& key) const {
  const json& v = require(key);
  if (!v.is_object()) type_error(field_name(key), "an object", v);
  return JsonConfig(root_, &v, source_, field_name(key) + ".");
}

std::optional<JsonConfig> JsonConfig::optional_child(const std::string& key) const {
  if (is_unset(key)) return std::nullopt;
  return child(key);
}

}  // namespace peftfw::io
