#include "pardit/parallel/pipefusion.h"

#include <ATen/ATen.h>

#include <limits>
#include <numeric>
#include <sstream>

#include "pardit/core/error.h"
#include "pardit/core/timer.h"
#include "pardit/pipeline/latents.h"

namespace pardit::parallel {

// ---- stage partition ----------------------------------------------------------------------------------

StagePartition::StagePartition(std::vector<int64_t> counts) : counts_(std::move(counts)) {}

int64_t StagePartition::begin(int stage) const {
  int64_t b = 0;
  for (int s = 0; s < stage; ++s) b += counts_.at(s);
  return b;
}

std::vector<std::string> StagePartition::groupsOf(int stage, const model::FluxConfig& c) const {
  std::vector<std::string> groups{"conditioning"};
  if (stage == 0) groups.push_back("input_embedders");
  for (int64_t b = begin(stage); b < end(stage); ++b)
    groups.push_back(b < c.depth ? "double_blocks." + std::to_string(b) : "single_blocks." + std::to_string(b - c.depth));
  if (stage == stages() - 1) groups.push_back("final_layer");
  return groups;
}

std::string StagePartition::describe(const model::FluxConfig& c) const {
  std::ostringstream os;
  for (int s = 0; s < stages(); ++s) {
    const int64_t b = begin(s), e = end(s);
    const int64_t nd = std::max<int64_t>(0, std::min(e, c.depth) - b);
    os << (s ? " | " : "") << "stage " << s << ": " << nd << "D+" << (e - b - nd) << "S";
  }
  return os.str();
}

namespace {
uint64_t groupBytes(const model::WeightGroupSpec& g) {
  uint64_t n = 0;
  for (const auto& t : g.tensors) {
    uint64_t e = 1;
    for (auto d : t.shape) e *= static_cast<uint64_t>(d);
    n += e;
  }
  return n;
}
}  // namespace

StagePartition partitionStages(const model::FluxConfig& c, int stages, const std::string& mode) {
  const int64_t total = c.depth + c.depthSingle;
  PARDIT_CHECK(stages >= 1 && stages <= total, "--pipefusion-degree ", stages, " must be between 1 and the ", total,
               " transformer blocks");
  std::vector<int64_t> counts;
  if (mode == "compute") {
    // Double and single blocks cost the same per token, so equal counts balance the compute.
    for (int s = 0; s < stages; ++s) counts.push_back(total / stages + (s < total % stages ? 1 : 0));
  } else if (mode == "memory") {
    // Contiguous split minimising the largest stage's weight bytes (dynamic programming).
    std::vector<uint64_t> bytes;
    const auto groups = model::fluxWeightGroups(c);
    for (const auto& g : groups)
      if (g.name.rfind("double_blocks.", 0) == 0 || g.name.rfind("single_blocks.", 0) == 0) bytes.push_back(groupBytes(g));
    uint64_t inputBytes = 0, finalBytes = 0;
    for (const auto& g : groups) {
      if (g.name == "input_embedders") inputBytes = groupBytes(g);
      if (g.name == "final_layer") finalBytes = groupBytes(g);
    }
    const auto N = static_cast<size_t>(total);
    std::vector<uint64_t> prefix(N + 1, 0);
    for (size_t i = 0; i < N; ++i) prefix[i + 1] = prefix[i] + bytes[i];
    auto cost = [&](int s, size_t i, size_t j) {  // blocks [i, j) on stage s
      return prefix[j] - prefix[i] + (s == 0 ? inputBytes : 0) + (s == stages - 1 ? finalBytes : 0);
    };
    const uint64_t inf = std::numeric_limits<uint64_t>::max();
    std::vector<std::vector<uint64_t>> best(stages + 1, std::vector<uint64_t>(N + 1, inf));
    std::vector<std::vector<size_t>> cut(stages + 1, std::vector<size_t>(N + 1, 0));
    best[0][0] = 0;
    for (int s = 1; s <= stages; ++s)
      for (size_t j = s; j <= N; ++j)
        for (size_t i = s - 1; i < j; ++i) {
          if (best[s - 1][i] == inf) continue;
          const uint64_t v = std::max(best[s - 1][i], cost(s - 1, i, j));
          if (v < best[s][j]) {
            best[s][j] = v;
            cut[s][j] = i;
          }
        }
    counts.assign(stages, 0);
    size_t j = N;
    for (int s = stages; s >= 1; --s) {
      counts[s - 1] = static_cast<int64_t>(j - cut[s][j]);
      j = cut[s][j];
    }
  } else {
    std::stringstream ss(mode);
    std::string item;
    while (std::getline(ss, item, ',')) {
      try {
        size_t used = 0;
        counts.push_back(std::stoll(item, &used));
        PARDIT_CHECK(used == item.size(), "");
      } catch (const std::exception&) {
        PARDIT_THROW("--pp-partition must be compute, memory or a list of block counts like 10,10,9,9; got '", mode, "'");
      }
    }
    PARDIT_CHECK(static_cast<int>(counts.size()) == stages, "--pp-partition lists ", counts.size(),
                 " stages but --pipefusion-degree is ", stages);
    int64_t sum = 0;
    for (auto n : counts) {
      PARDIT_CHECK(n >= 1, "--pp-partition: every stage needs at least one block");
      sum += n;
    }
    PARDIT_CHECK(sum == total, "--pp-partition counts sum to ", sum, " but the model has ", total, " blocks (",
                 c.depth, " double + ", c.depthSingle, " single)");
  }
  return StagePartition(counts);
}

// ---- patch layout -----------------------------------------------------------------------------------

void PatchLayout::check() const {
  PARDIT_CHECK(patches >= 1, "--num-pipeline-patch must be >= 1, got ", patches);
  PARDIT_CHECK(rows % (static_cast<int64_t>(patches) * spDegree) == 0, "the image has ", rows,
               " token rows (height / 16), not divisible by --num-pipeline-patch ", patches,
               " x the sequence-parallel degree ", spDegree, " (--ulysses-degree x --ring-degree)");
}

at::Tensor PatchLayout::localTokenIndex() const {
  const int64_t sub = rows / (static_cast<int64_t>(patches) * spDegree);
  std::vector<int64_t> idx;
  idx.reserve(static_cast<size_t>(localTokens()));
  for (int p = 0; p < patches; ++p) {
    const int64_t row0 = (static_cast<int64_t>(p) * spDegree + spRank) * sub;
    for (int64_t r = row0; r < row0 + sub; ++r)
      for (int64_t c = 0; c < cols; ++c) idx.push_back(r * cols + c);
  }
  return at::tensor(idx, at::kLong);
}

// ---- K/V buffers ------------------------------------------------------------------------------------

void KvBuffers::storeText(int layer, const at::Tensor& k, const at::Tensor& v) {
  text_[layer] = {k.contiguous(), v.contiguous()};
}

std::pair<at::Tensor, at::Tensor> KvBuffers::text(int layer) const {
  auto it = text_.find(layer);
  PARDIT_CHECK(it != text_.end(), "PipeFusion: no text K/V for layer ", layer);
  return it->second;
}

std::pair<at::Tensor, at::Tensor> KvBuffers::image(int layer, const at::Tensor& k, const at::Tensor& v) {
  if (patch_ < 0) {
    // [B, h, U * (M * Tp), D], source-rank-major -> patch-major [B, h, M * U * Tp, D].
    const int64_t B = k.size(0), h = k.size(1), D = k.size(3);
    const int64_t Tp = k.size(2) / (static_cast<int64_t>(ulysses_) * patches_);
    auto reorder = [&](const at::Tensor& x) {
      return x.reshape({B, h, ulysses_, patches_, Tp, D}).permute({0, 1, 3, 2, 4, 5}).reshape({B, h, -1, D}).contiguous();
    };
    auto& buf = buffers_[layer];
    buf = {reorder(k), reorder(v)};
    return buf;
  }
  auto it = buffers_.find(layer);
  PARDIT_CHECK(it != buffers_.end(), "PipeFusion: no K/V buffer for layer ", layer,
               " (patch steps need at least one warm-up step, --warmup-steps)");
  const int64_t rows = k.size(2);
  it->second.first.narrow(2, patch_ * rows, rows).copy_(k);
  it->second.second.narrow(2, patch_ * rows, rows).copy_(v);
  return it->second;
}

uint64_t KvBuffers::bytes() const {
  uint64_t n = 0;
  for (const auto& [l, kv] : buffers_) n += kv.first.nbytes() + kv.second.nbytes();
  for (const auto& [l, kv] : text_) n += kv.first.nbytes() + kv.second.nbytes();
  return n;
}

// ---- runner -----------------------------------------------------------------------------------------

PipeFusionRunner::PipeFusionRunner(std::shared_ptr<model::FluxTransformer> transformer,
                                   std::shared_ptr<UspAttention> usp, StagePartition partition, int stage,
                                   PatchLayout layout, PipeFusionComms comms, c10::Device device)
    : transformer_(std::move(transformer)),
      usp_(std::move(usp)),
      kv_(std::make_shared<KvBuffers>(usp_->ulyssesDegree(), layout.patches)),
      partition_(std::move(partition)),
      stage_(stage),
      layout_(layout),
      comms_(comms),
      device_(device) {
  PARDIT_CHECK(comms_.pipeline && comms_.sequence, "PipeFusion needs its pipeline and sequence groups");
  PARDIT_CHECK(partition_.stages() == comms_.pipeline->size(), "PipeFusion: ", partition_.stages(),
               " stages for a pipeline group of ", comms_.pipeline->size());
  layout_.check();
  usp_->setTextMode(TextMode::kReplicated);
  usp_->setKvCache(kv_);
}

at::Tensor PipeFusionRunner::recvTensor(std::vector<int64_t> shape, int from) {
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(transformer_->dtype()).device(device_));
  Timer timer;
  comms_.pipeline->recv(t, from);
  stats_.waitSeconds += timer.seconds();
  return t;
}

