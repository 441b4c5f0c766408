// JSONL reading with per-line error reports, prompt templates, and the
// seeded train/eval split with its split.json record.
#include "peftfw/data/dataset.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <stdexcept>
#include <system_error>

#include <nlohmann/json.hpp>

#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/io/safetensors.hpp"

namespace peftfw::data {

using nlohmann::json;

// ---------------------------------------------------------------------------
// Random numbers.

uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t SplitMix64::next() {
  state_ += 0x9E3779B97F4A7C15ULL;
  return mix64(state_);
}

uint64_t SplitMix64::below(uint64_t bound) {
  if (bound == 0) throw std::invalid_argument("SplitMix64::below: bound must be positive");
  // 2^64 mod bound, computed in 64 bits: (2^64 - bound) mod bound.
  const uint64_t threshold = (0 - bound) % bound;
  for (;;) {
    const uint64_t r = next();
    if (r >= threshold) return r % bound;
  }
}

int64_t SplitMix64::between(int64_t lo, int64_t hi) {
  if (lo > hi) throw std::invalid_argument("SplitMix64::between: lo > hi");
  const uint64_t span = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo) + 1;
  if (span == 0) return static_cast<int64_t>(next());  // the full 64-bit range
  return static_cast<int64_t>(static_cast<uint64_t>(lo) + below(span));
}

bool SplitMix64::chance(uint64_t numerator, uint64_t denominator) {
  return below(denominator) < numerator;
}

uint64_t derive_seed(uint64_t seed, uint64_t stream) {
  return mix64(seed ^ mix64(stream + 0x9E3779B97F4A7C15ULL));
}

std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> v(static_cast<std::size_t>(std::max<int64_t>(n, 0)));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<int64_t>(i);
  SplitMix64 rng(seed);
  shuffle_in_place(v, rng);
  return v;
}

// ---------------------------------------------------------------------------
// SHA-256 (FIPS 180-4).

