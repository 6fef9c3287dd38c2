// The engine's encode stage: prompts as text -> CLIP's pooled output and T5's hidden states, on one rank.
#include <ATen/ATen.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "engine_impl.h"
#include "pardit/core/error.h"
#include "pardit/core/format.h"
#include "pardit/core/log.h"
#include "pardit/core/timer.h"
#include "pardit/io/text_encoder_checkpoint.h"
#include "pardit/model/text_encoders.h"
#include "pardit/text/clip_tokenizer.h"
#include "pardit/text/t5_tokenizer.h"

namespace fs = std::filesystem;

namespace pardit::pipeline {

Engine::Impl::TextSources Engine::Impl::textSources() const {
  TextSources s{options.textEncoder, options.textEncoder2, options.tokenizer, options.tokenizer2};
  // A diffusers pipeline folder holds every part; beside a BFL file, the single files users keep there.
  fs::path root;
  if (checkpoint && checkpoint->layout() == io::CheckpointLayout::kDiffusers)
    root = fs::path(checkpoint->files().front()->path()).parent_path().parent_path();
  const fs::path beside = checkpoint ? fs::path(checkpoint->files().front()->path()).parent_path() : fs::path();
  auto pick = [&](std::string& out, const char* sub, std::vector<const char*> files, const char* flag) {
    if (!out.empty()) return;
    if (!root.empty() && fs::exists(root / sub)) {
      out = (root / sub).string();
      return;
    }
    for (const char* f : files)
      if (!beside.empty() && fs::exists(beside / f)) {
        out = (beside / f).string();
        return;
      }
    PARDIT_THROW("a text prompt needs ", flag, ": ", modelName, " has no ", sub, "/ beside it");
  };
  pick(s.clip, "text_encoder", {"clip_l.safetensors"}, "--text-encoder");
  pick(s.t5, "text_encoder_2", {"t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "t5xxl.safetensors"},
       "--text-encoder-2");
  pick(s.clipTokenizer, "tokenizer", {"clip_tokenizer"}, "--tokenizer");
  pick(s.t5Tokenizer, "tokenizer_2", {"t5_tokenizer"}, "--tokenizer-2");
  return s;
}

Engine::Impl::TextPrompts Engine::Impl::readTextPrompts(const PromptInput& prompt, const PromptInput& negative,
                                                        bool trueCfg, int64_t maxLength) const {
  TextPrompts t;
  t.maxLength = maxLength > 0 ? maxLength : (config.guidanceEmbed ? 512 : 256);
  t.clip = prompt.texts;
  if (!prompt.textFile.empty()) {
    std::ifstream in(prompt.textFile);
    PARDIT_CHECK(in.good(), prompt.textFile, ": cannot open (--prompt-file)");
    std::string line;
    while (std::getline(in, line)) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (!line.empty()) t.clip.push_back(line);
    }
    PARDIT_CHECK(!t.clip.empty(), prompt.textFile, ": no prompts (--prompt-file)");
  }
  t.t5 = prompt.texts2.empty() ? t.clip : prompt.texts2;
  PARDIT_CHECK(t.t5.size() == t.clip.size(), "--prompt-2 gives ", t.t5.size(), " prompts for ", t.clip.size(),
               " prompts");
  if (trueCfg) {
    PARDIT_CHECK(negative.isText(), "with a text --prompt, true CFG needs a text --negative-prompt");
    t.negativeClip = negative.texts;
    if (t.negativeClip.size() == 1 && t.clip.size() > 1) t.negativeClip.assign(t.clip.size(), negative.texts[0]);
    t.negativeT5 = negative.texts2.empty() ? t.negativeClip : negative.texts2;
    PARDIT_CHECK(t.negativeClip.size() == t.clip.size() && t.negativeT5.size() == t.clip.size(),
                 "--negative-prompt: one negative prompt, or one per prompt");
  }
  return t;
}

void Engine::Impl::checkTextEncoders() const {
  const TextSources s = textSources();
  const auto clip = io::ClipTextCheckpoint::open(s.clip);
  const auto t5 = io::T5Checkpoint::open(s.t5);
  PARDIT_CHECK(t5.config.dModel == config.contextInDim, s.t5, ": T5's width ", t5.config.dModel,
               " is not the transformer's text input width ", config.contextInDim);
  PARDIT_CHECK(clip.config.hiddenSize == config.vecInDim, s.clip, ": CLIP's width ", clip.config.hiddenSize,
               " is not the transformer's pooled input width ", config.vecInDim);
  for (const auto& dir : {s.clipTokenizer, s.t5Tokenizer})
    PARDIT_CHECK(fs::is_directory(dir), dir, ": not a tokenizer directory");
}

namespace {

at::Tensor idsTensor(const std::vector<std::vector<int64_t>>& rows) {
  at::Tensor t = at::empty({static_cast<int64_t>(rows.size()), static_cast<int64_t>(rows.at(0).size())}, at::kLong);
  for (size_t i = 0; i < rows.size(); ++i)
    std::memcpy(t[static_cast<int64_t>(i)].data_ptr<int64_t>(), rows[i].data(), rows[i].size() * sizeof(int64_t));
  return t;
}

}  // namespace

std::pair<PromptEmbeddings, std::optional<PromptEmbeddings>> Engine::Impl::encodeTexts(Run& run,
                                                                                       const TextPrompts& prompts,
                                                                                       uint64_t spareBytes) {
  Timer timer;
  // The encoding rank: --text-encoder-rank, or the one with the most spare memory (the lowest on ties).
  int encoder = options.textEncoderRank;
  if (encoder < 0) {
    const at::Tensor spare = dist::allGather(rt.world(), at::tensor({static_cast<double>(spareBytes)}, at::kDouble));
    encoder = static_cast<int>(spare.view({-1}).argmax().item<int64_t>());
  }
  PARDIT_CHECK(encoder < rt.worldSize(), "--text-encoder-rank ", encoder, " is not a rank of this ", rt.worldSize(),
               "-rank job");
  const TextSources sources = textSources();
  const auto clipConfig = io::ClipTextCheckpoint::open(sources.clip).config;
  const auto t5Config = io::T5Checkpoint::open(sources.t5).config;
  const int64_t B = static_cast<int64_t>(prompts.clip.size()), L = prompts.maxLength;
  const int branches = prompts.negativeClip.empty() ? 1 : 2;
  // [branch, B, L, D] and [branch, B, P] on every rank; rank `encoder` fills them.
  at::Tensor hidden = at::empty({branches, B, L, t5Config.dModel}, at::TensorOptions().dtype(dtype));
  at::Tensor pooled = at::empty({branches, B, clipConfig.hiddenSize}, at::TensorOptions().dtype(dtype));
  bool streamed = false;
  rt.agree([&] {
    if (rt.worldRank() != encoder) return;
    const c10::Device where = options.textEncoderDevice == config::EncoderDevice::kCpu ? c10::Device(c10::kCPU) : device;
    const auto clipTok = text::ClipTokenizer::open(sources.clipTokenizer);
    const auto t5Tok = text::T5Tokenizer::open(sources.t5Tokenizer);
    auto clipCk = io::ClipTextCheckpoint::open(sources.clip);
    auto t5Ck = io::T5Checkpoint::open(sources.t5);
    const model::ClipTextModel clip(clipCk.config, clipCk.store.getter(dtype, where));
    // T5 resident when it fits the spare memory, else streamed: each block read when it runs.
    const auto t5Tensors = model::t5EncoderTensors(t5Ck.config);
    uint64_t t5Bytes = 0;
    for (const auto& t : t5Tensors) t5Bytes += c10::elementSize(dtype) * static_cast<uint64_t>(c10::multiply_integers(t.shape));
    streamed = t5Bytes > spareBytes;
    std::map<std::string, at::Tensor> resident;
    if (!streamed)
      for (const auto& t : t5Tensors) resident[t.name] = t5Ck.store.load(t.name, dtype, where);
    const model::WeightGetter t5Get = streamed ? t5Ck.store.getter(dtype, where)
                                               : model::WeightGetter([&](const std::string& n) { return resident.at(n); });
    const model::T5Encoder t5(t5Ck.config, t5Get);
    for (int b = 0; b < branches; ++b) {
      const auto& clipTexts = b == 0 ? prompts.clip : prompts.negativeClip;
      const auto& t5Texts = b == 0 ? prompts.t5 : prompts.negativeT5;
      std::vector<std::vector<int64_t>> c, t;
      for (const auto& s : clipTexts) c.push_back(clipTok.encodeForModel(s, clipConfig.maxPositions));
      for (const auto& s : t5Texts) t.push_back(t5Tok.encodeForModel(s, L));
      const at::Tensor cids = idsTensor(c), tids = idsTensor(t);
      PARDIT_CHECK(cids.max().item<int64_t>() < clipConfig.vocabSize, sources.clipTokenizer,
                   ": token ids beyond CLIP's vocabulary of ", clipConfig.vocabSize);
      PARDIT_CHECK(tids.max().item<int64_t>() < t5Config.vocabSize, sources.t5Tokenizer,
                   ": token ids beyond T5's vocabulary of ", t5Config.vocabSize);
      pooled[b].copy_(clip.pooled(cids).cpu());
      hidden[b].copy_(t5.forward(tids).cpu());
    }
    textBytesRead += clipCk.store.bytesRead() + t5Ck.store.bytesRead();
  });
  rt.world().broadcast(hidden, encoder);
  rt.world().broadcast(pooled, encoder);
  const double seconds = timer.seconds();
  run.recorder.addStage("encode", seconds, rt.worldRank() == encoder ? textBytesRead : 0);
  if (rt.worldRank() == encoder)
    logInfo("encoded ", B, B == 1 ? " prompt" : " prompts", branches == 2 ? " and negative prompts" : "", " on rank ",
            encoder, " (CLIP; T5 ", L, " tokens, ", streamed ? "streamed block by block" : "resident", "; ",
            formatBytes(textBytesRead), " of encoder weights read) in ", formatSeconds(seconds));
  std::optional<PromptEmbeddings> negative;
  if (branches == 2) negative = PromptEmbeddings{hidden[1], pooled[1]};
  return {PromptEmbeddings{hidden[0], pooled[0]}, negative};
}

}  // namespace pardit::pipeline
