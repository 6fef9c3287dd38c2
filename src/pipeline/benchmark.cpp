#include "pardit/pipeline/benchmark.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#if defined(PARDIT_WITH_CUDA)
#include <ATen/cuda/CUDAEvent.h>
#endif

#include <algorithm>
#include <array>
#include <map>
#include <numeric>
#include <optional>

#include "engine_impl.h"
#include "pardit/core/error.h"
#include "pardit/core/sysinfo.h"
#include "pardit/core/timer.h"
#include "pardit/io/synth.h"
#include "pardit/model/attention.h"
#include "pardit/parallel/patch_vae.h"
#include "pardit/pipeline/latents.h"
#include "pardit/pipeline/op_profile.h"

namespace pardit::pipeline {

double forwardFlops(const model::FluxConfig& m, int64_t B, int64_t Li, int64_t Lt) {
  const double h = m.hiddenSize, L = static_cast<double>(Li + Lt), mlp = m.mlpHidden;
  auto lin = [](double rows, double in, double out) { return 2.0 * rows * in * out; };
  double f = 0;
  f += lin(B * Li, m.inChannels, h) + lin(B * Lt, m.contextInDim, h);
  f += lin(B, 256, h) + lin(B, h, h) + lin(B, m.vecInDim, h) + lin(B, h, h);
  if (m.guidanceEmbed) f += lin(B, 256, h) + lin(B, h, h);
  const double attn = 4.0 * B * L * L * h;
  for (int64_t i = 0; i < m.depth; ++i) {
    f += 2 * lin(B, h, 6 * h);
    f += lin(B * L, h, 3 * h) + lin(B * L, h, h) + lin(B * L, h, mlp) + lin(B * L, mlp, h);
    f += attn;
  }
  for (int64_t i = 0; i < m.depthSingle; ++i)
    f += lin(B, h, 3 * h) + lin(B * L, h, 3 * h + mlp) + lin(B * L, h + mlp, h) + attn;
  f += lin(B, h, 2 * h) + lin(B * Li, h, m.outChannels);
  return f;
}

namespace {
// Seconds of the work queued from construction to seconds(): CUDA events on the device's current stream
// (the host does not wait inside the interval), the wall clock on the CPU.
class DeviceTimer {
 public:
  explicit DeviceTimer(const c10::Device& device) : cuda_(device.is_cuda()), index_(device.index()) {
#if defined(PARDIT_WITH_CUDA)
    if (cuda_) start_.record(c10::cuda::getCurrentCUDAStream(index_));  // the rank's GPU, not the current one
#endif
  }
  double seconds() {
#if defined(PARDIT_WITH_CUDA)
    if (cuda_) {
      stop_.record(c10::cuda::getCurrentCUDAStream(index_));
      stop_.synchronize();
      return static_cast<double>(start_.elapsed_time(stop_)) * 1e-3;
    }
#endif
    return wall_.seconds();
  }

 private:
  bool cuda_;
  c10::DeviceIndex index_;
  Timer wall_;
#if defined(PARDIT_WITH_CUDA)
  at::cuda::CUDAEvent start_{cudaEventDefault}, stop_{cudaEventDefault};
#endif
};

// Best of `reps` timings of `work` (after one untimed call).
template <typename Work>
double bestSeconds(const c10::Device& device, int reps, const Work& work) {
  work();
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    DeviceTimer t(device);
    work();
    best = std::min(best, t.seconds());
  }
  return best;
}
}  // namespace

int64_t gemmRateSize(const c10::Device& device) { return device.is_cuda() ? 8192 : 1024; }

double gemmRate(c10::ScalarType dtype, const c10::Device& device, int reps) {
  const int64_t n = gemmRateSize(device);
  const auto opts = at::TensorOptions().dtype(dtype).device(device);
  const at::Tensor a = at::randn({n, n}, opts), b = at::randn({n, n}, opts);
  return 2.0 * static_cast<double>(n) * n * n / bestSeconds(device, reps, [&] { (void)at::mm(a, b); });
}

namespace {
// q, k and v as the forward makes them: [B, H, L, D] views of token-major [B, L, H, D] memory.
at::Tensor attentionOperand(const model::FluxConfig& m, int64_t B, int64_t L, const at::TensorOptions& opts,
                            int64_t heads = 0) {
  return at::randn({B, L, heads > 0 ? heads : m.numHeads, m.headDim()}, opts).transpose(1, 2);
}
}  // namespace

