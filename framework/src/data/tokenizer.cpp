// The byte tokenizer, and the UTF-8 and byte-level helpers that the Hugging
// Face tokenizer (tokenizer_hf.cpp) shares.
#include "peftfw/data/tokenizer.hpp"

#include <array>
#include <cstdio>
#include <string>

#include "peftfw/error.hpp"
#include "tokenizer_internal.hpp"

namespace peftfw::data {
namespace detail {

namespace {

// The UTF-8 sequence led by s[i] (a byte >= 0x80): its length (0 when the byte cannot lead
// one) and how many of its bytes from i on are valid, the lead included: len when the whole
// sequence is, fewer for a maximal invalid subpart (Unicode's "U+FFFD substitution of
// maximal subparts"). Overlongs, surrogates and code points above U+10FFFF are invalid.
struct Utf8Run {
  std::size_t len, valid;
};

Utf8Run utf8_run(std::string_view s, std::size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  std::size_t len = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // the second byte's range
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    if (b0 == 0xE0) lo = 0xA0;  // overlong
    if (b0 == 0xED) hi = 0x9F;  // surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    if (b0 == 0xF0) lo = 0x90;  // overlong
    if (b0 == 0xF4) hi = 0x8F;  // above U+10FFFF
  } else {
    return {0, 0};
  }
  std::size_t k = 1;
  while (k < len && i + k < s.size()) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) break;
    ++k;
  }
  return {len, k};
}

}  // namespace

std::optional<std::size_t> find_invalid_utf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const Utf8Run r = utf8_run(s, i);
    if (r.len == 0 || r.valid < r.len) return i;
    i += r.len;
  }
  return std::nullopt;
}

uint32_t next_code_point(std::string_view s, std::size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  const std::size_t len = utf8_length(b0);
  uint32_t cp = len == 1 ? b0 : len == 2 ? (b0 & 0x1F) : len == 3 ? (b0 & 0x0F) : (b0 & 0x07);
  for (std::size_t k = 1; k < len; ++k) {
    cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  }
  i += len;
  return cp;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

std::string utf8_lossy(std::string_view bytes) {
  static const char kReplacement[] = "\xEF\xBF\xBD";
  std::string out;
  out.reserve(bytes.size());
  for (std::size_t i = 0; i < bytes.size();) {
    if (static_cast<unsigned char>(bytes[i]) < 0x80) {
      out += bytes[i++];
      continue;
    }
    const Utf8Run r = utf8_run(bytes, i);
    if (r.len == 0) {  // not a lead byte: one replacement for this byte
      out += kReplacement;
      ++i;
    } else if (r.valid == r.len) {
      out.append(bytes.data() + i, r.len);
      i += r.len;
    } else {  // an incomplete sequence is one maximal invalid subpart
      out += kReplacement;
      i += r.valid;
    }
  }
  return out;
}

bool is_unicode_whitespace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

std::string code_point_name(uint32_t cp) {
  char buffer[16];
  std::snprintf(buffer, sizeof buffer, "U+%04X", cp);
  return buffer;
}

namespace {

struct ByteLevelTables {
  std::array<std::string, 256> chars;
  std::array<int, 324> bytes;  // code point -> byte, -1 when none; 0x100 + 68 entries

  ByteLevelTables() {
    bytes.fill(-1);
    uint32_t next_extra = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : next_extra++;
      append_utf8(chars[b], cp);
      bytes[cp] = b;
    }
  }
};

const ByteLevelTables& byte_level_tables() {
  static const ByteLevelTables tables;
  return tables;
}

}  // namespace

const std::string& byte_level_char(unsigned char b) { return byte_level_tables().chars[b]; }

int byte_level_byte(uint32_t cp) {
  const auto& bytes = byte_level_tables().bytes;
  return cp < bytes.size() ? bytes[cp] : -1;
}

}  // namespace detail

namespace {

constexpr std::array<const char*, 3> kByteSpecials = {"<|end_of_text|>", "<|start_of_role|>",
                                                      "<|end_of_role|>"};
constexpr int64_t kFirstSpecial = 256;

class ByteTokenizer final : public Tokenizer {
 public:
  std::vector<int64_t> encode(std::string_view text, bool allow_special) const override {
    std::vector<int64_t> ids;
    ids.reserve(text.size());
    std::size_t i = 0;
    while (i < text.size()) {
      if (allow_special && text[i] == '<') {
        // No special token is a prefix of another, so the first hit is the
        // longest.
        bool matched = false;
        for (std::size_t k = 0; k < kByteSpecials.size(); ++k) {
          const std::string_view special = kByteSpecials[k];
          if (text.compare(i, special.size(), special) == 0) {
            ids.push_back(kFirstSpecial + static_cast<int64_t>(k));
            i += special.size();
            matched = true;
            break;
          }
        }
        if (matched) continue;
      }
      ids.push_back(static_cast<unsigned char>(text[i]));
      ++i;
    }
    return ids;
  }

  std::string decode(const std::vector<int64_t>& ids, bool skip_special) const override {
    std::string bytes;
    bytes.reserve(ids.size());
    for (std::size_t k = 0; k < ids.size(); ++k) {
      const int64_t id = ids[k];
      if (id >= 0 && id < kFirstSpecial) {
        bytes += static_cast<char>(static_cast<unsigned char>(id));
      } else if (id >= kFirstSpecial && id < kByteTokenizerVocabSize) {
        if (!skip_special) bytes += kByteSpecials[static_cast<std::size_t>(id - kFirstSpecial)];
      } else {
        throw InputError("byte tokenizer: token id " + std::to_string(id) + " at position " +
                         std::to_string(k) + " is outside its vocabulary (ids 0.." +
                         std::to_string(kByteTokenizerVocabSize - 1) + ")");
      }
    }
    return detail::utf8_lossy(bytes);
  }

  int64_t vocab_size() const override { return kByteTokenizerVocabSize; }

  std::optional<int64_t> token_id(std::string_view token) const override {
    for (std::size_t k = 0; k < kByteSpecials.size(); ++k) {
      if (token == kByteSpecials[k]) return kFirstSpecial + static_cast<int64_t>(k);
    }
    if (token.size() == 1) return static_cast<unsigned char>(token[0]);
    return std::nullopt;
  }

  std::optional<int64_t> bos_id() const override { return std::nullopt; }
  std::optional<int64_t> eos_id() const override { return kFirstSpecial; }
  std::optional<int64_t> pad_id() const override { return kFirstSpecial; }
  std::vector<int64_t> add_template_tokens(std::vector<int64_t> ids) const override { return ids; }
  std::string name() const override { return "byte"; }
};

}  // namespace

std::unique_ptr<Tokenizer> make_byte_tokenizer() { return std::make_unique<ByteTokenizer>(); }

}  // namespace peftfw::data
