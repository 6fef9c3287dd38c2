#include "pardit/text/t5_tokenizer.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>

#include "pardit/core/error.h"
#include "pardit/core/files.h"
#include "unicode.h"

namespace fs = std::filesystem;

namespace pardit::text {

namespace {

const char* kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's space

std::string readFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  PARDIT_CHECK(in.good(), path, ": cannot open");
  registerInputFile(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string base64Decode(const std::string& in, const std::string& where) {
  static const std::string kAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  uint32_t buf = 0;
  int bits = 0;
  for (char c : in) {
    if (c == '=' || c == '\n' || c == '\r') continue;
    const size_t v = kAlphabet.find(c);
    PARDIT_CHECK(v != std::string::npos, where, ": precompiled_charsmap is not base64");
    buf = (buf << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((buf >> bits) & 0xFF));
    }
  }
  return out;
}

// A minimal reader of the protobuf wire format, for SentencePiece's ModelProto.
class ProtoReader {
 public:
  // `data` must outlive the reader.
  ProtoReader(const std::string& data, std::string where)
      : p_(data.data()), end_(data.data() + data.size()), where_(std::move(where)) {}
  bool done() const { return p_ >= end_; }
  // Next field: number and wire type.
  std::pair<uint32_t, int> tag() {
    const uint64_t t = varint();
    return {static_cast<uint32_t>(t >> 3), static_cast<int>(t & 7)};
  }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      PARDIT_CHECK(p_ < end_, where_, ": truncated protobuf");
      const auto b = static_cast<uint8_t>(*p_++);
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
    PARDIT_THROW(where_, ": malformed protobuf varint");
  }
  std::string bytes() {
    const uint64_t n = varint();
    PARDIT_CHECK(n <= static_cast<uint64_t>(end_ - p_), where_, ": truncated protobuf");
    std::string s(p_, static_cast<size_t>(n));
    p_ += n;
    return s;
  }
  float fixed32() {
    PARDIT_CHECK(end_ - p_ >= 4, where_, ": truncated protobuf");
    float f;
    std::memcpy(&f, p_, 4);
    p_ += 4;
    return f;
  }
  void skip(int wire) {
    switch (wire) {
      case 0:
        varint();
        break;
      case 1:
        advance(8);
        break;
      case 2:
        bytes();
        break;
      case 5:
        advance(4);
        break;
      default:
        PARDIT_THROW(where_, ": unsupported protobuf wire type ", wire);
    }
  }

 private:
  void advance(size_t n) {
    PARDIT_CHECK(static_cast<size_t>(end_ - p_) >= n, where_, ": truncated protobuf");
    p_ += n;
  }
  const char* p_;
  const char* end_;
  std::string where_;
};

}  // namespace

// ---- loading -------------------------------------------------------------------------------------------

T5Tokenizer T5Tokenizer::fromTokenizerJson(const std::string& path) {
  try {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(readFile(path));
    } catch (const nlohmann::json::exception& e) {
      PARDIT_THROW(path, ": not valid JSON: ", e.what());
    }
    PARDIT_CHECK(j.contains("model") && j["model"].value("type", "") == "Unigram", path,
                 ": not a Unigram tokenizer.json");
    T5Tokenizer t;
    for (const auto& v : j["model"]["vocab"]) {
      PARDIT_CHECK(v.is_array() && v.size() == 2, path, ": vocabulary entries must be [piece, score]");
      t.pieces_.push_back({v[0].get<std::string>(), v[1].get<double>()});
    }
    const auto& unk = j["model"].contains("unk_id") ? j["model"]["unk_id"] : nlohmann::json(2);
    PARDIT_CHECK(unk.is_number_integer(), path, ": model.unk_id must be an integer");
    t.unk_ = unk.get<int64_t>();
    for (const auto& a : j.value("added_tokens", nlohmann::json::array())) {
      PARDIT_CHECK(a.is_object() && a.contains("content") && a["content"].is_string(), path,
                   ": added_tokens entries must be objects with a string 'content'");
      t.added_.push_back(a["content"].get<std::string>());
    }
    // The precompiled normaliser (alone, or inside a Sequence).
    std::vector<nlohmann::json> normalizers;
    if (j.contains("normalizer") && !j["normalizer"].is_null()) {
      if (j["normalizer"].value("type", "") == "Sequence") {
        for (const auto& n : j["normalizer"]["normalizers"]) normalizers.push_back(n);
      } else {
        normalizers.push_back(j["normalizer"]);
      }
    }
    for (const auto& n : normalizers)
      if (n.value("type", "") == "Precompiled") {
        const std::string blob = base64Decode(n.value("precompiled_charsmap", ""), path);
        t.setCharsmap(blob, path);
      }
    t.finish(path);
    return t;
  } catch (const nlohmann::json::exception& e) {  // a value of an unexpected type
    PARDIT_THROW(path, ": unexpected JSON structure: ", e.what());
  }
}