model::AttentionKernel forwardAttentionKernel(const model::FluxConfig& m, int64_t B, int64_t heads, bool ring,
                                              c10::ScalarType dtype, const c10::Device& device,
                                              model::AttentionKernel kernel) {
  if (kernel != model::AttentionKernel::kAuto) return kernel;
  // Small tensors of the same layout: the pick depends on dtype, head size, layout and device.
  const auto opts = at::TensorOptions().dtype(dtype).device(device);
  const at::Tensor q = attentionOperand(m, B, 64, opts, heads), k = attentionOperand(m, B, 64, opts, heads),
                   v = attentionOperand(m, B, 64, opts, heads);
  return model::resolveAttentionKernel(kernel, q, k, v, ring);
}

std::pair<double, double> componentTimes(const model::FluxConfig& m, int64_t B, int64_t Li, int64_t Lt,
                                         c10::ScalarType dtype, const c10::Device& device,
                                         model::AttentionKernel kernel) {
  const int64_t h = m.hiddenSize, mlp = m.mlpHidden, L = Li + Lt;
  // Every Linear of the forward as (rows, in, out) -> how many times it runs.
  std::map<std::array<int64_t, 3>, int64_t> shapes;
  shapes[{B * Li, m.inChannels, h}] += 1;
  shapes[{B * Lt, m.contextInDim, h}] += 1;
  for (int64_t rows : {B * Li, B * Lt}) {
    shapes[{B, h, 6 * h}] += m.depth;
    shapes[{rows, h, 3 * h}] += m.depth;
    shapes[{rows, h, h}] += m.depth;
    shapes[{rows, h, mlp}] += m.depth;
    shapes[{rows, mlp, h}] += m.depth;
  }
  shapes[{B, h, 3 * h}] += m.depthSingle;
  shapes[{B * L, h, 3 * h + mlp}] += m.depthSingle;
  shapes[{B * L, h + mlp, h}] += m.depthSingle;
  shapes[{B * Li, h, m.outChannels}] += 1;
  const auto opts = at::TensorOptions().dtype(dtype).device(device);
  double gemm = 0;
  for (const auto& [s, count] : shapes) {
    // One layer's operands at a time.
    const at::Tensor x = at::randn({s[0], s[1]}, opts), w = at::randn({s[2], s[1]}, opts), b = at::randn({s[2]}, opts);
    gemm += bestSeconds(device, 3, [&] { (void)at::linear(x, w, b); }) * static_cast<double>(count);
  }
  const at::Tensor q = attentionOperand(m, B, L, opts), k = attentionOperand(m, B, L, opts),
                   v = attentionOperand(m, B, L, opts);
  const double attention = bestSeconds(device, 3, [&] { (void)model::localAttention(q, k, v, false, kernel); });
  return {gemm, attention * static_cast<double>(m.depth + m.depthSingle)};
}

// ---- Engine::benchmark ---------------------------------------------------------------------------------

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

using detail::worldReduce;

}  // namespace

void Engine::Impl::benchmarkPipeline(Engine& engine, const BenchmarkRequest& request, BenchmarkResult& r) {
  // The denoising loop: warm-up steps, then patch-pipelined steps, and the share of each pipelined step a
  // rank spends waiting for the previous stage (bubbles and transfers).
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1234);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  GenerateRequest g;
  g.prompt.embeddings = {at::randn({request.batch, request.textLen, config.contextInDim}, gen, f32),
                         at::randn({request.batch, config.vecInDim}, gen, f32)};
  g.height = request.height;
  g.width = request.width;
  g.steps = options.warmupSteps + request.iters;
  g.schedule = Schedule::kShift;
  rt.world().barrier();
  const GenerateResult out = engine.generate(g);
  const size_t W = static_cast<size_t>(options.warmupSteps);
  r.pipelineStepSeconds = out.report.stepSeconds;
  double wait = 0, total = 0;
  for (size_t i = W; i < out.report.stepSeconds.size(); ++i) {
    r.samples.push_back(worldReduce(rt, out.report.stepSeconds[i], dist::ReduceOp::kMax));
    wait += lastPipeline.stepWaitSeconds.at(i);
    total += out.report.stepSeconds[i];
  }
  r.warmupSteps = static_cast<int>(W);
  r.patches = options.numPipelinePatch > 0 ? options.numPipelinePatch : degrees.pipefusion;
  r.bubbleShareMean = worldReduce(rt, wait / total, dist::ReduceOp::kSum) / rt.worldSize();
  r.bubbleShareMax = worldReduce(rt, wait / total, dist::ReduceOp::kMax);
}

