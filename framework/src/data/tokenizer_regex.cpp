// PCRE2 behind the tokenizer's regexes (Split pre-tokenizer, ByteLevel's
// GPT-2 pattern, added-token word checks), made to match as the tokenizers
// library's Oniguruma does.
#include <memory>
#include <string>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"
#include "tokenizer_internal.hpp"

namespace peftfw::data::detail {
namespace {

// Unicode White_Space, as a class body.
constexpr const char* kSpaceClassBody =
    "\\t\\n\\x0B\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}"
    "\\x{202F}\\x{205F}\\x{3000}";
// Oniguruma's Unicode \w, as the tokenizers library matches it (probed
// code point by code point): Alphabetic | Mark | Decimal_Number |
// Connector_Punctuation; outside a class its Latin-1 table also counts the
// number signs ² ³ ¹ ¼ ½ ¾ as word characters, inside a class and in
// [:word:] it does not.
constexpr const char* kWordClassBody =
    "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{B2}\\x{B3}\\x{B9}\\x{BC}-\\x{BE}";
constexpr const char* kWordInClassBody = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}";
constexpr const char* kHexClassBody = "0-9a-fA-F";

// POSIX classes whose PCRE2 (UCP) meaning differs from Oniguruma's.
struct PosixClass {
  const char* name;
  const char* body;
};
constexpr PosixClass kPosixClasses[] = {
    {"[:alpha:]", "\\p{Alphabetic}"},
    {"[:word:]", kWordInClassBody},
    {"[:digit:]", "\\p{Nd}"},
    {"[:space:]", kSpaceClassBody},
};

std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  const int n = pcre2_get_error_message(code, buffer, sizeof buffer);
  if (n < 0) return "PCRE2 error " + std::to_string(code);
  return std::string(reinterpret_cast<const char*>(buffer), static_cast<std::size_t>(n));
}

// Per-thread match data and JIT stack: PCRE2 match data and JIT stacks must
// not be shared between threads, and encode may run on several at once.
class MatchState {
 public:
  MatchState()
      : data_(pcre2_match_data_create(1, nullptr)),
        context_(pcre2_match_context_create(nullptr)),
        // Long whitespace runs make \s+(?!\S) backtrack deeply; PCRE2's
        // default 32 KiB JIT stack is too small for megabyte texts.
        stack_(pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr)) {
    if (data_ == nullptr || context_ == nullptr) throw std::bad_alloc();
    if (stack_ != nullptr) pcre2_jit_stack_assign(context_, nullptr, stack_);
  }
  ~MatchState() {
    pcre2_match_data_free(data_);
    pcre2_match_context_free(context_);
    if (stack_ != nullptr) pcre2_jit_stack_free(stack_);
  }
  MatchState(const MatchState&) = delete;
  MatchState& operator=(const MatchState&) = delete;

  pcre2_match_data* data() const { return data_; }
  pcre2_match_context* context() const { return context_; }

 private:
  pcre2_match_data* data_;
  pcre2_match_context* context_;
  pcre2_jit_stack* stack_;
};

MatchState& match_state() {
  thread_local MatchState state;
  return state;
}

// One search from `start`; false when there is no match.
bool search(const pcre2_code* code, std::string_view text, std::size_t start, uint32_t options,
            std::size_t& match_start, std::size_t& match_end, const std::string& where) {
  MatchState& state = match_state();
  const int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), start,
                             options | PCRE2_NO_UTF_CHECK, state.data(), state.context());
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  // rc == 0: more capture groups than the match data holds; group 0 is set.
  if (rc < 0) {
    throw RuntimeError(where + ": regex matching failed on a text of " +
                       std::to_string(text.size()) + " bytes: " + pcre2_message(rc));
  }
  const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(state.data());
  match_start = ovector[0];
  match_end = ovector[1];
  return true;
}

}  // namespace