void T5Tokenizer::setCharsmap(const std::string& blob, const std::string& where) {
  if (blob.empty()) return;  // no normaliser
  uint32_t trieBytes = 0;
  PARDIT_CHECK(blob.size() >= 4, where, ": precompiled_charsmap is truncated");
  std::memcpy(&trieBytes, blob.data(), 4);
  PARDIT_CHECK(trieBytes % 4 == 0 && 4 + static_cast<uint64_t>(trieBytes) <= blob.size(), where,
               ": precompiled_charsmap is malformed");
  trie_.resize(trieBytes / 4);
  std::memcpy(trie_.data(), blob.data() + 4, trieBytes);
  replacements_ = blob.substr(4 + trieBytes);
}

T5Tokenizer T5Tokenizer::fromSentencePiece(const std::string& path) {
  const std::string data = readFile(path);
  ProtoReader model(data, path);
  T5Tokenizer t;
  std::string charsmap;
  while (!model.done()) {
    const auto [field, wire] = model.tag();
    if (field == 1 && wire == 2) {                // SentencePiece { piece = 1; score = 2; type = 3 }
      const std::string message = model.bytes();  // the reader points into it
      ProtoReader piece(message, path);
      Piece p;
      int type = 1;
      while (!piece.done()) {
        const auto [f, w] = piece.tag();
        if (f == 1 && w == 2) {
          p.text = piece.bytes();
        } else if (f == 2 && w == 5) {
          p.score = piece.fixed32();
        } else if (f == 3 && w == 0) {
          type = static_cast<int>(piece.varint());
        } else {
          piece.skip(w);
        }
      }
      if (type == 2) t.unk_ = static_cast<int64_t>(t.pieces_.size());  // UNKNOWN
      if (type == 3 || type == 2) t.added_.push_back(p.text);          // CONTROL and UNKNOWN are special
      t.pieces_.push_back(p);
    } else if (field == 3 && wire == 2) {  // NormalizerSpec { precompiled_charsmap = 2 }
      const std::string message = model.bytes();
      ProtoReader spec(message, path);
      while (!spec.done()) {
        const auto [f, w] = spec.tag();
        if (f == 2 && w == 2) {
          charsmap = spec.bytes();
        } else {
          spec.skip(w);
        }
      }
    } else {
      model.skip(wire);
    }
  }
  PARDIT_CHECK(!t.pieces_.empty(), path, ": no SentencePiece pieces (not a spiece.model?)");
  // T5's 100 sentinel tokens follow the pieces, <extra_id_99> first (as transformers adds them).
  for (int i = 99; i >= 0; --i) {
    const std::string s = "<extra_id_" + std::to_string(i) + ">";
    t.pieces_.push_back({s, 0.0});
    t.added_.push_back(s);
  }
  t.setCharsmap(charsmap, path);
  t.finish(path);
  return t;
}

T5Tokenizer T5Tokenizer::open(const std::string& dir) {
  const fs::path d(dir);
  if (fs::exists(d / "tokenizer.json")) return fromTokenizerJson((d / "tokenizer.json").string());
  if (fs::exists(d / "spiece.model")) return fromSentencePiece((d / "spiece.model").string());
  PARDIT_THROW(dir, ": no T5 tokenizer (tokenizer.json or spiece.model)");
}

void T5Tokenizer::finish(const std::string& where) {
  double minScore = std::numeric_limits<double>::max();
  for (size_t i = 0; i < pieces_.size(); ++i) {
    ids_.emplace(pieces_[i].text, static_cast<int64_t>(i));
    longestPiece_ = std::max(longestPiece_, pieces_[i].text.size());
    minScore = std::min(minScore, pieces_[i].score);
  }
  unkScore_ = minScore - 10.0;  // the unknown-token penalty of SentencePiece and tokenizers
  PARDIT_CHECK(unk_ >= 0 && unk_ < static_cast<int64_t>(pieces_.size()), where, ": unk id ", unk_, " out of range");
  PARDIT_CHECK(ids_.count("</s>") && ids_.count("<pad>"), where, ": the vocabulary has no </s> or <pad>");
  eos_ = ids_.at("</s>");
  pad_ = ids_.at("<pad>");
  std::sort(added_.begin(), added_.end());
  added_.erase(std::unique(added_.begin(), added_.end()), added_.end());
  for (const auto& a : added_) PARDIT_CHECK(ids_.count(a), where, ": added token '", a, "' is not in the vocabulary");
}

// ---- normalisation -------------------------------------------------------------------------------------

// The charsmap's double array (darts-clone): the replacement of the shortest rule matching a prefix of
// `chunk`, as the tokenizers library looks it up.
bool T5Tokenizer::transform(const std::string& chunk, std::string* out) const {
  if (trie_.empty()) return false;
  auto hasLeaf = [](uint32_t u) { return ((u >> 8) & 1) == 1; };
  auto value = [](uint32_t u) { return u & ((1U << 31) - 1); };
  auto label = [](uint32_t u) { return u & ((1U << 31) | 0xFF); };
  auto offset = [](uint32_t u) { return (u >> 10) << ((u & (1U << 9)) >> 6); };
  size_t node = 0;
  uint32_t unit = trie_[node];
  node ^= offset(unit);
  for (unsigned char c : chunk) {
    if (c == 0) break;
    node ^= c;
    if (node >= trie_.size()) return false;
    unit = trie_[node];
    if (label(unit) != c) return false;
    node ^= offset(unit);
    if (node >= trie_.size()) return false;
    if (hasLeaf(unit)) {
      const size_t at = value(trie_[node]);
      if (at >= replacements_.size()) return false;
      const size_t end = replacements_.find('\0', at);
      *out = replacements_.substr(at, end == std::string::npos ? std::string::npos : end - at);
      return true;
    }
  }
  return false;
}

