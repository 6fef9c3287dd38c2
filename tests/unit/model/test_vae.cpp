// The VAE decoder against diffusers' AutoencoderKL (fixtures from tests/reference/make_vae_fixtures.py),
// both checkpoint layouts, the image post-processing, and the patch-parallel decode against the one-rank
// decode.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <mutex>

#include "pardit/core/error.h"
#include "pardit/dist/in_process.h"
#include "pardit/dist/runtime.h"
#include "pardit/io/safetensors.h"
#include "pardit/io/vae_checkpoint.h"
#include "pardit/model/vae.h"
#include "pardit/parallel/patch_vae.h"
#include "pardit/pipeline/latents.h"
#include "test_util.h"

using namespace pardit;
using pardit::test::fixture;

namespace {
std::shared_ptr<io::SafetensorsFile> decodeFixture() {
  return io::SafetensorsFile::open(fixture("vae_decode_tiny.safetensors"));
}
}  // namespace

TEST(Vae, ConfigAndNamesOfBothLayouts) {
  const auto diffusers = io::VaeCheckpoint::open(fixture("flux_tiny_dev/diffusers"));  // finds vae/
  const auto bfl = io::VaeCheckpoint::open(fixture("flux_tiny_dev/ae.safetensors"));
  for (const auto* ck : {&diffusers, &bfl}) {
    const auto& c = ck->config();
    EXPECT_EQ(c.blockOutChannels, (std::vector<int64_t>{8, 8, 16, 16}));
    EXPECT_EQ(c.layersPerBlock, 1);
    EXPECT_EQ(c.normGroups, 4);
    EXPECT_EQ(c.latentChannels, 16);
    EXPECT_NEAR(c.scalingFactor, 0.3611, 1e-9);
    EXPECT_NEAR(c.shiftFactor, 0.1159, 1e-9);
    EXPECT_EQ(c.spatialFactor(), 8);
  }
  EXPECT_EQ(io::bflVaeName("decoder.up_blocks.0.resnets.1.conv_shortcut.weight", 4),
            "decoder.up.3.block.1.nin_shortcut.weight");
  EXPECT_EQ(io::bflVaeName("decoder.up_blocks.2.upsamplers.0.conv.bias", 4), "decoder.up.1.upsample.conv.bias");
  EXPECT_EQ(io::bflVaeName("decoder.mid_block.attentions.0.to_out.0.weight", 4), "decoder.mid.attn_1.proj_out.weight");
  EXPECT_EQ(io::bflVaeName("decoder.conv_norm_out.bias", 4), "decoder.norm_out.bias");
  EXPECT_EQ(model::vaeDecoderTensors(model::VaeConfig::preset("flux")).size(), 138u);  // FLUX.1's decoder tensors
  EXPECT_THROW(io::VaeCheckpoint::open(fixture("flux_tiny_dev/flux1-tiny-dev.safetensors")), Error);
}

TEST(Vae, DecodeMatchesDiffusersOnBothLayouts) {
  auto f = decodeFixture();
  const at::Tensor ref = f->read("decoded_fp32"), z = f->read("z");
  for (const std::string path : {"flux_tiny_dev/diffusers/vae", "flux_tiny_dev/ae.safetensors"}) {
    const auto ck = io::VaeCheckpoint::open(fixture(path));
    model::VaeDecoder decoder(ck.config(), ck.getter(at::kFloat));
    const double err = test::maxRelError(decoder.decode(z), ref);
    std::printf("[fidelity] VAE decode fp32 (%s): max relative error %.3e\n", path.c_str(), err);
    EXPECT_LE(err, 1e-5) << path;
  }
  // bf16 weights and activations, as diffusers runs the VAE in a bf16 pipeline.
  const auto ck = io::VaeCheckpoint::open(fixture("flux_tiny_dev/diffusers/vae"));
  model::VaeDecoder bf16(ck.config(), ck.getter(at::kBFloat16));
  const at::Tensor out = bf16.decode(z.to(at::kBFloat16));
  EXPECT_EQ(out.scalar_type(), at::kBFloat16);
  const double err = test::maxRelError(out, f->read("decoded_bf16"));
  const double vsFp32 = test::maxRelError(out, ref);
  std::printf("[fidelity] VAE decode bf16: max relative error %.3e against diffusers bf16, %.3e against fp32\n", err,
              vsFp32);
  EXPECT_LE(err, 2e-2);
  EXPECT_LE(vsFp32, 5e-2);
}