void PipeFusionRunner::sendTensor(const at::Tensor& t, int to) {
  pendingSends_.push_back(comms_.pipeline->isend(t.contiguous(), to));
}

at::Tensor PipeFusionRunner::localToFull(const at::Tensor& local) const {
  const int N = comms_.sequence->size();
  const int64_t L = layout_.rows * layout_.cols;
  at::Tensor full = at::empty({local.size(0), L, local.size(2)}, local.options());
  if (N == 1) return full.index_copy_(1, layout_.localTokenIndex().to(local.device()), local);
  at::Tensor all = dist::allGather(*comms_.sequence, local.contiguous());  // [N, B, Lloc, C]
  for (int r = 0; r < N; ++r) {
    PatchLayout lr = layout_;
    lr.spRank = r;
    full.index_copy_(1, lr.localTokenIndex().to(local.device()), all[r]);
  }
  return full;
}

PipeFusionRunner::Activations PipeFusionRunner::runStage(const Activations& in, const model::FluxInputs& x) const {
  const auto& c = transformer_->config();
  const model::FluxConfig& cfg = c;
  const model::FluxConditioning cond = transformer_->conditioning(x);
  // Without text activations (later patches of a step) the blocks run on the image rows only.
  at::Tensor img = in.img, txt = in.txt;
  const int64_t T = txt.defined() ? txt.size(1) : 0, b0 = partition_.begin(stage_), b1 = partition_.end(stage_);
  for (int64_t b = b0; b < std::min(b1, cfg.depth); ++b) transformer_->doubleBlock(b, img, txt, cond);
  if (b1 > cfg.depth) {
    at::Tensor xs = T > 0 ? at::cat({txt, img}, 1) : img;
    for (int64_t b = std::max(b0, cfg.depth); b < b1; ++b) xs = transformer_->singleBlock(b - cfg.depth, xs, T, cond);
    if (T > 0) txt = xs.narrow(1, 0, T);
    img = xs.narrow(1, T, xs.size(1) - T);
  }
  if (stage_ == partition_.stages() - 1) img = transformer_->finalLayer(img, cond);
  return {txt, img};
}