namespace {

constexpr std::array<uint32_t, 64> kSha256K = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

void sha256_block(std::array<uint32_t, 8>& h, const uint8_t* block) {
  uint32_t w[64];
  for (int i = 0; i < 16; ++i) {
    w[i] = (uint32_t(block[4 * i]) << 24) | (uint32_t(block[4 * i + 1]) << 16) |
           (uint32_t(block[4 * i + 2]) << 8) | uint32_t(block[4 * i + 3]);
  }
  for (int i = 16; i < 64; ++i) {
    const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
    const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
  for (int i = 0; i < 64; ++i) {
    const uint32_t s1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
    const uint32_t ch = (e & f) ^ (~e & g);
    const uint32_t t1 = hh + s1 + ch + kSha256K[static_cast<std::size_t>(i)] + w[i];
    const uint32_t s0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
    const uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
    const uint32_t t2 = s0 + maj;
    hh = g;
    g = f;
    f = e;
    e = d + t1;
    d = c;
    c = b;
    b = a;
    a = t1 + t2;
  }
  h[0] += a;
  h[1] += b;
  h[2] += c;
  h[3] += d;
  h[4] += e;
  h[5] += f;
  h[6] += g;
  h[7] += hh;
}

}  // namespace

std::string sha256_hex(std::string_view bytes) {
  std::array<uint32_t, 8> h = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  const std::size_t n = bytes.size();
  std::size_t full = n / 64;
  for (std::size_t i = 0; i < full; ++i) sha256_block(h, data + 64 * i);
  // Padding: 0x80, zeros, then the bit length as a big-endian 64-bit number.
  uint8_t tail[128] = {};
  const std::size_t rest = n - 64 * full;
  if (rest > 0) std::memcpy(tail, data + 64 * full, rest);
  tail[rest] = 0x80;
  const std::size_t tail_len = rest + 1 + 8 <= 64 ? 64 : 128;
  const uint64_t bits = static_cast<uint64_t>(n) * 8;
  for (int i = 0; i < 8; ++i) tail[tail_len - 1 - i] = static_cast<uint8_t>(bits >> (8 * i));
  for (std::size_t off = 0; off < tail_len; off += 64) sha256_block(h, tail + off);
  static const char* kHex = "0123456789abcdef";
  std::string out;
  out.reserve(64);
  for (uint32_t word : h) {
    for (int shift = 28; shift >= 0; shift -= 4) out.push_back(kHex[(word >> shift) & 0xF]);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Names.

std::optional<DataFormat> data_format_from_name(std::string_view name) {
  if (name == "auto") return DataFormat::Auto;
  if (name == "instruction") return DataFormat::Instruction;
  if (name == "text") return DataFormat::Text;
  if (name == "messages") return DataFormat::Messages;
  return std::nullopt;
}

const char* data_format_name(DataFormat format) {
  switch (format) {
    case DataFormat::Auto:
      return "auto";
    case DataFormat::Instruction:
      return "instruction";
    case DataFormat::Text:
      return "text";
    case DataFormat::Messages:
      return "messages";
  }
  return "?";
}

std::optional<BadLinePolicy> bad_line_policy_from_name(std::string_view name) {
  if (name == "error") return BadLinePolicy::Error;
  if (name == "skip") return BadLinePolicy::Skip;
  return std::nullopt;
}

DataFormat Example::format() const {
  if (std::holds_alternative<InstructionExample>(body)) return DataFormat::Instruction;
  if (std::holds_alternative<TextExample>(body)) return DataFormat::Text;
  return DataFormat::Messages;
}

std::string BadLines::skipped_summary() const {
  if (count == 0) return "";
  const std::string first_message = first.empty() ? std::string() : first.front();
  if (count == 1) return "skipped 1 malformed line (" + first_message + ")";
  return "skipped " + std::to_string(count) + " malformed lines (first: " + first_message + ")";
}

// ---------------------------------------------------------------------------
// JSONL.

namespace {

bool is_blank(std::string_view line) {
  return std::all_of(line.begin(), line.end(),
                     [](char c) { return c == ' ' || c == '\t' || c == '\r'; });
}

// A line that is not a valid example; `what` has no "file:line: " prefix.
struct LineError {
  std::string what;
};

using LineResult = std::variant<Example, LineError>;

std::string mistyped(const std::string& field, const char* expected, const json& found) {
  return "field '" + field + "': expected " + expected + ", found " +
         io::describe_json_value(found);
}

// Reads a required string field; returns an error message or nullopt.
std::optional<std::string> read_string(const json& obj, const char* key, bool required,
                                       const std::string& missing_context, std::string& out) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) {
    if (required) return "missing field '" + std::string(key) + "'" + missing_context;
    out.clear();
    return std::nullopt;
  }
  if (!it->is_string()) return mistyped(key, "a string", *it);
  out = it->get<std::string>();
  return std::nullopt;
}

LineResult parse_instruction(const json& obj, int64_t line, const std::string& context) {
  InstructionExample ex;
  if (auto e = read_string(obj, "instruction", true, context, ex.instruction)) return LineError{*e};
  if (auto e = read_string(obj, "input", false, context, ex.input)) return LineError{*e};
  if (auto e = read_string(obj, "output", true, context, ex.output)) return LineError{*e};
  return Example{std::move(ex), line};
}

LineResult parse_text(const json& obj, int64_t line, const std::string& context) {
  TextExample ex;
  if (auto e = read_string(obj, "text", true, context, ex.text)) return LineError{*e};
  return Example{std::move(ex), line};
}

LineResult parse_messages(const json& obj, int64_t line, const std::string& context) {
  const auto it = obj.find("messages");
  if (it == obj.end() || it->is_null()) return LineError{"missing field 'messages'" + context};
  if (!it->is_array()) {
    return LineError{mistyped("messages", "an array of {role, content} objects", *it)};
  }
  if (it->empty()) {
    return LineError{"field 'messages': expected at least one message, found an empty array"};
  }
  ChatExample ex;
  for (std::size_t i = 0; i < it->size(); ++i) {
    const json& m = (*it)[i];
    const std::string name = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) {
      return LineError{mistyped(name, "an object with role and content", m)};
    }
    ChatMessage message;
    for (const char* key : {"role", "content"}) {
      const auto f = m.find(key);
      const std::string field = name + "." + key;
      if (f == m.end() || f->is_null()) return LineError{"missing field '" + field + "'"};
      if (!f->is_string()) return LineError{mistyped(field, "a string", *f)};
      (std::strcmp(key, "role") == 0 ? message.role : message.content) = f->get<std::string>();
    }
    if (message.role.empty()) {
      return LineError{"field '" + name + ".role': expected a non-empty string, found string \"\""};
    }
    ex.messages.push_back(std::move(message));
  }
  return Example{std::move(ex), line};
}

LineResult parse_as(DataFormat format, const json& obj, int64_t line,
                    const std::string& context) {
  switch (format) {
    case DataFormat::Instruction:
      return parse_instruction(obj, line, context);
    case DataFormat::Text:
      return parse_text(obj, line, context);
    case DataFormat::Messages:
      return parse_messages(obj, line, context);
    case DataFormat::Auto:
      break;
  }
  throw std::logic_error("parse_as: format must be resolved");
}

// The format an object's fields suggest: messages, then instruction, then text.
std::optional<DataFormat> detect_format(const json& obj) {
  if (obj.contains("messages")) return DataFormat::Messages;
  if (obj.contains("instruction")) return DataFormat::Instruction;
  if (obj.contains("text")) return DataFormat::Text;
  return std::nullopt;
}

// The object's field names for a message, cut like any excerpt of the line
// (a line can hold a million fields, or one very long name).
std::string key_list(const json& obj) {
  std::string keys;
  for (const auto& item : obj.items()) {
    if (!keys.empty()) keys += ", ";
    keys += item.key();
    if (keys.size() > io::kMaxExcerptBytes) {
      return io::make_excerpt(keys).text + " (" + std::to_string(obj.size()) + " fields)";
    }
  }
  return keys.empty() ? "none" : keys;
}

}  // namespace

