// --cuda-graphs: a transformer call captured once and replayed must give the eager call's bits, step after
// step, for every input signature it sees; the CLI refuses it where it cannot apply.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "pardit/core/error.h"
#include "pardit/io/safetensors.h"
#include "pardit/pipeline/cuda_graph.h"
#include "pardit/pipeline/denoise.h"
#include "pardit/pipeline/latents.h"
#include "pardit/pipeline/loading.h"
#include "test_util.h"

using namespace pardit;
using pardit::test::fixture;

namespace {

model::FluxInputs stepInputs(const model::FluxConfig& c, int64_t textLen, float t, uint64_t seed,
                             const c10::Device& device) {
  const pipeline::LatentGeometry geom{32, 48, 16};
  at::manual_seed(seed);
  model::FluxInputs in{at::randn({1, geom.tokens(), c.inChannels}),
                       at::randn({1, textLen, c.contextInDim}),
                       at::randn({1, c.vecInDim}),
                       at::full({1}, t),
                       at::full({1}, 3.5f),
                       pipeline::imageIds(geom),
                       pipeline::textIds(textLen)};
  in = test::inputsOn(in, device);
  for (at::Tensor* x : {&in.img, &in.txt, &in.pooled, &in.timestep}) *x = x->to(at::kBFloat16);
  return in;
}

}  // namespace

TEST(GraphedTransformer, RefusesInputsOffTheGpu) {
  // On a machine without CUDA the build still has the wrapper; CPU inputs are an error naming the flag.
  if (!pipeline::cudaGraphsBuilt()) {
    EXPECT_THROW(pipeline::cudaGraphed([](const model::FluxInputs& in) { return in.img; }), Error);
    return;
  }
  auto [fn, graphs] = pipeline::cudaGraphed([](const model::FluxInputs& in) { return in.img * 2; });
  model::FluxInputs in;
  in.img = at::ones({1, 4, 64});
  try {
    fn(in);
    FAIL() << "CPU inputs were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--cuda-graphs"), std::string::npos) << e.what();
  }
  EXPECT_EQ(graphs->stats().eagerCalls + graphs->stats().replays, 0);
}

TEST(GraphedTransformer, CliRefusesItOnTheCpu) {
  const auto r = test::runPardit("generate --model " + fixture("flux_tiny_dev/diffusers") + " --prompt-embeds " +
                                 fixture("pipeline_tiny_dev_image.safetensors") +
                                 " --height 32 --width 32 --steps 2 --threads 1 --device cpu --cuda-graphs");
  EXPECT_NE(r.exitCode, 0);
  EXPECT_NE(r.output.find("--cuda-graphs"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("denoised"), std::string::npos) << "it ran: " << r.output;
}

TEST(CudaGraph, ReplaysEqualTheEagerCallsForEverySignature) {
  PARDIT_REQUIRE_CUDA();
  const c10::Device cuda(c10::kCUDA, 0);
  auto loaded = pipeline::loadFlux(fixture("flux_tiny_dev/diffusers"), at::kBFloat16, cuda);
  const model::FluxConfig& c = loaded.checkpoint->config();
  const pipeline::TransformerFn eager = pipeline::localTransformer(loaded.transformer);
  auto [graphed, graphs] = pipeline::cudaGraphed(eager);
  // Two text lengths (the two branches of true CFG with prompts of different lengths) interleaved, new
  // latents and timesteps each call.
  std::vector<at::Tensor> kept;
  for (int call = 0; call < 8; ++call) {
    const int64_t textLen = call % 2 == 0 ? 8 : 12;
    const auto in = stepInputs(c, textLen, 1.0f - 0.1f * call, 100 + call, cuda);
    const at::Tensor ref = eager(in).cpu();
    const at::Tensor got = graphed(in);
    ASSERT_TRUE(got.is_cuda());
    EXPECT_TRUE(at::equal(ref, got.cpu())) << "call " << call << " (text length " << textLen << "): max |diff| "
                                           << (ref.to(at::kFloat) - got.cpu().to(at::kFloat)).abs().max();
    kept.push_back(got);
  }
  const auto st = graphs->stats();
  EXPECT_EQ(st.eagerCalls, 2);
  EXPECT_EQ(st.captures, 2);
  EXPECT_EQ(st.replays, 6);
  // The outputs handed out are copies: later replays did not overwrite them.
  for (int call = 0; call < 8; ++call) {
    const auto in = stepInputs(c, call % 2 == 0 ? 8 : 12, 1.0f - 0.1f * call, 100 + call, cuda);
    EXPECT_TRUE(at::equal(eager(in).cpu(), kept[call].cpu())) << "output of call " << call << " changed";
  }
  // Released: the next call runs eagerly again, then a new graph.
  graphs->release();
  const auto in = stepInputs(c, 8, 0.3f, 7, cuda);
  EXPECT_TRUE(at::equal(eager(in).cpu(), graphed(in).cpu()));
  EXPECT_TRUE(at::equal(eager(in).cpu(), graphed(in).cpu()));
  EXPECT_EQ(graphs->stats().eagerCalls, 3);
  EXPECT_EQ(graphs->stats().captures, 3);
}

TEST(CudaGraph, AFailedCaptureIsReportedAndUndone) {
  PARDIT_REQUIRE_CUDA();
  const c10::Device cuda(c10::kCUDA, 0);
  model::FluxInputs in;
  in.img = at::randn({1, 6, 64}, at::TensorOptions().device(cuda));
  // A host synchronization inside the call: fine eagerly, impossible in a graph.
  auto [bad, badGraphs] =
      pipeline::cudaGraphed([](const model::FluxInputs& x) { return x.img * x.img.sum().item<float>(); });
  EXPECT_NO_THROW(bad(in));               // the rehearsal
  for (int call = 0; call < 2; ++call) {  // the capture, then a call after it
    try {
      bad(in);
      FAIL() << "call " << call << ": a synchronizing call was captured";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("could not be captured"), std::string::npos) << e.what();
    }
  }
  badGraphs->release();
  // The allocator left capture mode: another graph captures and replays, and memory is released.
  in.txtIds = at::zeros({3, 3});
  EXPECT_THROW(bad(in), Error) << "an input off the call's GPU";
  in.txtIds = at::Tensor();
  auto [good, goodGraphs] = pipeline::cudaGraphed([](const model::FluxInputs& x) { return x.img * 2 + 1; });
  for (int call = 0; call < 3; ++call) EXPECT_TRUE(at::equal(good(in).cpu(), (in.img * 2 + 1).cpu()));
  EXPECT_EQ(goodGraphs->stats().replays, 2);
  goodGraphs->release();
}