std::string onig_to_pcre2(const std::string& pattern, const std::string& where) {
  std::string out;
  out.reserve(pattern.size() + 64);
  bool in_class = false;
  std::size_t i = 0;
  const std::size_t n = pattern.size();
  while (i < n) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < n) {
      const char e = pattern[i + 1];
      const char* body = e == 's' || e == 'S'   ? kSpaceClassBody
                         : e == 'w' || e == 'W' ? kWordClassBody
                         : e == 'h' || e == 'H' ? kHexClassBody
                                                : nullptr;
      const bool negated = e == 'S' || e == 'W' || e == 'H';
      if (body != nullptr && !in_class) {
        out += negated ? "[^" : "[";
        out += body;
        out += ']';
      } else if (body != nullptr && !negated) {
        out += body == kWordClassBody ? kWordInClassBody : body;
      } else {
        out += c;
        out += e;
      }
      i += 2;
      continue;
    }
    if (!in_class) {
      out += c;
      ++i;
      if (c == '[') {
        in_class = true;
        // A leading '^' negates; a ']' right after the opening (or the '^')
        // is a literal in both dialects.
        if (i < n && pattern[i] == '^') out += pattern[i++];
        if (i < n && pattern[i] == ']') out += pattern[i++];
      }
      continue;
    }
    // Inside a character class.
    if (c == ']') {
      in_class = false;
      out += c;
      ++i;
      continue;
    }
    if (c == '&' && i + 1 < n && pattern[i + 1] == '&') {
      throw InputError(where + ": the regex uses a character class intersection ('&&'), which "
                       "peftfw's regex engine (PCRE2) does not support; pattern: " +
                       io::excerpt(pattern));
    }
    if (c == '[') {
      // POSIX classes: [:alpha:], [:word:], [:digit:] and [:space:] are
      // rewritten; the others are passed on as they are.
      const std::size_t close = pattern.find(":]", i + 2);
      if (i + 1 < n && pattern[i + 1] == ':' && close != std::string::npos) {
        const std::string posix = pattern.substr(i, close + 2 - i);
        const char* body = nullptr;
        for (const PosixClass& c : kPosixClasses) {
          if (posix == c.name) body = c.body;
        }
        out += body != nullptr ? std::string(body) : posix;
        i = close + 2;
        continue;
      }
      throw InputError(where + ": the regex nests a character class inside another (an "
                       "Oniguruma class union), which peftfw's regex engine (PCRE2) does not "
                       "support; pattern: " +
                       io::excerpt(pattern));
    }
    out += c;
    ++i;
  }
  return out;
}

Regex::Regex(const std::string& onig_pattern, const std::string& where) : where_(where) {
  const std::string pattern = onig_to_pcre2(onig_pattern, where);
  std::unique_ptr<pcre2_compile_context, decltype(&pcre2_compile_context_free)> context(
      pcre2_compile_context_create(nullptr), &pcre2_compile_context_free);
  if (!context) throw std::bad_alloc();
  // Oniguruma's Ruby syntax: only \n ends a line, and ^ / $ match at line
  // starts and ends.
  pcre2_set_newline(context.get(), PCRE2_NEWLINE_LF);
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                    PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &error, &error_offset, context.get());
  if (code == nullptr) {
    throw InputError(where + ": invalid regex " + io::excerpt(onig_pattern) + ": " +
                     pcre2_message(error) + " (at offset " + std::to_string(error_offset) +
                     " of the PCRE2 form " + io::excerpt(pattern) + ")");
  }
  // JIT is an optimisation: where it is unavailable, pcre2_match interprets.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  code_ = code;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

std::vector<std::pair<std::size_t, std::size_t>> Regex::find_all(std::string_view text) const {
  const auto* code = static_cast<const pcre2_code*>(code_);
  std::vector<std::pair<std::size_t, std::size_t>> matches;
  std::size_t last_end = 0;
  std::optional<std::size_t> last_match_end;
  while (last_end <= text.size()) {
    std::size_t start = 0;
    std::size_t end = 0;
    if (!search(code, text, last_end, 0, start, end, where_)) break;
    if (start == end && last_match_end == end) {
      // The onig crate refuses an empty match right after the previous match
      // and searches again one character further.
      last_end += last_end < text.size() ? utf8_length(static_cast<unsigned char>(text[last_end]))
                                         : 1;
      continue;
    }
    last_end = end;
    last_match_end = end;
    matches.emplace_back(start, end);
  }
  return matches;
}

bool Regex::matches_at(std::string_view text, std::size_t offset) const {
  std::size_t start = 0;
  std::size_t end = 0;
  return search(static_cast<const pcre2_code*>(code_), text, offset, PCRE2_ANCHORED, start, end,
                where_);
}

}  // namespace peftfw::data::detail