Dataset parse_jsonl(std::string_view text, const std::string& source,
                    const ReadOptions& options) {
  Dataset out;
  out.source = source;
  out.sha256 = sha256_hex(text);
  out.format = options.format;

  BadLines bad;
  auto report = [&](int64_t line, const std::string& what) {
    ++bad.count;
    if (bad.first.size() < BadLines::kMaxListed) {
      bad.first.push_back(source + ":" + std::to_string(line) + ": " + what);
    }
  };
  const bool explicit_format = options.format != DataFormat::Auto;
  std::string context;
  if (explicit_format) {
    context = std::string(" (data.format = ") + data_format_name(options.format) + ")";
  }

  if (text.size() >= 3 && text.substr(0, 3) == "\xEF\xBB\xBF") text.remove_prefix(3);

  int64_t lineno = 0;
  int64_t nonblank = 0;
  std::size_t pos = 0;
  while (pos < text.size()) {
    const std::size_t end = std::min(text.find('\n', pos), text.size());
    const std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++lineno;
    if (is_blank(line)) continue;
    ++nonblank;

    json obj;
    try {
      obj = json::parse(line.begin(), line.end());
    } catch (const json::parse_error& e) {
      // The detail quotes the line ("last read: '...'", for an unclosed
      // string the rest of it), cut so that a 100 MB line does not come back.
      report(lineno, "invalid JSON at column " + std::to_string(std::max<std::size_t>(e.byte, 1)) +
                         ": " + io::json_error_detail(e.what()));
      continue;
    } catch (const json::out_of_range& e) {
      // A number beyond a double (1e999); nlohmann gives no column for it.
      report(lineno, "invalid JSON: " + io::json_error_detail(e.what()) +
                         " (a number beyond the range of a 64-bit float)");
      continue;
    }
    if (!obj.is_object()) {
      report(lineno, "expected a JSON object, found " + io::describe_json_value(obj));
      continue;
    }
    DataFormat format = out.format;
    if (format == DataFormat::Auto) {
      const auto detected = detect_format(obj);
      if (!detected) {
        report(lineno,
               "cannot tell the format: no field 'instruction', 'text' or 'messages' (fields: " +
                   key_list(obj) + "; data.format = auto)");
        continue;
      }
      format = *detected;
    }
    LineResult result = parse_as(format, obj, lineno, context);
    if (auto* err = std::get_if<LineError>(&result)) {
      report(lineno, err->what);
      continue;
    }
    if (out.format == DataFormat::Auto) {
      out.format = format;
      out.format_line = lineno;
      context = std::string(" (format ") + data_format_name(format) + ", detected from line " +
                std::to_string(lineno) + ")";
    }
    out.examples.push_back(std::move(std::get<Example>(result)));
  }

  if (bad.count > 0 && options.on_bad_line == BadLinePolicy::Error) {
    std::ostringstream msg;
    msg << source << ": " << bad.count << " malformed line" << (bad.count == 1 ? "" : "s")
        << " (data.on_bad_line = \"error\"):";
    for (const auto& m : bad.first) msg << "\n  " << m;
    const int64_t listed = static_cast<int64_t>(bad.first.size());
    if (bad.count > listed) msg << "\n  ... and " << (bad.count - listed) << " more";
    msg << "\nFix or remove " << (bad.count == 1 ? "it" : "them")
        << ", or set data.on_bad_line = \"skip\" to train without "
        << (bad.count == 1 ? "it" : "them") << " (the run reports how many were skipped).";
    throw InputError(msg.str());
  }
  if (out.examples.empty()) {
    if (nonblank == 0) {
      throw InputError(source + ": no examples: the file is empty or holds only blank lines");
    }
    throw InputError(source + ": no valid examples: all " + std::to_string(bad.count) +
                     " non-blank lines are malformed (first: " + bad.first.front() + ")");
  }
  out.skipped = std::move(bad);
  return out;
}