TEST(Vae, LatentsToPixelsAsFluxPipeline) {
  auto f = decodeFixture();
  const auto& meta = f->metadata();
  const pipeline::LatentGeometry geom{std::stoll(meta.at("height")), std::stoll(meta.at("width")), 16};
  const auto ck = io::VaeCheckpoint::open(fixture("flux_tiny_dev/diffusers/vae"));
  const at::Tensor z = model::denormalizeLatents(pipeline::unpackLatents(f->read("packed_latents"), geom), ck.config());
  EXPECT_LE(test::maxRelError(z, f->read("z")), 1e-7);
  model::VaeDecoder decoder(ck.config(), ck.getter(at::kFloat));
  const at::Tensor pixels = model::imagesToBytes(decoder.decode(z));
  const at::Tensor ref = f->read("pixels");
  ASSERT_EQ(pixels.sizes(), ref.sizes());
  const auto diff = (pixels.to(at::kInt) - ref.to(at::kInt)).abs();
  const int64_t off = diff.gt(0).sum().item<int64_t>();
  std::printf("[fidelity] pixels: %lld of %lld differ (max %d levels)\n", static_cast<long long>(off),
              static_cast<long long>(ref.numel()), diff.max().item<int>());
  EXPECT_LE(diff.max().item<int>(), 1);
  EXPECT_LE(static_cast<double>(off), 1e-3 * ref.numel());
  // The processor's rounding: half to even of x * 255 in float32, after clamping.
  const at::Tensor edge =
      model::imagesToBytes(at::tensor({-3.0f, 1.0f, 0.0f, 1.0f / 255.0f}).view({1, 1, 1, 4}).permute({0, 3, 1, 2}));
  EXPECT_EQ(edge[0][0][0][0].item<uint8_t>(), 0);
  EXPECT_EQ(edge[0][0][0][1].item<uint8_t>(), 255);
  EXPECT_EQ(edge[0][0][0][2].item<uint8_t>(), 128);  // 127.5 rounds to the even 128
}

// Every rank decodes a slab; halo rows and whole-image GroupNorm statistics give the one-rank image.
TEST(Vae, PatchParallelDecodeEqualsOneRank) {
  const auto ck = io::VaeCheckpoint::open(fixture("flux_tiny_dev/diffusers/vae"));
  model::VaeDecoder decoder(ck.config(), ck.getter(at::kFloat));
  at::manual_seed(4);
  const at::Tensor z = at::randn({2, 16, 10, 6});  // 10 latent rows: uneven over 3 and 4 ranks
  const at::Tensor ref = decoder.decode(z);
  // Rendezvous point-to-point: the halo exchanges would also complete on NCCL, where nothing is buffered.
  for (int n : {2, 3, 4}) {
    std::mutex m;
    std::vector<at::Tensor> out(n);
    dist::runInProcess(
        n,
        [&](dist::Runtime& rt) {
          at::Tensor img = parallel::decodeParallel(decoder, z, rt.world());
          std::lock_guard<std::mutex> lock(m);
          out[rt.worldRank()] = img;
        },
        dist::PointToPoint::kRendezvous);
    for (int r = 0; r < n; ++r) {
      const double err = test::maxRelError(out[r], ref);
      if (r == 0) std::printf("[vae] patch-parallel decode on %d ranks: max relative error %.3e\n", n, err);
      EXPECT_LE(err, 1e-5) << n << " ranks, rank " << r;
    }
  }
  EXPECT_EQ(parallel::slabRows(10, 0, 4), (std::pair<int64_t, int64_t>{0, 3}));
  EXPECT_EQ(parallel::slabRows(10, 3, 4), (std::pair<int64_t, int64_t>{8, 10}));
}

// Normalising each slab with its own statistics (what a patch-parallel VAE without the exact GroupNorm
// does) visibly changes the image; the whole-image statistics do not.
TEST(Vae, PerPatchGroupNormWouldBeWrong) {
  const auto ck = io::VaeCheckpoint::open(fixture("flux_tiny_dev/diffusers/vae"));
  model::VaeDecoder decoder(ck.config(), ck.getter(at::kFloat));
  at::manual_seed(4);
  const at::Tensor z = at::randn({1, 16, 8, 8}) + at::linspace(-2, 2, 8).view({1, 1, 8, 1});  // rows differ
  const at::Tensor ref = decoder.decode(z);
  // Per-slab normalisation: each half decoded alone (halo rows aside, the statistics are the slab's).
  model::LocalVaeSpatial local;
  const at::Tensor top = decoder.decode(z.narrow(2, 0, 4).contiguous(), local);
  EXPECT_GT(test::maxRelError(top, ref.narrow(2, 0, 32)), 1e-2);
}