std::string T5Tokenizer::precompiled(const std::string& text) const {
  std::string out;
  for (const auto& [b, e] : unicode::graphemes(text)) {
    const std::string g = text.substr(b, e - b);
    std::string r;
    if (g.size() < 6 && transform(g, &r)) {
      out += r;
      continue;
    }
    for (char32_t c : unicode::decode(g)) {
      const std::string part = unicode::encode(c);
      out += transform(part, &r) ? r : part;
    }
  }
  return out;
}

// ---- unigram -------------------------------------------------------------------------------------------

void T5Tokenizer::unigram(const std::string& s, std::vector<int64_t>& out) const {
  struct Node {
    int64_t id = 0;
    double score = 0.0;
    int64_t start = -1;
  };
  const size_t n = s.size();
  std::vector<Node> best(n + 1);
  auto charLen = [&](size_t i) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    return std::min(len, n - i);
  };
  for (size_t start = 0; start < n;) {
    const double here = best[start].score;
    const size_t mblen = charLen(start);
    bool single = false;
    for (size_t len = 1; len <= longestPiece_ && start + len <= n; ++len) {
      auto it = ids_.find(s.substr(start, len));
      if (it == ids_.end()) continue;
      Node& target = best[start + len];
      const double score = here + pieces_[static_cast<size_t>(it->second)].score;
      if (target.start < 0 || score > target.score) target = {it->second, score, static_cast<int64_t>(start)};
      if (len == mblen) single = true;
    }
    if (!single) {
      Node& target = best[start + mblen];
      const double score = here + unkScore_;
      if (target.start < 0 || score > target.score) target = {unk_, score, static_cast<int64_t>(start)};
    }
    start += mblen;
  }
  // Back from the end; consecutive unknown pieces fuse into one.
  std::vector<int64_t> ids;
  bool lastUnk = false;
  for (size_t end = n; end > 0;) {
    const Node& node = best[end];
    if (node.id == unk_) {
      if (!lastUnk) ids.push_back(unk_);
      lastUnk = true;
    } else {
      ids.push_back(node.id);
      lastUnk = false;
    }
    end = static_cast<size_t>(node.start);
  }
  out.insert(out.end(), ids.rbegin(), ids.rend());
}

// ---- encoding ------------------------------------------------------------------------------------------

std::vector<int64_t> T5Tokenizer::encode(const std::string& text) const {
  std::vector<int64_t> ids;
  auto encodeSegment = [&](const std::string& segment) {
    // Words between whitespace, each with "▁" in front (unless it already starts with one).
    const std::vector<char32_t> norm = unicode::decode(precompiled(segment));
    size_t i = 0;
    while (i < norm.size()) {
      if (unicode::isWhitespace(norm[i])) {
        ++i;
        continue;
      }
      size_t end = i;
      while (end < norm.size() && !unicode::isWhitespace(norm[end])) ++end;
      std::string word = unicode::encode(std::vector<char32_t>(norm.begin() + static_cast<std::ptrdiff_t>(i),
                                                               norm.begin() + static_cast<std::ptrdiff_t>(end)));
      if (word.rfind(kSpace, 0) != 0) word = kSpace + word;
      unigram(word, ids);
      i = end;
    }
  };
  // Special tokens split out of the raw text first: the leftmost match, the longest at that position.
  size_t pos = 0, segmentStart = 0;
  while (pos < text.size()) {
    size_t matched = 0;
    int64_t id = -1;
    for (const auto& a : added_)
      if (a.size() > matched && text.compare(pos, a.size(), a) == 0) {
        matched = a.size();
        id = ids_.at(a);
      }
    if (matched == 0) {
      ++pos;
      continue;
    }
    encodeSegment(text.substr(segmentStart, pos - segmentStart));
    ids.push_back(id);
    pos += matched;
    segmentStart = pos;
  }
  encodeSegment(text.substr(segmentStart));
  return ids;
}

std::vector<int64_t> T5Tokenizer::encodeForModel(const std::string& text, int64_t maxLength) const {
  PARDIT_CHECK(maxLength >= 1, "T5 tokenizer: max length must be at least 1, got ", maxLength);
  std::vector<int64_t> ids = encode(text);
  if (static_cast<int64_t>(ids.size()) > maxLength - 1) ids.resize(static_cast<size_t>(maxLength - 1));
  ids.push_back(eos_);
  ids.resize(static_cast<size_t>(maxLength), pad_);
  return ids;
}

}  // namespace pardit::text