Dataset read_jsonl(const std::string& path, const ReadOptions& options) {
  const std::string text = io::read_text_file(path);
  return parse_jsonl(text, path, options);
}

// ---------------------------------------------------------------------------
// Templates.

namespace {

const char* kAlpacaWithInput =
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n";
const char* kAlpacaNoInput =
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n";

// Appends `text` as a segment of kind `response`, merging with the last
// segment when it has the same kind; empty text adds nothing.
void append(RenderedExample& out, const std::string& text, bool response) {
  if (text.empty()) return;
  if (!out.segments.empty() && out.segments.back().response == response) {
    out.segments.back().text += text;
  } else {
    out.segments.push_back({text, response});
  }
}

std::optional<std::size_t> last_assistant(const ChatExample& ex) {
  for (std::size_t i = ex.messages.size(); i > 0; --i) {
    if (ex.messages[i - 1].role == "assistant") return i - 1;
  }
  return std::nullopt;
}

const char* formats_supported(TemplateKind kind) {
  switch (kind) {
    case TemplateKind::Chat:
      return "instruction and messages examples";
    case TemplateKind::Alpaca:
    case TemplateKind::Custom:
      return "instruction examples";
    case TemplateKind::Raw:
      return "text examples";
  }
  return "";
}

}  // namespace

std::string RenderedExample::text() const {
  std::string out;
  for (const auto& s : segments) out += s.text;
  return out;
}

std::string RenderedExample::prompt_text() const {
  std::string out;
  for (const auto& s : segments) {
    if (!s.response) out += s.text;
  }
  return out;
}

PromptTemplate PromptTemplate::chat(ChatFormat format, std::string system_prompt) {
  PromptTemplate t(TemplateKind::Chat, std::move(system_prompt));
  t.chat_ = std::move(format);
  return t;
}

