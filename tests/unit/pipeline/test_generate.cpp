// The sampling loop against diffusers' FluxPipeline (prompt embeddings and latents given,
// output_type="latent"): distilled guidance with the shifted schedule, and true CFG with the plain one.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "pardit/core/error.h"
#include "pardit/io/safetensors.h"
#include "pardit/pipeline/denoise.h"
#include "pardit/pipeline/latents.h"
#include "pardit/pipeline/loading.h"
#include "test_util.h"

using namespace pardit;
using pardit::test::fixture;

namespace {
struct GenCase {
  std::string fixtureName, model;
};
void PrintTo(const GenCase& c, std::ostream* os) { *os << c.fixtureName << "@" << c.model; }

double runCase(const GenCase& c) {
  auto f = io::SafetensorsFile::open(fixture("generate_" + c.fixtureName + ".safetensors"));
  const auto& meta = f->metadata();
  const int steps = std::stoi(meta.at("steps"));
  const double guidance = std::stod(meta.at("guidance_scale"));
  const double trueCfg = std::stod(meta.at("true_cfg_scale"));
  pipeline::LatentGeometry geom{std::stoll(meta.at("height")), std::stoll(meta.at("width")), 16};
  auto loaded = pipeline::loadFlux(fixture(c.model), at::kFloat, at::kCPU);
  pipeline::PromptEmbeddings pos{f->read("prompt_embeds"), f->read("pooled_prompt_embeds")};
  std::optional<pipeline::PromptEmbeddings> neg;
  if (f->contains("negative_prompt_embeds"))
    neg = pipeline::PromptEmbeddings{f->read("negative_prompt_embeds"), f->read("negative_pooled_prompt_embeds")};
  const int64_t B = pos.promptEmbeds.size(0);

  // The initial noise is the seeded CPU generator's randn, as in the reference.
  at::Tensor noise = pipeline::initialNoise(std::stoull(meta.at("seed")), B, geom, at::kFloat);
  EXPECT_TRUE(at::equal(noise, f->read("latents_in")));

  auto denoiser = pipeline::TransformerDenoiser::local(pipeline::localTransformer(loaded.transformer),
                                                       pipeline::imageIds(geom), pos, neg);
  const auto sched = pipeline::resolveSchedule(pipeline::Schedule::kAuto, *loaded.checkpoint);
  pipeline::FlowMatchEulerScheduler scheduler(sched, steps, geom.tokens());
  at::Tensor sigmas = f->read("sigmas");
  for (int i = 0; i <= steps; ++i) EXPECT_EQ(scheduler.sigmas()[i], sigmas[i].item<float>());
  at::Tensor out =
      pipeline::denoise(*denoiser, noise, scheduler, {loaded.checkpoint->config().guidanceEmbed, guidance, trueCfg});
  return test::maxRelError(out, f->read("latents"));
}
}  // namespace

class GenerateFidelity : public ::testing::TestWithParam<GenCase> {};

TEST_P(GenerateFidelity, LatentsMatchFluxPipeline) {
  const double err = runCase(GetParam());
  std::printf("[fidelity] generate %s on %s: max relative error %.3e\n", GetParam().fixtureName.c_str(),
              GetParam().model.c_str(), err);
  EXPECT_LE(err, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Cases, GenerateFidelity,
                         ::testing::Values(GenCase{"tiny_dev", "flux_tiny_dev/diffusers"},
                                           GenCase{"tiny_dev", "flux_tiny_dev/flux1-tiny-dev.safetensors"},
                                           GenCase{"tiny_schnell_cfg", "flux_tiny_schnell/diffusers"}),
                         [](const auto& info) { return std::to_string(info.index); });

TEST(Latents, PackUnpackAreInversesWithTheReferenceChannelOrder) {
  pipeline::LatentGeometry g{48, 80, 16};
  at::Tensor lat = at::randn({2, 16, g.latentHeight(), g.latentWidth()});
  at::Tensor packed = pipeline::packLatents(lat);
  ASSERT_EQ(packed.sizes(), (std::vector<int64_t>{2, 15, 64}));
  // packed[b, r*(w/2)+c, ch*4+ph*2+pw] == lat[b, ch, 2r+ph, 2c+pw]
  EXPECT_EQ(packed[1][1 * 5 + 3][7 * 4 + 1 * 2 + 0].item<float>(), lat[1][7][2 + 1][6 + 0].item<float>());
  EXPECT_TRUE(at::equal(pipeline::unpackLatents(packed, g), lat));
  at::Tensor ids = pipeline::imageIds(g);
  EXPECT_EQ(ids[7][1].item<float>(), 1.f);  // token 7 = row 1, col 2
  EXPECT_EQ(ids[7][2].item<float>(), 2.f);
  EXPECT_THROW((pipeline::LatentGeometry{50, 64, 16}).validate(), Error);
}
