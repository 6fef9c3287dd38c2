#include "unicode.h"

#include <utf8proc.h>

#include <cstdlib>
#include <memory>

#include "pardit/core/error.h"

namespace pardit::text::unicode {

std::vector<char32_t> decode(const std::string& s) {
  std::vector<char32_t> out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  utf8proc_ssize_t i = 0, n = static_cast<utf8proc_ssize_t>(s.size());
  while (i < n) {
    utf8proc_int32_t cp = 0;
    const utf8proc_ssize_t len = utf8proc_iterate(p + i, n - i, &cp);
    if (len <= 0) {
      out.push_back(0xFFFD);
      ++i;
    } else {
      out.push_back(static_cast<char32_t>(cp));
      i += len;
    }
  }
  return out;
}

std::string encode(char32_t cp) {
  utf8proc_uint8_t buf[4];
  const utf8proc_ssize_t n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
  return std::string(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
}

std::string encode(const std::vector<char32_t>& cps) {
  std::string out;
  out.reserve(cps.size());
  for (char32_t c : cps) out += encode(c);
  return out;
}

std::string nfc(const std::string& s) {
  // utf8proc needs valid UTF-8: normalise the decoded code points (invalid bytes already replaced).
  const std::string valid = encode(decode(s));
  std::unique_ptr<utf8proc_uint8_t, decltype(&std::free)> out(
      utf8proc_NFC(reinterpret_cast<const utf8proc_uint8_t*>(valid.c_str())), &std::free);
  PARDIT_CHECK(out != nullptr, "tokenizer: Unicode normalisation failed");
  return reinterpret_cast<const char*>(out.get());
}

bool isLetter(char32_t c) {
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
      return true;
    default:
      return false;
  }
}

bool isNumber(char32_t c) {
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_NO:
      return true;
    default:
      return false;
  }
}

bool isWhitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

void appendLowercase(char32_t c, std::vector<char32_t>& out) {
  if (c == 0x130) {  // the only unconditional lowercase mapping to two characters
    out.push_back(0x69);
    out.push_back(0x307);
    return;
  }
  out.push_back(static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c))));
}

std::vector<std::pair<size_t, size_t>> graphemes(const std::string& s) {
  std::vector<std::pair<size_t, size_t>> out;
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  utf8proc_ssize_t i = 0, n = static_cast<utf8proc_ssize_t>(s.size());
  utf8proc_int32_t prev = -1, state = 0;
  size_t start = 0;
  while (i < n) {
    utf8proc_int32_t cp = 0;
    utf8proc_ssize_t len = utf8proc_iterate(p + i, n - i, &cp);
    if (len <= 0) {
      cp = 0xFFFD;
      len = 1;
    }
    if (prev >= 0 && utf8proc_grapheme_break_stateful(prev, cp, &state)) {
      out.emplace_back(start, static_cast<size_t>(i));
      start = static_cast<size_t>(i);
    }
    prev = cp;
    i += len;
  }
  if (n > 0) out.emplace_back(start, static_cast<size_t>(n));
  return out;
}

}  // namespace pardit::text::unicode