PromptTemplate PromptTemplate::alpaca() { return PromptTemplate(TemplateKind::Alpaca, ""); }

PromptTemplate PromptTemplate::raw() { return PromptTemplate(TemplateKind::Raw, ""); }

PromptTemplate PromptTemplate::custom(std::string_view template_string, const std::string& source) {
  PromptTemplate t(TemplateKind::Custom, "");
  const std::string hint =
      " (placeholders: {instruction}, {input}, {output}; write {{ and }} for literal braces)";
  std::string literal;
  int outputs = 0;
  auto flush = [&] {
    if (!literal.empty()) t.pieces_.push_back({Piece::Literal, std::move(literal)});
    literal.clear();
  };
  for (std::size_t i = 0; i < template_string.size(); ++i) {
    const char c = template_string[i];
    if (c == '}') {
      if (i + 1 < template_string.size() && template_string[i + 1] == '}') {
        literal.push_back('}');
        ++i;
        continue;
      }
      throw InputError(source + ": unmatched '}' at offset " + std::to_string(i) + hint);
    }
    if (c != '{') {
      literal.push_back(c);
      continue;
    }
    if (i + 1 < template_string.size() && template_string[i + 1] == '{') {
      literal.push_back('{');
      ++i;
      continue;
    }
    const std::size_t close = template_string.find('}', i + 1);
    if (close == std::string_view::npos) {
      throw InputError(source + ": unclosed '{' at offset " + std::to_string(i) + hint);
    }
    const std::string_view name = template_string.substr(i + 1, close - i - 1);
    Piece::Kind kind;
    if (name == "instruction") {
      kind = Piece::Instruction;
    } else if (name == "input") {
      kind = Piece::Input;
    } else if (name == "output") {
      kind = Piece::Output;
      ++outputs;
    } else {
      throw InputError(source + ": unknown placeholder {" + io::excerpt(name) + "} at offset " +
                       std::to_string(i) + hint);
    }
    flush();
    t.pieces_.push_back({kind, ""});
    i = close;
  }
  flush();
  if (outputs != 1) {
    throw InputError(source + ": the template must contain {output} exactly once, found " +
                     std::to_string(outputs) +
                     " (the text from {output} on is the response the model learns)");
  }
  return t;
}

PromptTemplate PromptTemplate::named(std::string_view name, const std::vector<ChatFormat>& chat_formats,
                                     std::string system_prompt) {
  if (name == "alpaca") return alpaca();
  if (name == "raw") return raw();
  std::string chats;
  for (const auto& f : chat_formats) {
    if (f.name == name) return chat(f, std::move(system_prompt));
    chats += ", " + f.name + " (" + f.description + ")";
  }
  const io::Excerpt shown = io::make_excerpt(name);
  throw InputError("data.template: unknown template \"" + shown.text + "\"" + shown.note() +
                   "; expected alpaca, raw" + chats + " (or set data.template_string to a custom template)");
}

std::string PromptTemplate::name() const {
  switch (kind_) {
    case TemplateKind::Chat:
      return chat_.name;
    case TemplateKind::Alpaca:
      return "alpaca";
    case TemplateKind::Raw:
      return "raw";
    case TemplateKind::Custom:
      return "custom";
  }
  return "?";
}

bool PromptTemplate::supports(DataFormat format) const {
  switch (kind_) {
    case TemplateKind::Chat:
      return format == DataFormat::Instruction || format == DataFormat::Messages;
    case TemplateKind::Alpaca:
    case TemplateKind::Custom:
      return format == DataFormat::Instruction;
    case TemplateKind::Raw:
      return format == DataFormat::Text;
  }
  return false;
}