void Engine::Impl::benchmarkForwards(const BenchmarkRequest& request, BenchmarkResult& r) {
  const LatentGeometry geom{request.height, request.width, 16};
  const int64_t B = request.batch, Lt = request.textLen;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1234);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  model::FluxInputs in;
  in.img = at::randn({B, geom.tokens(), config.inChannels}, gen, f32).to(dtype);
  in.txt = at::randn({B, Lt, config.contextInDim}, gen, f32).to(dtype);
  in.pooled = at::randn({B, config.vecInDim}, gen, f32).to(dtype);
  in.timestep = at::full({B}, 0.5, f32);
  if (config.guidanceEmbed) in.guidance = at::full({B}, 3.5, f32);
  in.imgIds = imageIds(geom);
  in.txtIds = textIds(Lt);
  Run run(rt);
  run.height = request.height;
  run.width = request.width;
  run.steps = request.iters;
  const TransformerFn fn = forwardFn(run, in, "");
  auto step = [&] {
    const at::Tensor out = detail::cfgGather(rt, fn(run.inputs));
    if (out.is_cuda()) (void)out.cpu();
  };
  // Under --cuda-graphs the first call runs eagerly and the second captures: neither is timed.
  const int warmup = options.cudaGraphs ? std::max(request.warmup, 2) : request.warmup;
  for (int i = 0; i < warmup; ++i) step();
  rt.world().barrier();
  std::vector<double> commShares;
  for (int i = 0; i < request.iters; ++i) {
    const auto before = rt.collectiveTotals();
    Timer t;
    run.recorder.beginStep();
    step();
    run.recorder.endStep();
    const double local = t.seconds();
    double comm = 0;
    for (const auto& [name, s] : rt.collectiveTotals())
      if (name != "barrier") comm += s.seconds - before.at(name).seconds;
    // A sample is the slowest rank's time; the communication share is this rank's.
    r.samples.push_back(worldReduce(rt, local, dist::ReduceOp::kMax));
    commShares.push_back(comm / local);
  }
  r.commShare = worldReduce(rt, median(commShares), dist::ReduceOp::kMax);
  if (request.profile) {
    Timer t;
    {
      OpProfile profile(device);
      if (run.graphs) {  // the operators of the call the graph replays (a replay is one launch)
        const at::Tensor out = detail::cfgGather(rt, run.graphs->eager(run.inputs));
        if (out.is_cuda()) (void)out.cpu();
      } else {
        step();
      }
      r.profile = profile.ops();
    }
    r.profileSeconds = t.seconds();
  }
  r.cudaGraphs = run.graphs != nullptr;
  const auto& topo = rt.topology().degrees();
  r.attentionKernel = model::attentionKernelName(
      forwardAttentionKernel(config, std::max<int64_t>(1, B / topo.cfg), config.numHeads / topo.ulysses, topo.ring > 1,
                             dtype, device, detail::attentionKernelOf(options.attention)));
  finishCudaGraphs(run);
  r.gemmRate = gemmRate(dtype, device);
  if (rt.worldSize() == 1)
    std::tie(r.gemmSeconds, r.attentionSeconds) =
        componentTimes(config, B, geom.tokens(), Lt, dtype, device, detail::attentionKernelOf(options.attention));
  finishMetrics(run, "bench", std::accumulate(r.samples.begin(), r.samples.end(), 0.0), 0, B * request.iters);
}

