#include "pardit/text/clip_tokenizer.h"

#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "pardit/core/error.h"
#include "pardit/core/files.h"
#include "unicode.h"

namespace fs = std::filesystem;

namespace pardit::text {

namespace {

const char* kBos = "<|startoftext|>";
const char* kEos = "<|endoftext|>";

nlohmann::json readJson(const std::string& path) {
  std::ifstream in(path);
  PARDIT_CHECK(in.good(), path, ": cannot open");
  registerInputFile(path);
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    PARDIT_THROW(path, ": not valid JSON: ", e.what());
  }
}

std::unordered_map<std::string, int64_t> vocabOf(const nlohmann::json& j, const std::string& where) {
  PARDIT_CHECK(j.is_object() && !j.empty(), where, ": the vocabulary must be a non-empty JSON object");
  std::unordered_map<std::string, int64_t> v;
  for (auto it = j.begin(); it != j.end(); ++it) {
    PARDIT_CHECK(it.value().is_number_integer(), where, ": vocabulary entry '", it.key(), "' has no integer id");
    v[it.key()] = it.value().get<int64_t>();
  }
  return v;
}

std::pair<std::string, std::string> splitMerge(const std::string& line, const std::string& where, size_t number) {
  const size_t space = line.find(' ');
  PARDIT_CHECK(space != std::string::npos && space > 0 && space + 1 < line.size() &&
                   line.find(' ', space + 1) == std::string::npos,
               where, ": line ", number, " is not a merge \"a b\": '", line, "'");
  return {line.substr(0, space), line.substr(space + 1)};
}

// The pieces of CLIP's pattern in normalised text (whitespace separates and is dropped).
std::vector<std::string> pieces(const std::vector<char32_t>& t) {
  std::vector<std::string> out;
  size_t i = 0;
  const size_t n = t.size();
  auto startsWith = [&](const char* lit) {
    size_t k = 0;
    for (; lit[k]; ++k)
      if (i + k >= n || t[i + k] != static_cast<char32_t>(static_cast<unsigned char>(lit[k]))) return false;
    return true;
  };
  auto isOther = [](char32_t c) { return !unicode::isWhitespace(c) && !unicode::isLetter(c) && !unicode::isNumber(c); };
  while (i < n) {
    const char32_t c = t[i];
    if (unicode::isWhitespace(c)) {
      ++i;
      continue;
    }
    size_t end = i + 1;
    bool matched = false;
    for (const char* lit : {kBos, kEos, "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"}) {
      if (startsWith(lit)) {
        end = i + std::char_traits<char>::length(lit);
        matched = true;
        break;
      }
    }
    if (!matched) {
      if (unicode::isLetter(c)) {
        while (end < n && unicode::isLetter(t[end])) ++end;
      } else if (!unicode::isNumber(c)) {
        while (end < n && isOther(t[end])) ++end;
      }
    }
    out.push_back(unicode::encode(std::vector<char32_t>(t.begin() + static_cast<std::ptrdiff_t>(i),
                                                        t.begin() + static_cast<std::ptrdiff_t>(end))));
    i = end;
  }
  return out;
}

}  // namespace

namespace {
// The bytes GPT-2's alphabet keeps as their own character, in CLIP's vocabulary order.
std::vector<int> printableBytes() {
  std::vector<int> printable;
  for (int b = '!'; b <= '~'; ++b) printable.push_back(b);
  for (int b = 0xA1; b <= 0xAC; ++b) printable.push_back(b);
  for (int b = 0xAE; b <= 0xFF; ++b) printable.push_back(b);
  return printable;
}
}  // namespace

std::vector<std::string> clipByteAlphabet() {
  std::vector<std::string> out(256);
  std::vector<bool> used(256, false);
  for (int b : printableBytes()) {
    out[b] = unicode::encode(static_cast<char32_t>(b));
    used[b] = true;
  }
  int n = 0;
  for (int b = 0; b < 256; ++b)
    if (!used[b]) out[b] = unicode::encode(static_cast<char32_t>(256 + n++));
  return out;
}

std::vector<std::string> clipByteSymbolsInVocabOrder() {
  const auto alphabet = clipByteAlphabet();
  std::vector<int> order = printableBytes();
  std::vector<bool> listed(256, false);
  for (int b : order) listed[b] = true;
  for (int b = 0; b < 256; ++b)
    if (!listed[b]) order.push_back(b);
  std::vector<std::string> out;
  for (int b : order) out.push_back(alphabet[b]);
  return out;
}

ClipTokenizer::ClipTokenizer(std::unordered_map<std::string, int64_t> vocab,
                             const std::vector<std::pair<std::string, std::string>>& merges, const std::string& where)
    : vocab_(std::move(vocab)), byteChars_(clipByteAlphabet()) {
  for (size_t r = 0; r < merges.size(); ++r) {
    const std::string key = merges[r].first + " " + merges[r].second;
    PARDIT_CHECK(vocab_.count(merges[r].first) && vocab_.count(merges[r].second) &&
                     vocab_.count(merges[r].first + merges[r].second),
                 where, ": merge ", r + 1, " '", key, "' uses a token that is not in the vocabulary");
    ranks_.emplace(key, static_cast<int>(r));  // the first occurrence ranks
  }
  for (const char* special : {kBos, kEos})
    PARDIT_CHECK(vocab_.count(special), where, ": the vocabulary has no ", special);
  bos_ = vocab_.at(kBos);
  eos_ = pad_ = unk_ = vocab_.at(kEos);
}