void PromptTemplate::unsupported(DataFormat format, const std::string& where) const {
  std::string hint;
  if (format == DataFormat::Text) {
    hint = "; text examples are rendered as is: set data.template = \"raw\"";
  } else if (format == DataFormat::Messages) {
    hint = "; chat examples need a chat template: set data.template to the model's chat format "
           "(`peftfw plugins` lists them)";
  } else {
    hint = "; use a chat format or \"alpaca\" as data.template, or a data.template_string";
  }
  throw InputError(where + ": template " + name() + " cannot render " + data_format_name(format) +
                   " examples (it renders " + formats_supported(kind_) + ")" + hint);
}

void PromptTemplate::check_format(DataFormat format, const std::string& source) const {
  if (!supports(format)) unsupported(format, source);
}

RenderedExample PromptTemplate::render_instruction(const InstructionExample& ex) const {
  RenderedExample out;
  switch (kind_) {
    case TemplateKind::Chat: {
      std::string prompt;
      if (!system_prompt_.empty()) prompt += chat_.turn("system", system_prompt_);
      prompt += chat_.turn("user", ex.input.empty() ? ex.instruction : ex.instruction + "\n\n" + ex.input);
      prompt += chat_.header("assistant");
      append(out, prompt, false);
      append(out, ex.output + chat_.turn_end, true);
      break;
    }
    case TemplateKind::Alpaca: {
      std::string prompt = ex.input.empty() ? kAlpacaNoInput : kAlpacaWithInput;
      prompt += "### Instruction:\n" + ex.instruction + "\n\n";
      if (!ex.input.empty()) prompt += "### Input:\n" + ex.input + "\n\n";
      prompt += "### Response:\n";
      append(out, prompt, false);
      append(out, ex.output, true);
      break;
    }
    case TemplateKind::Custom: {
      bool response = false;
      for (const auto& p : pieces_) {
        switch (p.kind) {
          case Piece::Literal:
            append(out, p.text, response);
            break;
          case Piece::Instruction:
            append(out, ex.instruction, response);
            break;
          case Piece::Input:
            append(out, ex.input, response);
            break;
          case Piece::Output:
            response = true;
            append(out, ex.output, response);
            break;
        }
      }
      break;
    }
    case TemplateKind::Raw:
      throw std::logic_error("render_instruction: raw template");
  }
  return out;
}

RenderedExample PromptTemplate::render_chat(const ChatExample& ex) const {
  RenderedExample out;
  for (const auto& m : ex.messages) {
    if (m.role == "assistant") {
      append(out, chat_.header(m.role), false);
      append(out, m.content + chat_.turn_end, true);
    } else {
      append(out, chat_.turn(m.role, m.content), false);
    }
  }
  return out;
}

RenderedExample PromptTemplate::render(const Example& example) const {
  const DataFormat format = example.format();
  if (!supports(format)) unsupported(format, "line " + std::to_string(example.line));
  if (const auto* ins = std::get_if<InstructionExample>(&example.body)) {
    return render_instruction(*ins);
  }
  if (const auto* chat = std::get_if<ChatExample>(&example.body)) return render_chat(*chat);
  RenderedExample out;
  append(out, std::get<TextExample>(example.body).text, true);
  return out;
}

std::string PromptTemplate::render_prompt(const Example& example) const {
  const DataFormat format = example.format();
  const std::string where = "line " + std::to_string(example.line);
  if (format == DataFormat::Text) {
    throw InputError(where + ": text examples have no prompt/response split to evaluate on; "
                             "evaluation needs instruction or messages data");
  }
  if (!supports(format)) unsupported(format, where);
  if (const auto* ins = std::get_if<InstructionExample>(&example.body)) {
    return render_instruction(*ins).prompt_text();
  }
  const auto& chat = std::get<ChatExample>(example.body);
  const auto last = last_assistant(chat);
  if (!last) {
    throw InputError(where + ": the chat has no assistant message to evaluate against");
  }
  std::string prompt;
  for (std::size_t i = 0; i < *last; ++i) {
    prompt += chat_.turn(chat.messages[i].role, chat.messages[i].content);
  }
  return prompt + chat_.header("assistant");
}