at::Tensor PipeFusionRunner::denoise(const at::Tensor& latents, const pipeline::PromptEmbeddings& branch,
                                     const std::optional<pipeline::PromptEmbeddings>& negative, double trueCfgScale,
                                     const pipeline::FlowMatchEulerScheduler& scheduler, bool withGuidance,
                                     double guidanceScale, int warmupSteps,
                                     const std::function<void(const pipeline::StepReport&)>& onStep) {
  Timer total;
  stats_ = {};
  const int P = comms_.pipeline->size(), s = stage_, next = (s + 1) % P, prev = (s + P - 1) % P;
  const bool first = s == 0, last = s == P - 1;
  const int steps = scheduler.steps(), M = layout_.patches;
  const int W = std::min(warmupSteps, steps);
  PARDIT_CHECK(W >= 1 || M == 1, "PipeFusion with --num-pipeline-patch ", M, " needs --warmup-steps >= 1");
  const int64_t B = latents.size(0), C = latents.size(2), h = transformer_->config().hiddenSize;
  const int64_t Lloc = layout_.localTokens(), Tp = layout_.patchTokens();
  // True CFG on this pipeline: both branches travel together as a batch of 2B.
  const bool paired = negative.has_value() && trueCfgScale > 1.0 && comms_.cfg == nullptr;
  pipeline::PromptEmbeddings emb = branch;
  if (paired) {
    PARDIT_CHECK(negative->promptEmbeds.size(1) == branch.promptEmbeds.size(1),
                 "PipeFusion runs both true-CFG branches as one batch: the prompt and negative prompt embeddings "
                 "need the same token count (", branch.promptEmbeds.size(1), " vs ", negative->promptEmbeds.size(1), ")");
    emb.promptEmbeds = at::cat({branch.promptEmbeds, negative->promptEmbeds}, 0);
    emb.pooled = at::cat({branch.pooled, negative->pooled}, 0);
  }
  const int64_t Bm = emb.promptEmbeds.size(0), T = emb.promptEmbeds.size(1);
  auto dup = [&](const at::Tensor& x) { return paired ? at::cat({x, x}, 0) : x; };
  // The velocity of this rank's tokens, after CFG.
  auto combine = [&](const at::Tensor& v) {
    if (paired) return pipeline::combineTrueCfg(v.narrow(0, 0, B), v.narrow(0, B, B), trueCfgScale);
    if (comms_.cfg) {
      at::Tensor both = dist::allGather(*comms_.cfg, v.contiguous());
      return pipeline::combineTrueCfg(both[0], both[1], trueCfgScale);
    }
    return v;
  };

  const at::Tensor index = layout_.localTokenIndex();
  at::Tensor X = latents.index_select(1, index.to(latents.device())).to(device_);  // [B, Lloc, C]
  const at::Tensor idsLocal = pipeline::imageIds({layout_.rows * 16, layout_.cols * 16, C / 4}).index_select(0, index).to(device_);
  const at::Tensor txtIds = pipeline::textIds(T).to(device_);
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device_);
  at::Tensor guidance;
  if (withGuidance) guidance = at::full({1}, guidanceScale, f32).expand({Bm});
  model::FluxInputs x;
  x.pooled = emb.pooled;
  x.guidance = guidance;
  x.txtIds = txtIds;

  for (int i = 0; i < steps; ++i) {
    Timer stepTimer;
    const double waitBefore = stats_.waitSeconds;
    x.timestep = at::full({1}, scheduler.timesteps()[i], f32).expand({Bm}).to(X.scalar_type()) / 1000;
    const bool sendBack = P > 1 && i + 1 < steps;
    if (i < W || M == 1) {
      // Synchronous step over all local tokens: fresh K/V everywhere.
      kv_->setFull();
      x.txtIds = txtIds;
      x.imgIds = idsLocal;
      x.img = X;
      Activations in;
      if (first) {
        if (i > 0 && P > 1) X = recvTensor({B, Lloc, C}, prev);
        in = {transformer_->embedText(emb.promptEmbeds), transformer_->embedImage(dup(X))};
      } else {
        in.txt = recvTensor({Bm, T, h}, prev);
        in.img = recvTensor({Bm, Lloc, h}, prev);
      }
      Activations out = runStage(in, x);
      if (!last) {
        sendTensor(out.txt, next);
        sendTensor(out.img, next);
      } else {
        X = scheduler.step(combine(out.img), i, X);
        if (sendBack) sendTensor(X, next);
      }
    } else {
      at::Tensor txtIn;
      for (int p = 0; p < M; ++p) {
        kv_->setPatch(p);
        x.imgIds = idsLocal.narrow(0, p * Tp, Tp);
        x.txtIds = p == 0 ? txtIds : txtIds.narrow(0, 0, 0);  // RoPE rows: [text ; patch] or the patch alone
        x.img = X.narrow(1, p * Tp, Tp);
        Activations in;
        if (first) {
          if (P > 1 && i == W && p == 0 && W > 0) X = recvTensor({B, Lloc, C}, prev);  // the last warm-up step
          if (P > 1 && i > W) X.narrow(1, p * Tp, Tp).copy_(recvTensor({B, Tp, C}, prev));
          // The text passes the stages with the first patch only; later patches reuse its K/V.
          in = {p == 0 ? transformer_->embedText(emb.promptEmbeds) : at::Tensor(),
                transformer_->embedImage(dup(X.narrow(1, p * Tp, Tp)))};
        } else {
          // Text activations come once per step, with patch 0.
          if (p == 0) txtIn = recvTensor({Bm, T, h}, prev);
          in = {p == 0 ? txtIn : at::Tensor(), recvTensor({Bm, Tp, h}, prev)};
        }
        Activations out = runStage(in, x);
        if (!last) {
          if (p == 0) sendTensor(out.txt, next);
          sendTensor(out.img, next);
        } else {
          at::Tensor stepped = scheduler.step(combine(out.img), i, X.narrow(1, p * Tp, Tp));
          X.narrow(1, p * Tp, Tp).copy_(stepped);
          if (sendBack) sendTensor(stepped, next);
        }
      }
    }
    // Sends are complete before their buffers could be reused by the next step.
    for (auto& w : pendingSends_) w->wait();
    pendingSends_.clear();
    stats_.stepSeconds.push_back(stepTimer.seconds());
    stats_.stepWaitSeconds.push_back(stats_.waitSeconds - waitBefore);
    if (onStep) onStep(pipeline::StepReport{i, steps, stats_.stepSeconds.back()});
  }
  // The last stage holds the result; every rank of the pipeline gets the full latents.
  at::Tensor full = at::empty({B, layout_.rows * layout_.cols, C}, X.options());
  if (last) full = localToFull(X);
  comms_.pipeline->broadcast(full, P - 1);
  stats_.seconds = total.seconds();
  return full;
}

