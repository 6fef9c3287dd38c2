// The engine's encode stage: prompts as text -> CLIP's pooled output and T5's hidden states, on one rank.
#include <ATen/ATen.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <optional>

#include "engine_impl.h"
#include "pardit/core/error.h"
#include "pardit/core/files.h"
#include "pardit/core/format.h"
#include "pardit/core/log.h"
#include "pardit/core/sysinfo.h"
#include "pardit/core/timer.h"
#include "pardit/io/text_encoder_checkpoint.h"
#include "pardit/model/text_encoders.h"
#include "pardit/text/clip_tokenizer.h"
#include "pardit/text/t5_tokenizer.h"

namespace fs = std::filesystem;

namespace pardit::pipeline {

detail::TextSources detail::textSourcesOf(const EngineOptions& options, const io::FluxCheckpoint* checkpoint,
                                          const std::string& modelName) {
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
  pick(s.t5, "text_encoder_2",
       {"t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors",
        "t5xxl.safetensors"},
       "--text-encoder-2");
  pick(s.clipTokenizer, "tokenizer", {"clip_tokenizer"}, "--tokenizer");
  pick(s.t5Tokenizer, "tokenizer_2", {"t5_tokenizer"}, "--tokenizer-2");
  return s;
}

Engine::Impl::TextSources Engine::Impl::textSources() const {
  return detail::textSourcesOf(options, checkpoint ? &*checkpoint : nullptr, modelName);
}

Engine::Impl::TextPrompts Engine::Impl::readTextPrompts(const PromptInput& prompt, const PromptInput& negative,
                                                        bool trueCfg, int64_t maxLength) const {
  TextPrompts t;
  t.maxLength = maxLength > 0 ? maxLength : (config.guidanceEmbed ? 512 : 256);
  t.clip = prompt.texts;
  if (!prompt.textFile.empty()) {
    std::ifstream in(prompt.textFile);
    PARDIT_CHECK(in.good(), prompt.textFile, ": cannot open (--prompt-file)");
    registerInputFile(prompt.textFile);
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

// One rank's text encoders, loaded: the tokenizers, CLIP resident, and T5 resident when it fits
// `freeBytes` beside CLIP, else streamed (each block read when it runs).
class detail::TextEncoders {
 public:
  TextEncoders(const detail::TextSources& sources, c10::ScalarType dtype, WeightDtype weightDtype,
               const c10::Device& where, uint64_t freeBytes)
      : sources_(sources),
        clipTok_(text::ClipTokenizer::open(sources.clipTokenizer)),
        t5Tok_(text::T5Tokenizer::open(sources.t5Tokenizer)),
        clipCk_(io::ClipTextCheckpoint::open(sources.clip)),
        t5Ck_(io::T5Checkpoint::open(sources.t5)),
        clip_(clipCk_.config, clipCk_.store.getter(dtype, where)) {
    t5Format_ = detail::t5WeightFormat(weightDtype, t5Ck_);
    const io::TensorStore* store = &t5Ck_.store;
    const TensorReader read = formatReader(
        t5Format_, [store](const std::string& n, c10::ScalarType t, c10::Device d) { return store->load(n, t, d); },
        [store](const std::string& n, c10::Device d) { return store->loadFp8(n, d); }, model::t5Fp8Eligible);
    const auto t5Tensors = model::t5EncoderTensors(t5Ck_.config, t5Format_);
    const uint64_t t5Bytes = model::storedBytes(t5Tensors, dtype);
    streamed_ = t5Bytes + clip_.weightBytes() > freeBytes;
    residentBytes_ = clip_.weightBytes() + (streamed_ ? 0 : t5Bytes);
    if (!streamed_)
      for (const auto& t : t5Tensors) resident_[t.name] = read(t.name, dtype, where);
    t5_.emplace(t5Ck_.config, streamed_
                                  ? getterOf(read, dtype, where)
                                  : model::WeightGetter([this](const std::string& n) { return resident_.at(n); }));
  }
  TextEncoders(const TextEncoders&) = delete;
  TextEncoders& operator=(const TextEncoders&) = delete;

  // T5's hidden states [B, maxLength, D] and CLIP's pooled output [B, P], on the CPU.
  std::pair<at::Tensor, at::Tensor> encode(const std::vector<std::string>& clipTexts,
                                           const std::vector<std::string>& t5Texts, int64_t maxLength) const {
    Timer timer;
    std::vector<std::vector<int64_t>> c, t;
    for (const auto& s : clipTexts) c.push_back(clipTok_.encodeForModel(s, clipCk_.config.maxPositions));
    for (const auto& s : t5Texts) t.push_back(t5Tok_.encodeForModel(s, maxLength));
    const at::Tensor cids = idsTensor(c), tids = idsTensor(t);
    PARDIT_CHECK(cids.max().item<int64_t>() < clipCk_.config.vocabSize, sources_.clipTokenizer,
                 ": token ids beyond CLIP's vocabulary of ", clipCk_.config.vocabSize);
    PARDIT_CHECK(tids.max().item<int64_t>() < t5Ck_.config.vocabSize, sources_.t5Tokenizer,
                 ": token ids beyond T5's vocabulary of ", t5Ck_.config.vocabSize);
    const double tokenize = timer.seconds();
    const at::Tensor pooled = clip_.pooled(cids).cpu();
    const double clip = timer.seconds();
    at::Tensor hidden = t5_->forward(tids).cpu();
    logDebug("encode: tokenizers ", formatSeconds(tokenize), ", CLIP ", formatSeconds(clip - tokenize), ", T5 ",
             formatSeconds(timer.seconds() - clip));
    return {hidden, pooled};
  }
  bool t5Streamed() const { return streamed_; }
  uint64_t residentBytes() const { return residentBytes_; }  // the weights the encoders hold
  model::WeightFormat t5Format() const { return t5Format_; }
  uint64_t bytesRead() const { return clipCk_.store.bytesRead() + t5Ck_.store.bytesRead(); }

 private:
  detail::TextSources sources_;
  text::ClipTokenizer clipTok_;
  text::T5Tokenizer t5Tok_;
  io::ClipTextCheckpoint clipCk_;
  io::T5Checkpoint t5Ck_;
  model::ClipTextModel clip_;
  bool streamed_ = false;
  uint64_t residentBytes_ = 0;
  std::map<std::string, at::Tensor> resident_;
  std::optional<model::T5Encoder> t5_;
  model::WeightFormat t5Format_ = model::WeightFormat::kDense;
};

void Engine::Impl::releaseTextEncoders() {
  if (!keptEncoders) return;
  keptEncoders.reset();
  keptEncoderRank = -1;
  releaseFreedMemory();
}

uint64_t Engine::Impl::keptEncoderBytes() const { return keptEncoders ? keptEncoders->residentBytes() : 0; }

std::pair<PromptEmbeddings, std::optional<PromptEmbeddings>> Engine::Impl::encodeTexts(
    Run& run, const TextPrompts& prompts, uint64_t spareBytes, uint64_t freeBytes, uint64_t keepBytes) {
  Timer timer;
  // The encoding rank: --text-encoder-rank, or the one with the most spare memory after its plan (the
  // lowest on ties).
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
  model::WeightFormat t5Format = model::WeightFormat::kDense;
  bool reused = false, kept = false;
  if (keptEncoders && keptEncoderRank != encoder) releaseTextEncoders();  // another rank encodes now
  rt.agree([&] {
    if (rt.worldRank() != encoder) return;
    const c10::Device where = options.textEncoderDevice == EncoderDevice::kCpu ? c10::Device(c10::kCPU) : device;
    std::shared_ptr<detail::TextEncoders> loaded = keptEncoders;
    reused = loaded != nullptr;
    if (!loaded) {
      const LoadingAllocations loading;
      loaded = std::make_shared<detail::TextEncoders>(sources, dtype, options.weightDtype, where, freeBytes);
    }
    const detail::TextEncoders& encoders = *loaded;
    streamed = encoders.t5Streamed();
    t5Format = encoders.t5Format();
    for (int b = 0; b < branches; ++b) {
      auto [h, p] = b == 0 ? encoders.encode(prompts.clip, prompts.t5, L)
                           : encoders.encode(prompts.negativeClip, prompts.negativeT5, L);
      hidden[b].copy_(h);
      pooled[b].copy_(p);
    }
    if (!reused) textBytesRead += encoders.bytesRead();
    // Kept for the next request when they stay resident within what the transformer's plan and the decode
    // leave of the budget; else gone before the transformer loads.
    kept = !encoders.t5Streamed() && encoders.residentBytes() <= keepBytes;
    keptEncoders = kept ? loaded : nullptr;
    keptEncoderRank = kept ? encoder : -1;
  });
  if (!kept) releaseFreedMemory();
  rt.world().broadcast(hidden, encoder);
  rt.world().broadcast(pooled, encoder);
  const double seconds = timer.seconds();
  run.recorder.addStage("encode", seconds, rt.worldRank() == encoder ? textBytesRead : 0);
  if (rt.worldRank() == encoder)
    logInfo("encoded ", B, B == 1 ? " prompt" : " prompts", branches == 2 ? " and negative prompts" : "", " on rank ",
            encoder, " (CLIP; T5 ", L, " tokens, ", t5Format == model::WeightFormat::kFp8 ? "FP8 weights, " : "",
            streamed ? "streamed block by block" : "resident", "; ",
            reused ? std::string("loaded by an earlier request")
                   : formatBytes(textBytesRead) + " of encoder weights read so far",
            kept ? ", kept loaded: they fit beside the transformer" : "", ") in ", formatSeconds(seconds));
  std::optional<PromptEmbeddings> negative;
  if (branches == 2) negative = PromptEmbeddings{hidden[1], pooled[1]};
  return {PromptEmbeddings{hidden[0], pooled[0]}, negative};
}

void Engine::Impl::benchmarkEncode(const BenchmarkRequest& request, BenchmarkResult& r) {
  rt.agree([&] {
    PARDIT_CHECK(rt.worldSize() == 1, "bench --encode runs on one rank (the encode stage runs on one), not ",
                 rt.worldSize());
    checkTextEncoders();
  });
  const TextSources sources = textSources();
  const std::string prompt = request.prompt.empty()
                                 ? "a photograph of an astronaut riding a horse across the surface of the moon, "
                                   "earth in the sky, 35 mm film, high detail"
                                 : request.prompt;
  const std::vector<std::string> texts(static_cast<size_t>(request.batch), prompt);
  const int64_t L = request.maxSequenceLength > 0 ? request.maxSequenceLength : (config.guidanceEmbed ? 512 : 256);
  const c10::Device where = options.textEncoderDevice == EncoderDevice::kCpu ? c10::Device(c10::kCPU) : device;
  Timer load;
  std::optional<detail::TextEncoders> loaded;
  {
    const LoadingAllocations loading;
    loaded.emplace(sources, dtype, options.weightDtype, where, detail::budgetOf(options, device, rt.localSize()));
  }
  const detail::TextEncoders& encoders = *loaded;
  r.encodeLoadSeconds = load.seconds();
  r.encodeT5Streamed = encoders.t5Streamed();
  r.textLen = L;
  Run run(rt);
  run.steps = request.iters;
  for (int i = 0; i < request.warmup + request.iters; ++i) {
    Timer t;
    run.recorder.beginStep();
    (void)encoders.encode(texts, texts, L);  // tokenizers, CLIP and T5; results on the CPU
    run.recorder.endStep();
    if (i >= request.warmup) r.samples.push_back(t.seconds());
  }
  textBytesRead += encoders.bytesRead();
  finishMetrics(run, "bench", std::accumulate(r.samples.begin(), r.samples.end(), 0.0), request.warmup,
                request.batch * (request.warmup + request.iters));
}

}  // namespace pardit::pipeline