std::string expected_output(const Example& example) {
  if (const auto* ins = std::get_if<InstructionExample>(&example.body)) return ins->output;
  const std::string where = "line " + std::to_string(example.line);
  if (const auto* chat = std::get_if<ChatExample>(&example.body)) {
    const auto last = last_assistant(*chat);
    if (!last) {
      throw InputError(where + ": the chat has no assistant message to evaluate against");
    }
    return chat->messages[*last].content;
  }
  throw InputError(where + ": text examples have no expected output to evaluate against");
}

// ---------------------------------------------------------------------------
// Split.

namespace {

constexpr int64_t kSplitFormatVersion = 1;

int64_t eval_count(double fraction, int64_t n) {
  const double x = fraction * static_cast<double>(n);
  const double nearest = std::round(x);
  if (std::fabs(x - nearest) <= 1e-9) return static_cast<int64_t>(nearest);
  return static_cast<int64_t>(std::ceil(x));
}

std::string fraction_text(double f) {
  std::ostringstream s;
  s.precision(17);
  s << f;
  return s.str();
}

std::string index_list(const std::vector<int64_t>& v) {
  std::string out = "[";
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (i) out += ",";
    out += std::to_string(v[i]);
  }
  return out + "]";
}

}  // namespace

DataSplit make_split(const Dataset& dataset, double eval_fraction, uint64_t seed) {
  const int64_t n = static_cast<int64_t>(dataset.examples.size());
  if (!(eval_fraction >= 0.0 && eval_fraction < 1.0)) {
    throw InputError("data.eval_fraction: expected a number in [0, 1), found " +
                     fraction_text(eval_fraction));
  }
  const int64_t n_eval = eval_count(eval_fraction, n);
  if (n - n_eval < 1) {
    throw InputError("data.eval_fraction = " + fraction_text(eval_fraction) + " holds out " +
                     std::to_string(n_eval) + " of the " + std::to_string(n) + " examples of " +
                     dataset.source + ", leaving none to train on; lower it or add data");
  }
  DataSplit split;
  split.data_source = dataset.source;
  split.data_sha256 = dataset.sha256;
  split.data_format = data_format_name(dataset.format);
  split.num_examples = n;
  split.eval_fraction = eval_fraction;
  split.seed = seed;
  const auto perm = seeded_permutation(n, seed);
  split.eval.assign(perm.begin(), perm.begin() + n_eval);
  split.train.assign(perm.begin() + n_eval, perm.end());
  std::sort(split.eval.begin(), split.eval.end());
  std::sort(split.train.begin(), split.train.end());
  return split;
}

std::string write_split(const DataSplit& split, const std::string& run_dir) {
  std::error_code ec;
  std::filesystem::create_directories(run_dir, ec);
  if (ec) {
    throw RuntimeError("cannot create the run folder " + run_dir + " for split.json: " +
                       ec.message());
  }
  const std::string path = (std::filesystem::path(run_dir) / "split.json").string();
  // Written by hand so that the header stays readable and each index list is
  // one line (a pretty-printer puts every index on its own line).
  std::ostringstream s;
  s << "{\n"
    << "  \"format_version\": " << kSplitFormatVersion << ",\n"
    << "  \"data_source\": " << json(split.data_source).dump() << ",\n"
    << "  \"data_sha256\": " << json(split.data_sha256).dump() << ",\n"
    << "  \"data_format\": " << json(split.data_format).dump() << ",\n"
    << "  \"num_examples\": " << split.num_examples << ",\n"
    << "  \"num_train\": " << split.train.size() << ",\n"
    << "  \"num_eval\": " << split.eval.size() << ",\n"
    << "  \"eval_fraction\": " << json(split.eval_fraction).dump() << ",\n"
    << "  \"split_seed\": " << split.seed << ",\n"
    << "  \"split_method\": \"splitmix64-fisher-yates: eval = first ceil(fraction*n) of the "
       "permutation; indices into the valid examples, ascending\",\n"
    << "  \"train\": " << index_list(split.train) << ",\n"
    << "  \"eval\": " << index_list(split.eval) << "\n"
    << "}\n";
  io::write_file_atomic(path, s.str());
  return path;
}

