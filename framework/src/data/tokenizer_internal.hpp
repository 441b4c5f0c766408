// Pieces shared by the tokenizer sources (not a public header): UTF-8
// helpers, the GPT-2 byte-to-unicode table, and a PCRE2 regex that matches
// the way the tokenizers library's Oniguruma regexes do.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace peftfw::data::detail {

// ---- UTF-8 -----------------------------------------------------------------

// Byte offset of the first invalid UTF-8 sequence (overlong forms, surrogates
// and code points above U+10FFFF are invalid), or nullopt when `s` is valid.
std::optional<std::size_t> find_invalid_utf8(std::string_view s);

// The code point starting at `i` of valid UTF-8 `s`; advances `i` past it.
uint32_t next_code_point(std::string_view s, std::size_t& i);

// Byte length of the character whose first byte is `lead` (valid UTF-8).
inline std::size_t utf8_length(unsigned char lead) {
  return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
}

void append_utf8(std::string& out, uint32_t code_point);

// `bytes` with every invalid sequence replaced by U+FFFD, one per maximal
// invalid subpart (Rust's String::from_utf8_lossy, which the library uses).
std::string utf8_lossy(std::string_view bytes);

// Unicode White_Space (Rust's char::is_whitespace, regex \s, Oniguruma \s).
bool is_unicode_whitespace(uint32_t code_point);

// "U+00E9" for messages.
std::string code_point_name(uint32_t code_point);

// ---- GPT-2 byte-level alphabet -----------------------------------------------
// Bytes 0x21-0x7E, 0xA1-0xAC and 0xAE-0xFF stand for themselves; the other 68
// bytes map, in byte order, to U+0100, U+0101, ... (GPT-2's bytes_to_unicode).

// UTF-8 of the character standing for byte `b`.
const std::string& byte_level_char(unsigned char b);
// The byte a character stands for, or -1 when it is not in the alphabet.
int byte_level_byte(uint32_t code_point);

// ---- Regex ---------------------------------------------------------------------

// A compiled PCRE2 pattern (UTF, UCP, JIT when available). Patterns are given
// in Oniguruma syntax as tokenizer.json writes them; onig_to_pcre2 rewrites
// the escapes whose meaning differs.
class Regex {
 public:
  // Throws InputError "<where>: invalid regex ...": `where` names the file
  // and JSON path of the pattern.
  Regex(const std::string& onig_pattern, const std::string& where);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Matches as the onig crate's find_iter reports them: leftmost-first from
  // the end of the previous match; an empty match right at the end of the
  // previous one is refused and the search moves on by one character.
  // Offsets are bytes of valid UTF-8 `text`.
  std::vector<std::pair<std::size_t, std::size_t>> find_all(std::string_view text) const;
  // Whether the pattern matches starting exactly at byte `offset`.
  bool matches_at(std::string_view text, std::size_t offset) const;

 private:
  void* code_ = nullptr;  // pcre2_code_8*, kept out of this header
  std::string where_;
};

// The Oniguruma (Ruby syntax, UTF-8) pattern rewritten for PCRE2 with
// PCRE2_UCP: \s and \S are Unicode White_Space (PCRE2 adds U+180E), \w and
// \W are alphabetic characters, marks, decimal digits and connector
// punctuation (PCRE2 10.42 takes letters, all numbers and "_"),
// \h and \H are hex digits (PCRE2: horizontal space), and the POSIX classes
// [:alpha:], [:word:], [:digit:] and [:space:] follow Oniguruma. Inside a
// character class only \s, \w and \h can be rewritten; \S, \W and \H there
// keep PCRE2's meaning. Throws InputError for Oniguruma class intersections
// ("&&") and nested classes, which PCRE2 lacks.
std::string onig_to_pcre2(const std::string& pattern, const std::string& where);

}  // namespace peftfw::data::detail