ClipTokenizer ClipTokenizer::fromFiles(const std::string& vocabJson, const std::string& mergesTxt) {
  try {
    std::ifstream in(mergesTxt);
    PARDIT_CHECK(in.good(), mergesTxt, ": cannot open");
    registerInputFile(mergesTxt);
    std::vector<std::pair<std::string, std::string>> merges;
    std::string line;
    size_t number = 0;
    while (std::getline(in, line)) {
      ++number;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty() || (number == 1 && line.rfind("#version", 0) == 0)) continue;
      merges.push_back(splitMerge(line, mergesTxt, number));
    }
    return ClipTokenizer(vocabOf(readJson(vocabJson), vocabJson), merges, mergesTxt);
  } catch (const nlohmann::json::exception& e) {  // a value of an unexpected type
    PARDIT_THROW(vocabJson, ": unexpected JSON structure: ", e.what());
  }
}

ClipTokenizer ClipTokenizer::fromTokenizerJson(const std::string& path) {
  try {
    const nlohmann::json j = readJson(path);
    PARDIT_CHECK(j.contains("model") && j["model"].value("type", "") == "BPE", path, ": not a BPE tokenizer.json");
    const auto& model = j["model"];
    std::vector<std::pair<std::string, std::string>> merges;
    size_t number = 0;
    for (const auto& m : model.value("merges", nlohmann::json::array())) {
      ++number;
      if (m.is_string()) {
        merges.push_back(splitMerge(m.get<std::string>(), path, number));
      } else {
        PARDIT_CHECK(m.is_array() && m.size() == 2, path, ": merge ", number, " is neither \"a b\" nor [a, b]");
        merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
      }
    }
    return ClipTokenizer(vocabOf(model.value("vocab", nlohmann::json::object()), path), merges, path);
  } catch (const nlohmann::json::exception& e) {  // a value of an unexpected type
    PARDIT_THROW(path, ": unexpected JSON structure: ", e.what());
  }
}

ClipTokenizer ClipTokenizer::open(const std::string& dir) {
  const fs::path d(dir);
  if (fs::exists(d / "vocab.json") && fs::exists(d / "merges.txt"))
    return fromFiles((d / "vocab.json").string(), (d / "merges.txt").string());
  if (fs::exists(d / "tokenizer.json")) return fromTokenizerJson((d / "tokenizer.json").string());
  PARDIT_THROW(dir, ": no CLIP tokenizer (vocab.json and merges.txt, or tokenizer.json)");
}

void ClipTokenizer::bpe(const std::string& piece, std::vector<int64_t>& out) const {
  // Byte-level symbols, "</w>" on the last.
  std::vector<std::string> symbols;
  for (unsigned char b : piece) symbols.push_back(byteChars_[b]);
  if (symbols.empty()) return;
  symbols.back() += "</w>";
  // Merge the lowest-ranked adjacent pair (the leftmost on ties) until none is left.
  while (symbols.size() > 1) {
    int best = std::numeric_limits<int>::max();
    size_t at = 0;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      auto it = ranks_.find(symbols[i] + " " + symbols[i + 1]);
      if (it != ranks_.end() && it->second < best) {
        best = it->second;
        at = i;
      }
    }
    if (best == std::numeric_limits<int>::max()) break;
    symbols[at] += symbols[at + 1];
    symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(at) + 1);
  }
  for (const auto& s : symbols) {
    auto it = vocab_.find(s);
    out.push_back(it == vocab_.end() ? unk_ : it->second);
  }
}

std::vector<int64_t> ClipTokenizer::encode(const std::string& text) const {
  std::vector<int64_t> ids;
  // The special tokens are matched in the raw text first; the rest is normalised piece by piece.
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t next = std::string::npos;
    const char* which = nullptr;
    for (const char* special : {kBos, kEos}) {
      const size_t f = text.find(special, pos);
      if (f < next) {
        next = f;
        which = special;
      }
    }
    const std::string segment = text.substr(pos, next == std::string::npos ? std::string::npos : next - pos);
    if (!segment.empty()) {
      // NFC, whitespace runs -> " ", lowercase.
      std::vector<char32_t> normalised;
      bool inSpace = false;
      for (char32_t c : unicode::decode(unicode::nfc(segment))) {
        if (unicode::isWhitespace(c)) {
          if (!inSpace) normalised.push_back(U' ');
          inSpace = true;
          continue;
        }
        inSpace = false;
        unicode::appendLowercase(c, normalised);
      }
      for (const auto& p : pieces(normalised)) bpe(p, ids);
    }
    if (next == std::string::npos) break;
    ids.push_back(vocab_.at(which));
    pos = next + std::char_traits<char>::length(which);
  }
  return ids;
}

std::vector<int64_t> ClipTokenizer::encodeForModel(const std::string& text, int64_t maxLength) const {
  PARDIT_CHECK(maxLength >= 2, "CLIP tokenizer: max length ", maxLength,
               " leaves no room for the start and end tokens");
  std::vector<int64_t> ids = encode(text);
  if (static_cast<int64_t>(ids.size()) > maxLength - 2) ids.resize(static_cast<size_t>(maxLength - 2));
  ids.insert(ids.begin(), bos_);
  ids.push_back(eos_);
  ids.resize(static_cast<size_t>(maxLength), pad_);
  return ids;
}

}  // namespace pardit::text