// diffusers' tiled decode (enable_tiling), exactly: the tiles, their in-place blending and cropping.
TEST(Vae, TiledDecodeMatchesDiffusersTiling) {
  auto f = decodeFixture();
  const at::Tensor z = f->read("z");  // 8 x 12 latent pixels: 3 x 4 tiles of 4, the last ones cut short
  const auto ck = io::VaeCheckpoint::open(fixture("flux_tiny_dev/diffusers/vae"));
  EXPECT_EQ(ck.config().sampleSize, 32);
  EXPECT_EQ(ck.config().defaultTileLatent(), 4);
  const model::VaeTileGrid g = model::vaeTileGrid(ck.config(), 8, 12, 4);
  EXPECT_EQ(g.stride, 3);
  EXPECT_EQ(g.rows, 3);
  EXPECT_EQ(g.cols, 4);
  EXPECT_EQ(g.blend, 8);
  EXPECT_EQ(g.keep, 24);
  // diffusers keeps f * tile - blend pixels of each tile, which is not f * stride when tile * 0.75 is not
  // whole (its images then come out too large); pardit keeps f * stride: the same for diffusers' sizes.
  const model::VaeTileGrid g6 = model::vaeTileGrid(ck.config(), 8, 12, 6);
  EXPECT_EQ(g6.stride, 4);
  EXPECT_EQ(g6.keep, 32);
  model::VaeDecoder decoder(ck.config(), ck.getter(at::kFloat));
  const at::Tensor exact = decoder.decode(z);
  for (const auto& [tile, name] :
       {std::pair<int64_t, const char*>{4, "decoded_tiled_fp32"}, {8, "decoded_tiled8_fp32"}}) {
    const at::Tensor out = model::decodeTiled(decoder, z, tile);
    const at::Tensor ref = f->read(name);
    ASSERT_EQ(out.sizes(), ref.sizes());
    const double err = test::maxRelError(out, ref);
    const at::Tensor seam = (model::imagesToBytes(out).to(at::kInt) - model::imagesToBytes(exact).to(at::kInt)).abs();
    std::printf(
        "[fidelity] VAE tiled decode fp32, %lld px tiles: max relative error %.3e against diffusers; against the "
        "whole decode %.3f levels mean, %d max (the seams)\n",
        static_cast<long long>(tile * 8), err, seam.to(at::kDouble).mean().item<double>(), seam.max().item<int>());
    EXPECT_LE(err, 1e-5) << tile;
    EXPECT_GT(seam.max().item<int>(), 0) << "tiles normalise on their own: not the whole-image decode";
  }
  model::VaeDecoder bf16(ck.config(), ck.getter(at::kBFloat16));
  const double err = test::maxRelError(model::decodeTiled(bf16, z.to(at::kBFloat16), 4), f->read("decoded_tiled_bf16"));
  std::printf("[fidelity] VAE tiled decode bf16: max relative error %.3e against diffusers bf16\n", err);
  EXPECT_LE(err, 2e-2);
}

// Tiles dealt over ranks give the one-rank tiled decode.
TEST(Vae, TiledDecodeOverRanksEqualsOneRank) {
  const auto ck = io::VaeCheckpoint::open(fixture("flux_tiny_dev/diffusers/vae"));
  model::VaeDecoder decoder(ck.config(), ck.getter(at::kFloat));
  at::manual_seed(6);
  const at::Tensor z = at::randn({1, 16, 9, 7});
  const at::Tensor ref = model::decodeTiled(decoder, z, 4);
  for (int n : {2, 3}) {
    std::mutex m;
    std::vector<at::Tensor> out(n);
    dist::runInProcess(n, [&](dist::Runtime& rt) {
      at::Tensor img = parallel::decodeTiledParallel(decoder, z, rt.world(), 4);
      std::lock_guard<std::mutex> lock(m);
      out[rt.worldRank()] = img;
    });
    for (int r = 0; r < n; ++r) EXPECT_TRUE(at::equal(out[r], ref)) << n << " ranks, rank " << r;
  }
}