void Engine::Impl::benchmarkDecode(const BenchmarkRequest& request, BenchmarkResult& r) {
  const LatentGeometry geom{request.height, request.width, 16};
  // The model's VAE (or --vae); for an in-memory preset model, the preset's VAE with random weights.
  model::VaeConfig vc;
  model::WeightGetter get;
  if (checkpoint || !options.vae.empty()) {
    rt.agree([&] { openVae(geom); });
    vc = vae->config();
    get = vae->getter(dtype, device);
    r.vae = vae->path();
  } else {
    vc = model::VaeConfig::preset(options.preset == "tiny" || options.preset == "small" ? options.preset : "flux");
    std::map<std::string, std::vector<int64_t>> shapes;
    for (const auto& t : model::vaeDecoderTensors(vc)) shapes[t.name] = t.shape;
    get = [shapes, this](const std::string& n) { return io::synthTensor(0, n, shapes.at(n)).to(dtype).to(device); };
    r.vae = "preset:" + options.preset;
  }
  std::optional<model::VaeDecoder> loaded;
  {
    const LoadingAllocations loading;
    loaded.emplace(vc, get);
  }
  const model::VaeDecoder& decoder = *loaded;
  r.decoderWeightBytes = decoder.weightBytes();
  const int64_t h = request.height / vc.spatialFactor(), w = request.width / vc.spatialFactor();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1234);
  const at::Tensor z = at::randn({request.batch, vc.latentChannels, h, w}, gen).to(dtype).to(device);
  // Planned as generate plans it, with the whole budget free (no transformer here).
  const auto free = static_cast<uint64_t>(
      worldReduce(rt, static_cast<double>(detail::budgetOf(options, device, rt.localSize())), dist::ReduceOp::kMin));
  DecodePlan plan;
  rt.agree([&] {
    plan = planDecode(vc, options, request.batch, request.height, request.width, rt.worldSize(), dtype, free);
  });
  r.decodePlannedBytes = plan.activationBytes;
  r.decodeMode = plan.modeName();
  if (plan.mode == DecodePlan::Mode::kTiles) r.decodeMode += ":" + std::to_string(plan.tile * plan.factor);
  Run run(rt);
  run.height = request.height;
  run.width = request.width;
  run.steps = request.iters;
  for (int i = 0; i < request.warmup + request.iters; ++i) {
    rt.world().barrier();
    const uint64_t before = currentRssBytes();
    Timer t;
    run.recorder.beginStep();
    const at::Tensor img = runDecode(decoder, z, plan);
    if (img.is_cuda()) (void)img.cpu();
    run.recorder.endStep();
    const double local = t.seconds();
    // The first decode's growth: later ones reuse memory the allocator kept.
    if (i == 0) r.decodeActivationBytes = peakRssBytes() > before ? peakRssBytes() - before : 0;
    if (i >= request.warmup) r.samples.push_back(worldReduce(rt, local, dist::ReduceOp::kMax));
  }
  r.decodeActivationBytesMax =
      static_cast<uint64_t>(worldReduce(rt, static_cast<double>(r.decodeActivationBytes), dist::ReduceOp::kMax));
  finishMetrics(run, "bench", std::accumulate(r.samples.begin(), r.samples.end(), 0.0), request.warmup,
                request.batch * (request.warmup + request.iters));
}

BenchmarkResult Engine::benchmark(const BenchmarkRequest& request) {
  impl_->releaseTextEncoders();  // its plans do not count them
  Impl& m = *impl_;
  const LatentGeometry geom{request.height, request.width, 16};
  m.rt.agree([&] {
    PARDIT_CHECK(request.iters >= 1 && request.warmup >= 0, "--iters must be >= 1 and --warmup >= 0");
    PARDIT_CHECK(request.batch >= 1 && request.batch % m.degrees.cfg == 0,
                 "--batch must be >= 1 and divisible by --cfg-degree");
    PARDIT_CHECK(request.textLen >= 1, "--text-len must be >= 1 for bench");
    geom.validate();
    PARDIT_CHECK(m.config.inChannels == geom.packedChannels(), "bench needs a model with ", geom.packedChannels(),
                 " input channels");
    PARDIT_CHECK(!(request.encode && request.decode), "bench: --encode or --decode, not both");
    if (m.degrees.pipefusion > 1 && !request.decode && !request.encode) {
      PARDIT_CHECK(m.degrees.cfg == 1, "bench: --pipefusion-degree with --cfg-degree is not benchmarked; use generate");
      PARDIT_CHECK(m.options.warmupSteps >= 1, "bench with PipeFusion needs --warmup-steps >= 1");
    }
  });
  BenchmarkResult r;
  r.modelName = m.modelName;
  r.threads = at::get_num_threads();
  r.imageTokens = geom.tokens();
  if (request.encode) {
    m.benchmarkEncode(request, r);
  } else if (request.decode) {
    m.benchmarkDecode(request, r);
  } else if (m.degrees.pipefusion > 1) {
    m.benchmarkPipeline(*this, request, r);
  } else {
    m.benchmarkForwards(request, r);
  }
  r.median = median(r.samples);
  r.best = *std::min_element(r.samples.begin(), r.samples.end());
  r.mean = std::accumulate(r.samples.begin(), r.samples.end(), 0.0) / static_cast<double>(r.samples.size());
  if (!request.decode && !request.encode)
    r.flops = forwardFlops(m.config, request.batch, geom.tokens(), request.textLen);
  return r;
}

}  // namespace pardit::pipeline