at::Tensor PipeFusionRunner::forward(const model::FluxInputs& in) {
  const int P = comms_.pipeline->size(), s = stage_, next = (s + 1) % P, prev = (s + P - 1) % P;
  const int64_t B = in.img.size(0), C = transformer_->config().outChannels, h = transformer_->config().hiddenSize;
  const int64_t T = in.txt.size(1), Lloc = layout_.localTokens();
  const at::Tensor index = layout_.localTokenIndex().to(in.img.device());
  kv_->setFull();
  model::FluxInputs x = in;
  x.img = in.img.index_select(1, index);
  x.imgIds = in.imgIds.index_select(0, index);
  Activations a;
  if (s == 0) {
    a = {transformer_->embedText(in.txt), transformer_->embedImage(x.img)};
  } else {
    a.txt = recvTensor({B, T, h}, prev);
    a.img = recvTensor({B, Lloc, h}, prev);
  }
  Activations out = runStage(a, x);
  if (s != P - 1) {
    sendTensor(out.txt, next);
    sendTensor(out.img, next);
  }
  for (auto& w : pendingSends_) w->wait();
  pendingSends_.clear();
  at::Tensor full = at::empty({B, layout_.rows * layout_.cols, C}, out.img.options());
  if (s == P - 1) full = localToFull(out.img);
  comms_.pipeline->broadcast(full, P - 1);
  return full;
}

}  // namespace pardit::parallel
