// Tokenizer files from the input, then a prompt through them. The first byte picks the format: a T5
// SentencePiece model (spiece.model), a T5 tokenizer.json, a CLIP tokenizer.json, or CLIP vocab.json +
// merges.txt (split at the first NUL). The rest of the input after a second NUL is the prompt.
#include "fuzz_common.h"
#include "pardit/core/error.h"
#include "pardit/text/clip_tokenizer.h"
#include "pardit/text/t5_tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const int kind = data[0] % 4;
  auto [file, rest] = pardit::fuzz::split(data + 1, size - 1);
  const auto [second, promptTail] = pardit::fuzz::split(reinterpret_cast<const uint8_t*>(rest.data()), rest.size());
  const std::string prompt = promptTail.empty() ? "a cat on the moon, 3 times: ÄÖÜ 日本" : promptTail;
  try {
    if (kind == 0 || kind == 1) {
      const std::string path =
          pardit::fuzz::writeFile(kind == 0 ? "spiece.model" : "t5.json", file.data(), file.size());
      const auto tok = kind == 0 ? pardit::text::T5Tokenizer::fromSentencePiece(path)
                                 : pardit::text::T5Tokenizer::fromTokenizerJson(path);
      (void)tok.encodeForModel(prompt, 64);
    } else if (kind == 2) {
      const std::string path = pardit::fuzz::writeFile("clip.json", file.data(), file.size());
      (void)pardit::text::ClipTokenizer::fromTokenizerJson(path).encodeForModel(prompt);
    } else {
      const std::string vocab = pardit::fuzz::writeFile("vocab.json", file.data(), file.size());
      const std::string merges = pardit::fuzz::writeFile("merges.txt", second.data(), second.size());
      (void)pardit::text::ClipTokenizer::fromFiles(vocab, merges).encodeForModel(prompt);
    }
  } catch (const pardit::Error&) {
  }
  return 0;
}