DataSplit read_split(const std::string& path) {
  const auto config = io::JsonConfig::load(path);
  const int64_t version = config.require_int("format_version");
  if (version != kSplitFormatVersion) {
    throw InputError(path + ": field 'format_version': expected " +
                     std::to_string(kSplitFormatVersion) + ", found " + std::to_string(version) +
                     " (written by another peftfw version)");
  }
  DataSplit split;
  split.data_source = config.require_string("data_source");
  split.data_sha256 = config.require_string("data_sha256");
  split.data_format = config.require_string("data_format");
  split.num_examples = config.require_int("num_examples");
  split.eval_fraction = config.require_float("eval_fraction");
  const int64_t seed = config.require_int("split_seed");
  if (seed < 0) throw InputError(path + ": field 'split_seed': expected a non-negative integer");
  split.seed = static_cast<uint64_t>(seed);
  split.train = config.require_int_list("train");
  split.eval = config.require_int_list("eval");

  std::vector<bool> seen(static_cast<std::size_t>(std::max<int64_t>(split.num_examples, 0)));
  for (const auto* list : {&split.train, &split.eval}) {
    const char* field = list == &split.train ? "train" : "eval";
    for (int64_t i : *list) {
      if (i < 0 || i >= split.num_examples) {
        throw InputError(path + ": field '" + field + "': index " + std::to_string(i) +
                         " is outside the " + std::to_string(split.num_examples) + " examples");
      }
      if (seen[static_cast<std::size_t>(i)]) {
        throw InputError(path + ": field '" + field + "': index " + std::to_string(i) +
                         " appears twice");
      }
      seen[static_cast<std::size_t>(i)] = true;
    }
  }
  if (static_cast<int64_t>(split.train.size() + split.eval.size()) != split.num_examples) {
    throw InputError(path + ": train and eval hold " +
                     std::to_string(split.train.size() + split.eval.size()) +
                     " indices, but num_examples is " + std::to_string(split.num_examples));
  }
  return split;
}

void check_split_matches(const DataSplit& split, const Dataset& dataset,
                         const std::string& split_path) {
  if (split.data_sha256 != dataset.sha256) {
    throw InputError(split_path + ": the data changed since training: " + dataset.source +
                     " has SHA-256 " + dataset.sha256 + ", but the split was made from " +
                     split.data_source + " with SHA-256 " + split.data_sha256 +
                     "; the held-out examples cannot be recovered from changed data (evaluate "
                     "on the original file, or train again)");
  }
  if (split.data_format != data_format_name(dataset.format) ||
      split.num_examples != static_cast<int64_t>(dataset.examples.size())) {
    throw InputError(split_path + ": " + dataset.source + " read as " +
                     data_format_name(dataset.format) + " gives " +
                     std::to_string(dataset.examples.size()) +
                     " valid examples, but the split was made from " +
                     std::to_string(split.num_examples) + " " + split.data_format +
                     " examples of the same file; read it with the training run's data.format "
                     "and data.on_bad_line");
  }
}

std::vector<Example> select_examples(const Dataset& dataset, const std::vector<int64_t>& indices) {
  std::vector<Example> out;
  out.reserve(indices.size());
  for (int64_t i : indices) {
    if (i < 0 || i >= static_cast<int64_t>(dataset.examples.size())) {
      throw std::out_of_range("select_examples: index " + std::to_string(i) + " outside " +
                              std::to_string(dataset.examples.size()) + " examples");
    }
    out.push_back(dataset.examples[static_cast<std::size_t>(i)]);
  }
  return out;
}

}  // namespace peftfw::data