TEST(CudaGraph, DenoiseLoopWithGraphsEqualsTheEagerLoop) {
  PARDIT_REQUIRE_CUDA();
  const c10::Device cuda(c10::kCUDA, 0);
  for (const std::string name : {"tiny_dev", "tiny_schnell_cfg"}) {
    auto f = io::SafetensorsFile::open(fixture("generate_" + name + ".safetensors"));
    const auto& meta = f->metadata();
    const std::string model = name == "tiny_dev" ? "flux_tiny_dev/diffusers" : "flux_tiny_schnell/diffusers";
    auto loaded = pipeline::loadFlux(fixture(model), at::kBFloat16, cuda);
    const pipeline::LatentGeometry geom{std::stoll(meta.at("height")), std::stoll(meta.at("width")), 16};
    auto onGpu = [&](const std::string& a, const std::string& b) {
      return pipeline::PromptEmbeddings{f->read(a).to(cuda).to(at::kBFloat16), f->read(b).to(cuda).to(at::kBFloat16)};
    };
    const auto pos = onGpu("prompt_embeds", "pooled_prompt_embeds");
    std::optional<pipeline::PromptEmbeddings> neg;
    if (f->contains("negative_prompt_embeds")) neg = onGpu("negative_prompt_embeds", "negative_pooled_prompt_embeds");
    const int steps = std::stoi(meta.at("steps"));
    const pipeline::FlowMatchEulerScheduler scheduler(
        pipeline::resolveSchedule(pipeline::Schedule::kAuto, *loaded.checkpoint), steps, geom.tokens());
    const pipeline::Sampling sampling{loaded.checkpoint->config().guidanceEmbed, std::stod(meta.at("guidance_scale")),
                                      std::stod(meta.at("true_cfg_scale"))};
    const at::Tensor noise =
        pipeline::initialNoise(std::stoull(meta.at("seed")), pos.promptEmbeds.size(0), geom, at::kBFloat16).to(cuda);
    const at::Tensor ids = pipeline::imageIds(geom).to(cuda);
    auto run = [&](const pipeline::TransformerFn& fn) {
      auto d = pipeline::TransformerDenoiser::local(fn, ids, pos, neg);
      return pipeline::denoise(*d, noise, scheduler, sampling).cpu();
    };
    const at::Tensor eager = run(pipeline::localTransformer(loaded.transformer));
    auto [graphed, graphs] = pipeline::cudaGraphed(pipeline::localTransformer(loaded.transformer));
    const at::Tensor replayed = run(graphed);
    EXPECT_TRUE(at::equal(eager, replayed)) << name;
    const int calls = steps * (neg ? 2 : 1);
    EXPECT_EQ(graphs->stats().eagerCalls, 1) << name;
    EXPECT_EQ(graphs->stats().replays, calls - 1) << name;
  }
}

TEST(CudaGraph, GenerateWithTheFlagEqualsWithout) {
  PARDIT_REQUIRE_CUDA();
  const test::TempDir dir;
  const std::string base = "generate --model " + fixture("flux_tiny_dev/diffusers") + " --prompt-embeds " +
                           fixture("pipeline_tiny_dev_image.safetensors") +
                           " --height 64 --width 48 --steps 4 --device cuda --dtype bf16 --save-latents ";
  const auto eager = test::runPardit(base + dir.file("eager.safetensors"));
  ASSERT_EQ(eager.exitCode, 0) << eager.output;
  const auto graphed = test::runPardit(base + dir.file("graphed.safetensors") + " --cuda-graphs");
  ASSERT_EQ(graphed.exitCode, 0) << graphed.output;
  EXPECT_NE(graphed.output.find("CUDA graphs: 3 of 4 transformer calls replayed"), std::string::npos) << graphed.output;
  const auto a = io::SafetensorsFile::open(dir.file("eager.safetensors"))->read("latents");
  const auto b = io::SafetensorsFile::open(dir.file("graphed.safetensors"))->read("latents");
  EXPECT_TRUE(at::equal(a, b));
}
