#pragma once
// Private to src/text: the Unicode operations the tokenizers need, with the semantics of the Rust
// `tokenizers` library that transformers' tokenizers run on (utf8proc underneath).
#include <cstdint>
#include <string>
#include <vector>

namespace pardit::text::unicode {

// UTF-8 <-> code points. Invalid bytes decode to U+FFFD, one byte each.
std::vector<char32_t> decode(const std::string& utf8);
std::string encode(const std::vector<char32_t>& cps);
std::string encode(char32_t cp);

std::string nfc(const std::string& utf8);
bool isLetter(char32_t c);      // \p{L}
bool isNumber(char32_t c);      // \p{N}
bool isWhitespace(char32_t c);  // \s: the White_Space property
// Rust's char::to_lowercase, per character (U+0130 becomes "i\u0307"; no final-sigma rule).
void appendLowercase(char32_t c, std::vector<char32_t>& out);
// Extended grapheme clusters (UAX #29), as byte ranges [begin, end) of `utf8`.
std::vector<std::pair<size_t, size_t>> graphemes(const std::string& utf8);

}  // namespace pardit::text::unicode
