#pragma once
// CLIP's byte-level BPE tokenizer, with the behaviour of transformers' CLIPTokenizer (the tokenizers
// backend): the special tokens <|startoftext|> / <|endoftext|> split out of the raw text; NFC, whitespace
// runs -> " ", lowercase; the pieces of CLIP's pattern
//   <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
// mapped to GPT-2's byte alphabet; BPE by merge rank with "</w>" on each piece's last symbol.
//
// Files: tokenizer/vocab.json + merges.txt (the published FLUX.1 folders), or tokenizer/tokenizer.json
// (what transformers >= 5 writes).

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace pardit::text {

// GPT-2's reversible byte -> printable character table that CLIP maps bytes with (indexed by byte).
std::vector<std::string> clipByteAlphabet();
// The same 256 symbols in the order CLIP's vocabulary lists them (ids 0-255).
std::vector<std::string> clipByteSymbolsInVocabOrder();

class ClipTokenizer {
 public:
  // A directory holding vocab.json and merges.txt, or tokenizer.json.
  static ClipTokenizer open(const std::string& dir);
  static ClipTokenizer fromFiles(const std::string& vocabJson, const std::string& mergesTxt);
  static ClipTokenizer fromTokenizerJson(const std::string& path);

  // Token ids of `text` without the start/end tokens.
  std::vector<int64_t> encode(const std::string& text) const;
  // What FluxPipeline gives CLIP: <|startoftext|>, the first maxLength - 2 ids, <|endoftext|>, padded with
  // the pad token (<|endoftext|>) to maxLength.
  std::vector<int64_t> encodeForModel(const std::string& text, int64_t maxLength = 77) const;

  int64_t bosId() const { return bos_; }
  int64_t eosId() const { return eos_; }
  int64_t padId() const { return pad_; }
  size_t vocabSize() const { return vocab_.size(); }

 private:
  ClipTokenizer(std::unordered_map<std::string, int64_t> vocab,
                const std::vector<std::pair<std::string, std::string>>& merges, const std::string& where);
  void bpe(const std::string& piece, std::vector<int64_t>& out) const;

  std::unordered_map<std::string, int64_t> vocab_;
  std::unordered_map<std::string, int> ranks_;  // "a b" -> merge rank
  std::vector<std::string> byteChars_;          // GPT-2 byte -> its UTF-8 symbol
  int64_t bos_ = 0, eos_ = 0, pad_ = 0, unk_ = 0;
};

}  // namespace pardit::text
