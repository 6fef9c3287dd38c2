// The CLIP and T5 tokenizers against transformers' CLIPTokenizer and T5TokenizerFast on a corpus of 2,400
// prompts (tests/fixtures/tokenizer_corpus.json), with FLUX.1's real vocabularies, which launch/install.sh
// --vocab builds beside the venv with tests/text/real_vocab.py (never committed; launch/test.sh installs them,
// and the tests skip visibly, naming that command, where they are missing).
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "pardit/core/error.h"
#include "pardit/text/clip_tokenizer.h"
#include "pardit/text/t5_tokenizer.h"
#include "test_util.h"

using namespace pardit;

namespace {

class RealVocab : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::ifstream in(test::fixture("tokenizer_corpus.json"));
    corpus_ = new nlohmann::json(nlohmann::json::parse(in));
  }
  static void TearDownTestSuite() { delete corpus_; }
  void SetUp() override {
    if (!std::filesystem::exists(path("t5/tokenizer.json")))
      GTEST_SKIP() << "the real vocabularies are not installed in '" << PARDIT_VOCAB_DIR
                   << "': launch/install.sh --vocab (with the build's PARDIT_VENV) builds them";
  }
  static std::string path(const std::string& rel) { return (std::filesystem::path(PARDIT_VOCAB_DIR) / rel).string(); }

  static nlohmann::json* corpus_;
};
nlohmann::json* RealVocab::corpus_ = nullptr;

std::string list(const std::vector<int64_t>& v) {
  std::string s;
  for (auto x : v) s += std::to_string(x) + " ";
  return s;
}

std::string show(const std::string& s) {
  std::string out;
  for (unsigned char c : s) out += c < 0x20 ? "\\x" + std::to_string(c) : std::string(1, static_cast<char>(c));
  return out;
}

}  // namespace

TEST_F(RealVocab, ClipIdsEqualTransformersOnTheCorpus) {
  for (const std::string dir : {"clip", "clip_json"}) {
    const auto tok = text::ClipTokenizer::open(path(dir));
    EXPECT_EQ(tok.vocabSize(), 49408u);
    EXPECT_EQ(tok.bosId(), 49406);
    EXPECT_EQ(tok.eosId(), 49407);
    size_t same = 0, total = 0;
    for (const auto& row : (*corpus_)["prompts"]) {
      const std::string t = row["text"];
      std::vector<int64_t> ids = tok.encode(t);
      ids.insert(ids.begin(), tok.bosId());
      ids.push_back(tok.eosId());
      const auto expect = row["clip"].get<std::vector<int64_t>>();
      ++total;
      if (ids == expect) {
        ++same;
      } else if (total - same <= 5) {
        ADD_FAILURE() << dir << ": '" << show(t) << "'";
      }
    }
    std::printf("[tokenizer] CLIP (%s): %zu of %zu prompts give transformers' ids\n", dir.c_str(), same, total);
    EXPECT_EQ(same, total) << dir;
  }
}

TEST_F(RealVocab, T5IdsEqualTransformersOnTheCorpus) {
  const auto tok = text::T5Tokenizer::open(path("t5"));
  EXPECT_EQ(tok.vocabSize(), 32100u);
  EXPECT_EQ(tok.eosId(), 1);
  EXPECT_EQ(tok.padId(), 0);
  size_t same = 0, total = 0;
  for (const auto& row : (*corpus_)["prompts"]) {
    const std::string t = row["text"];
    std::vector<int64_t> ids = tok.encode(t);
    ids.push_back(tok.eosId());
    const auto expect = row["t5"].get<std::vector<int64_t>>();
    ++total;
    if (ids == expect) {
      ++same;
    } else if (total - same <= 8) {
      ADD_FAILURE() << "'" << show(t) << "': " << list(ids) << "\n  transformers: " << list(expect);
    }
  }
  std::printf("[tokenizer] T5: %zu of %zu prompts give transformers' ids\n", same, total);
  EXPECT_EQ(same, total);
}

TEST_F(RealVocab, PaddingAndTruncationAsFluxPipeline) {
  const auto clip = text::ClipTokenizer::open(path("clip"));
  const auto t5 = text::T5Tokenizer::open(path("t5"));
  for (const auto& row : (*corpus_)["flux"]) {
    const std::string t = row["text"];
    EXPECT_EQ(clip.encodeForModel(t, 77), row["clip"].get<std::vector<int64_t>>()) << show(t);
    EXPECT_EQ(t5.encodeForModel(t, 512), row["t5_512"].get<std::vector<int64_t>>()) << show(t);
    EXPECT_EQ(t5.encodeForModel(t, 256), row["t5_256"].get<std::vector<int64_t>>()) << show(t);
  }
}

TEST(Tokenizers, MissingOrBrokenFilesAreOneLineErrors) {
  test::TempDir dir;
  EXPECT_THROW(text::ClipTokenizer::open(dir.path().string()), Error);
  EXPECT_THROW(text::T5Tokenizer::open(dir.path().string()), Error);
  std::ofstream(dir.file("vocab.json")) << "{\"a\": 0}";
  std::ofstream(dir.file("merges.txt")) << "#version: 0.2\na b\n";
  try {
    text::ClipTokenizer::open(dir.path().string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("merges.txt: merge 1 'a b' uses a token that is not in the vocabulary"),
              std::string::npos)
        << e.message();
  }
  std::ofstream(dir.file("tokenizer.json")) << "{\"model\": {\"type\": \"BPE\"}";
  EXPECT_THROW(text::T5Tokenizer::open(dir.path().string()), Error);
}
