#include "pardit/parallel/pipefusion.h"

#include <ATen/ATen.h>

#include <limits>
#include <numeric>
#include <sstream>

#include "pardit/core/error.h"
#include "pardit/core/timer.h"

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
    groups.push_back(b < c.depth ? "double_blocks." + std::to_string(b)
                                 : "single_blocks." + std::to_string(b - c.depth));
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
uint64_t groupElements(const model::WeightGroupSpec& g) {
  uint64_t n = 0;
  for (const auto& t : g.tensors) {
    uint64_t e = 1;
    for (auto d : t.shape) e *= static_cast<uint64_t>(d);
    n += e;
  }
  return n;
}
}  // namespace

std::string Partition::str() const {
  if (mode == Mode::kCompute) return "compute";
  if (mode == Mode::kMemory) return "memory";
  std::string s;
  for (size_t i = 0; i < counts.size(); ++i) s += (i ? "," : "") + std::to_string(counts[i]);
  return s;
}

StagePartition partitionStages(const model::FluxConfig& c, int stages, const Partition& mode) {
  const int64_t total = c.depth + c.depthSingle;
  PARDIT_CHECK(stages >= 1 && stages <= total, "--pipefusion-degree ", stages, " must be between 1 and the ", total,
               " transformer blocks");
  std::vector<int64_t> counts;
  if (mode.mode == Partition::Mode::kCompute) {
    // Double and single blocks cost the same per token, so equal counts balance the compute.
    for (int s = 0; s < stages; ++s) counts.push_back(total / stages + (s < total % stages ? 1 : 0));
  } else if (mode.mode == Partition::Mode::kMemory) {
    // Contiguous split minimising the largest stage's weight (dynamic programming).
    std::vector<uint64_t> bytes;
    const auto groups = model::fluxWeightGroups(c);
    for (const auto& g : groups)
      if (g.name.rfind("double_blocks.", 0) == 0 || g.name.rfind("single_blocks.", 0) == 0)
        bytes.push_back(groupElements(g));
    uint64_t inputBytes = 0, finalBytes = 0;
    for (const auto& g : groups) {
      if (g.name == "input_embedders") inputBytes = groupElements(g);
      if (g.name == "final_layer") finalBytes = groupElements(g);
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
    counts = mode.counts;
    PARDIT_CHECK(static_cast<int>(counts.size()) == stages, "--pp-partition lists ", counts.size(),
                 " stages but --pipefusion-degree is ", stages);
    int64_t sum = 0;
    for (auto n : counts) {
      PARDIT_CHECK(n >= 1, "--pp-partition: every stage needs at least one block");
      sum += n;
    }
    PARDIT_CHECK(sum == total, "--pp-partition counts sum to ", sum, " but the model has ", total, " blocks (", c.depth,
                 " double + ", c.depthSingle, " single)");
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
      return x.reshape({B, h, ulysses_, patches_, Tp, D})
          .permute({0, 1, 3, 2, 4, 5})
          .reshape({B, h, -1, D})
          .contiguous();
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
                                   std::shared_ptr<UspAttention> usp, PipeFusionOptions options, PipeFusionComms comms)
    : transformer_(std::move(transformer)),
      usp_(std::move(usp)),
      kv_(std::make_shared<KvBuffers>(usp_->ulyssesDegree(), options.layout.patches)),
      options_(std::move(options)),
      comms_(comms) {
  PARDIT_CHECK(comms_.pipeline && comms_.sequence, "PipeFusion needs its pipeline and sequence groups");
  PARDIT_CHECK(options_.partition.stages() == comms_.pipeline->size(), "PipeFusion: ", options_.partition.stages(),
               " stages for a pipeline group of ", comms_.pipeline->size());
  options_.layout.check();
  usp_->setTextMode(TextMode::kReplicated);
  usp_->setKvCache(kv_);
}

at::Tensor PipeFusionRunner::recvTensor(std::vector<int64_t> shape, int from, Channel channel) {
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(transformer_->dtype()).device(options_.device));
  Timer timer;
  communicator(channel).recv(t, from);
  const double waited = timer.seconds();
  stats_.waitSeconds += waited;
  if (!stats_.stepWaitSeconds.empty()) stats_.stepWaitSeconds.back() += waited;
  return t;
}

void PipeFusionRunner::sendTensor(const at::Tensor& t, int to, Channel channel) {
  pendingSends_.push_back(communicator(channel).isend(t.contiguous(), to));
}

dist::Communicator& PipeFusionRunner::communicator(Channel channel) const {
  return channel == Channel::kSendBack && comms_.sendBack ? *comms_.sendBack : *comms_.pipeline;
}

void PipeFusionRunner::completeSends() {
  // Sends are complete before their buffers could be reused.
  for (auto& w : pendingSends_) w->wait();
  pendingSends_.clear();
}

at::Tensor PipeFusionRunner::localToFull(const at::Tensor& local) const {
  const auto& layout = options_.layout;
  const int N = comms_.sequence->size();
  const int64_t L = layout.rows * layout.cols;
  at::Tensor full = at::empty({local.size(0), L, local.size(2)}, local.options());
  if (N == 1) return full.index_copy_(1, layout.localTokenIndex().to(local.device()), local);
  at::Tensor all = dist::allGather(*comms_.sequence, local.contiguous());  // [N, B, Lloc, C]
  for (int r = 0; r < N; ++r) {
    PatchLayout lr = layout;
    lr.spRank = r;
    full.index_copy_(1, lr.localTokenIndex().to(local.device()), all[r]);
  }
  return full;
}

PipeFusionRunner::Activations PipeFusionRunner::runStage(const Activations& in, const model::FluxInputs& x) const {
  const model::FluxConfig& mc = transformer_->config();
  const model::FluxConditioning cond = transformer_->conditioning(x);
  // Without text activations (later patches of a step) the blocks run on the image rows only.
  at::Tensor img = in.img, txt = in.txt;
  const int stage = options_.stage;
  const int64_t T = txt.defined() ? txt.size(1) : 0;
  const int64_t b0 = options_.partition.begin(stage), b1 = options_.partition.end(stage);
  for (int64_t b = b0; b < std::min(b1, mc.depth); ++b) transformer_->doubleBlock(b, img, txt, cond);
  if (b1 > mc.depth) {
    at::Tensor xs = T > 0 ? at::cat({txt, img}, 1) : img;
    for (int64_t b = std::max(b0, mc.depth); b < b1; ++b) xs = transformer_->singleBlock(b - mc.depth, xs, T, cond);
    if (T > 0) txt = xs.narrow(1, 0, T);
    img = xs.narrow(1, T, xs.size(1) - T);
  }
  if (lastStage()) img = transformer_->finalLayer(img, cond);
  return {txt, img};
}

PipeFusionRunner::Activations PipeFusionRunner::embed(const model::FluxInputs& cond, const at::Tensor& latents,
                                                      bool withText) const {
  const int64_t repeat = cond.txt.size(0) / latents.size(0);
  const at::Tensor img = repeat == 1 ? latents : latents.repeat({repeat, 1, 1});
  return {withText ? transformer_->embedText(cond.txt) : at::Tensor(), transformer_->embedImage(img)};
}

void PipeFusionRunner::begin(const at::Tensor& latents) {
  const auto& layout = options_.layout;
  const at::Tensor index = layout.localTokenIndex();
  latents_ = latents.index_select(1, index.to(latents.device())).to(options_.device);  // [B, Lloc, C]
  imageIds_ = model::imagePositionIds(layout.rows, layout.cols).index_select(0, index).to(options_.device);
  previous_ = SentBack::kNothing;
  stats_ = {};
}

void PipeFusionRunner::step(const PipeFusionStep& s) {
  PARDIT_CHECK(latents_.defined(), "PipeFusion: step() before begin()");
  const int64_t B = latents_.size(0), Bm = s.conditioning.txt.size(0);
  PARDIT_CHECK(Bm % B == 0, "PipeFusion: model batch ", Bm, " is not a multiple of the latents' batch ", B);
  PARDIT_CHECK(s.synchronous || options_.layout.patches == 1 || kv_->bytes() > 0,
               "PipeFusion with --num-pipeline-patch ", options_.layout.patches,
               " needs a synchronous step first (--warmup-steps >= 1) to fill its K/V buffers");
  stats_.stepWaitSeconds.push_back(0.0);
  model::FluxInputs x = s.conditioning;
  if (s.synchronous || options_.layout.patches == 1) {
    stepSynchronous(s, std::move(x));
  } else {
    stepPatches(s, std::move(x));
  }
  completeSends();
}

PipeFusionRunner::Activations PipeFusionRunner::passAll(const model::FluxInputs& x, const at::Tensor& latents) {
  const int64_t Bm = x.txt.size(0), T = x.txt.size(1);
  const int64_t h = transformer_->config().hiddenSize, Lloc = options_.layout.localTokens();
  kv_->setFull();
  Activations in;
  if (firstStage()) {
    in = embed(x, latents, /*withText=*/true);
  } else {
    in.txt = recvTensor({Bm, T, h}, previousStage());
    in.img = recvTensor({Bm, Lloc, h}, previousStage());
  }
  Activations out = runStage(in, x);
  if (!lastStage()) {
    sendTensor(out.txt, nextStage());
    sendTensor(out.img, nextStage());
  }
  return out;
}

void PipeFusionRunner::stepSynchronous(const PipeFusionStep& s, model::FluxInputs x) {
  const int64_t B = latents_.size(0), C = latents_.size(2);
  x.txtIds = model::textPositionIds(x.txt.size(1)).to(options_.device);
  x.imgIds = imageIds_;
  if (firstStage() && previous_ == SentBack::kAll)
    latents_ = recvTensor({B, options_.layout.localTokens(), C}, previousStage(), Channel::kSendBack);
  const Activations out = passAll(x, latents_);
  if (lastStage()) {
    latents_ = s.update(out.img, latents_);
    if (s.sendBack && comms_.pipeline->size() > 1) sendTensor(latents_, nextStage(), Channel::kSendBack);
  }
  previous_ = s.sendBack && comms_.pipeline->size() > 1 ? SentBack::kAll : SentBack::kNothing;
}

void PipeFusionRunner::stepPatches(const PipeFusionStep& s, model::FluxInputs x) {
  const int64_t B = latents_.size(0), C = latents_.size(2), Bm = x.txt.size(0), T = x.txt.size(1);
  const int64_t h = transformer_->config().hiddenSize, Tp = options_.layout.patchTokens();
  const int M = options_.layout.patches;
  const at::Tensor txtIds = model::textPositionIds(T).to(options_.device);
  at::Tensor txtIn;
  for (int p = 0; p < M; ++p) {
    kv_->setPatch(p);
    at::Tensor patch = latents_.narrow(1, p * Tp, Tp);
    x.imgIds = imageIds_.narrow(0, p * Tp, Tp);
    x.txtIds = p == 0 ? txtIds : txtIds.narrow(0, 0, 0);  // RoPE rows: [text ; patch] or the patch alone
    Activations in;
    if (firstStage()) {
      if (previous_ == SentBack::kAll && p == 0)
        latents_.copy_(recvTensor({B, latents_.size(1), C}, previousStage(), Channel::kSendBack));
      if (previous_ == SentBack::kPatches) patch.copy_(recvTensor({B, Tp, C}, previousStage(), Channel::kSendBack));
      // The text passes the stages with the first patch only; later patches reuse its K/V.
      in = embed(x, patch, /*withText=*/p == 0);
    } else {
      if (p == 0) txtIn = recvTensor({Bm, T, h}, previousStage());
      in = {p == 0 ? txtIn : at::Tensor(), recvTensor({Bm, Tp, h}, previousStage())};
    }
    Activations out = runStage(in, x);
    if (!lastStage()) {
      if (p == 0) sendTensor(out.txt, nextStage());
      sendTensor(out.img, nextStage());
    } else {
      patch.copy_(s.update(out.img, patch));
      if (s.sendBack && comms_.pipeline->size() > 1) sendTensor(patch.clone(), nextStage(), Channel::kSendBack);
    }
  }
  previous_ = s.sendBack && comms_.pipeline->size() > 1 ? SentBack::kPatches : SentBack::kNothing;
}

at::Tensor PipeFusionRunner::finish() {
  // The last stage holds the result; every rank of the pipeline gets the full latents.
  const auto& layout = options_.layout;
  at::Tensor full = at::empty({latents_.size(0), layout.rows * layout.cols, latents_.size(2)}, latents_.options());
  if (lastStage()) full = localToFull(latents_);
  comms_.pipeline->broadcast(full, comms_.pipeline->size() - 1);
  latents_ = at::Tensor();
  return full;
}

at::Tensor PipeFusionRunner::forward(const model::FluxInputs& in) {
  const auto& layout = options_.layout;
  const at::Tensor index = layout.localTokenIndex().to(in.img.device());
  model::FluxInputs x = in;
  x.img = in.img.index_select(1, index);
  x.imgIds = in.imgIds.index_select(0, index);
  const Activations out = passAll(x, x.img);
  completeSends();
  at::Tensor full =
      at::empty({in.img.size(0), layout.rows * layout.cols, transformer_->config().outChannels}, out.img.options());
  if (lastStage()) full = localToFull(out.img);
  comms_.pipeline->broadcast(full, comms_.pipeline->size() - 1);
  return full;
}

}  // namespace pardit::parallel
