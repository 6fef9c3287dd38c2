#pragma once
// T5's SentencePiece unigram tokenizer with the behaviour of transformers' T5TokenizerFast (what
// diffusers' FluxPipeline uses): special tokens (<pad>, </s>, <unk>, <extra_id_N>) split out of the raw text;
// the model's precompiled normaliser (nmt_nfkc) applied as the tokenizers library applies it (per grapheme
// cluster); words between Unicode whitespace, each with "▁" in front; unigram Viterbi per word,
// consecutive unknowns fused; "</s>" appended.
//
// Files: tokenizer_2/tokenizer.json, or tokenizer_2/spiece.model (read without libsentencepiece: its
// pieces, scores and normaliser go through the same pipeline, as transformers converts it).

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace pardit::text {

class T5Tokenizer {
 public:
  // A directory holding tokenizer.json or spiece.model.
  static T5Tokenizer open(const std::string& dir);
  static T5Tokenizer fromTokenizerJson(const std::string& path);
  static T5Tokenizer fromSentencePiece(const std::string& path);

  // Token ids of `text`, without "</s>".
  std::vector<int64_t> encode(const std::string& text) const;
  // What FluxPipeline gives T5: the first maxLength - 1 ids, "</s>", padded with <pad> to maxLength.
  std::vector<int64_t> encodeForModel(const std::string& text, int64_t maxLength) const;

  int64_t eosId() const { return eos_; }
  int64_t padId() const { return pad_; }
  size_t vocabSize() const { return pieces_.size(); }

 private:
  struct Piece {
    std::string text;
    double score = 0.0;
  };
  T5Tokenizer() = default;
  void finish(const std::string& where);
  // The Precompiled normaliser's blob: a uint32 byte count, the double-array trie, the replacements.
  void setCharsmap(const std::string& blob, const std::string& where);
  std::string precompiled(const std::string& chunk) const;  // the charsmap's replacement, or the chunk itself
  bool transform(const std::string& chunk, std::string* out) const;
  void unigram(const std::string& word, std::vector<int64_t>& out) const;

  std::vector<Piece> pieces_;
  std::unordered_map<std::string, int64_t> ids_;
  std::vector<std::string> added_;  // special tokens matched in the raw text
  std::vector<uint32_t> trie_;      // the charsmap's double array
  std::string replacements_;        // its NUL-separated replacement strings
  size_t longestPiece_ = 0;
  double unkScore_ = 0.0;
  int64_t unk_ = 2, eos_ = 1, pad_ = 0;
};

}  // namespace pardit::text
