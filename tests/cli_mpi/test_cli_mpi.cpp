// `pardit forward` and `pardit generate` under mpiexec: every layout gives the single-rank output,
// rank 0 writes, bad layouts fail with one line on every rank, and a failing rank never hangs the job.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <chrono>

#include "pardit/io/png.h"
#include "pardit/io/safetensors.h"
#include "pardit/pipeline/latents.h"
#include "test_util.h"

using namespace pardit;
using pardit::test::fixture;
using pardit::test::runPardit;
using pardit::test::TempDir;

namespace {
test::CommandResult mpirun(int n, const std::string& args) {
  return test::runCommand(std::string(PARDIT_MPIEXEC) + " -n " + std::to_string(n) + " --oversubscribe " +
                          PARDIT_BINARY + " " + args);
}

at::Tensor readTensor(const std::string& file, const std::string& name) {
  return io::SafetensorsFile::open(file)->read(name);
}

// forward inputs for the tiny dev fixture model: 4 x 8 image tokens, `T` text tokens, batch 2.
void writeInputs(const std::string& path, int64_t T) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(17);
  pipeline::LatentGeometry g{64, 128, 16};
  io::writeSafetensors(path, {{"hidden_states", at::randn({2, g.tokens(), 64}, gen)},
                              {"encoder_hidden_states", at::randn({2, T, 32}, gen)},
                              {"pooled_projections", at::randn({2, 32}, gen)},
                              {"timestep", at::tensor({0.9f, 0.4f})},
                              {"guidance", at::tensor({3.5f, 3.5f})},
                              {"img_ids", pipeline::imageIds(g)},
                              {"txt_ids", pipeline::textIds(T)}});
}
// `pardit generate` with true CFG on the tiny model synthesized in dir/m, plus `flags`.
std::string trueCfgGenerate(const TempDir& dir, const std::string& flags) {
  return "generate --threads 1 --model " + dir.file("m") + " --prompt-embeds " +
         dir.file("m/prompt_embeds.safetensors") + " --negative-prompt-embeds " +
         dir.file("m/negative_prompt_embeds.safetensors") + " " + flags;
}
}  // namespace

TEST(CliMpi, ForwardLayoutsMatchSingleRank) {
  TempDir dir;
  const std::string model = fixture("flux_tiny_dev/diffusers");
  for (int64_t T : {8, 6}) {
    const std::string in = dir.file("in" + std::to_string(T) + ".safetensors");
    writeInputs(in, T);
    const std::string base = "forward --threads 1 --model " + model + " --inputs " + in + " --output ";
    auto r = runPardit(base + dir.file("ref.safetensors"));
    ASSERT_EQ(r.exitCode, 0) << r.output;
    const at::Tensor ref = readTensor(dir.file("ref.safetensors"), "sample");
    const std::vector<std::pair<int, std::string>> layouts = {{2, "--ulysses-degree 2"},
                                                              {2, "--ring-degree 2"},
                                                              {2, "--cfg-degree 2"},
                                                              {4, "--ulysses-degree 2 --ring-degree 2"},
                                                              {4, "--ulysses-degree 4"},
                                                              {4, "--ring-degree 4"},
                                                              {4, "--cfg-degree 2 --ulysses-degree 2"}};
    for (const auto& [n, flags] : layouts) {
      const std::string out = dir.file("out.safetensors");
      std::filesystem::remove(out);
      auto p = mpirun(n, base + out + " " + flags);
      ASSERT_EQ(p.exitCode, 0) << flags << "\n" << p.output;
      const double err = test::maxRelError(readTensor(out, "sample"), ref);
      std::printf("[equivalence] pardit forward -n %d %s (text %lld): max relative error %.3e\n", n, flags.c_str(),
                  static_cast<long long>(T), err);
      EXPECT_LE(err, 1e-5) << flags;
    }
  }
}

TEST(CliMpi, GenerateLayoutsMatchSingleRank) {
  TempDir dir;
  ASSERT_EQ(runPardit("synth --preset tiny --text-len 8 --out " + dir.file("m")).exitCode, 0);
  const std::string base =
      trueCfgGenerate(dir, "--true-cfg-scale 3 --height 64 --width 96 --steps 3 --seed 5") + " --save-latents ";
  auto r = runPardit(base + dir.file("ref.safetensors"));
  ASSERT_EQ(r.exitCode, 0) << r.output;
  const at::Tensor ref = readTensor(dir.file("ref.safetensors"), "latents");
  for (const auto& [n, flags] : std::vector<std::pair<int, std::string>>{{2, "--ulysses-degree 2"},
                                                                         {2, "--ring-degree 2"},
                                                                         {2, "--cfg-degree 2"},
                                                                         {4, "--cfg-degree 2 --ulysses-degree 2"},
                                                                         {4, "--cfg-degree 2 --ring-degree 2"}}) {
    auto p = mpirun(n, base + dir.file("out.safetensors") + " " + flags);
    ASSERT_EQ(p.exitCode, 0) << flags << "\n" << p.output;
    const double err = test::maxRelError(readTensor(dir.file("out.safetensors"), "latents"), ref);
    std::printf("[equivalence] pardit generate -n %d %s: max relative error %.3e\n", n, flags.c_str(), err);
    EXPECT_LE(err, 1e-5) << flags;
  }
}

TEST(CliMpi, InvalidLayoutsFailOnEveryRankWithOneLine) {
  TempDir dir;
  ASSERT_EQ(runPardit("synth --preset tiny --out " + dir.file("m")).exitCode, 0);
  const std::string base = "generate --threads 1 --model " + dir.file("m") + " --prompt-embeds " +
                           dir.file("m/prompt_embeds.safetensors") + " --steps 1 ";
  const std::vector<std::tuple<int, std::string, std::string>> cases = {
      {2, "--ulysses-degree 4 --height 64 --width 96", "= 4 but the job has 2 rank(s)"},
      {2, "--cfg-degree 2 --height 64 --width 96", "--cfg-degree 2 runs the two branches of true CFG"},
      {4, "--ulysses-degree 4 --height 48 --width 48", "not divisible by --ulysses-degree x --ring-degree = 4"},
      {2, "--ring-degree 2 --cfg-degree 3 --height 64 --width 96", "--cfg-degree must be 1 or 2"},
  };
  for (const auto& [n, flags, expect] : cases) {
    const auto t0 = std::chrono::steady_clock::now();
    auto p = mpirun(n, base + flags);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_NE(p.exitCode, 0) << flags;
    EXPECT_NE(p.output.find(expect), std::string::npos) << flags << "\n" << p.output;
    size_t lines = 0;
    for (size_t pos = 0; (pos = p.output.find("error: ", pos)) != std::string::npos; ++pos) ++lines;
    EXPECT_EQ(lines, 1u) << "one error line, from one rank: " << p.output;
    EXPECT_LT(secs, 60.0);
  }
  // Tiny has 4 heads: Ulysses 3 does not divide them.
  auto p = mpirun(3, base + "--ulysses-degree 3 --height 48 --width 48");
  EXPECT_NE(p.output.find("does not divide the model's 4 attention heads"), std::string::npos) << p.output;
}

TEST(CliMpi, AFailingRankDoesNotHangTheJob) {
  TempDir dir;
  ASSERT_EQ(runPardit("synth --preset tiny --out " + dir.file("m")).exitCode, 0);
  const std::string common = " generate --threads 1 --prompt-embeds " + dir.file("m/prompt_embeds.safetensors") +
                             " --height 64 --width 96 --steps 2 --ulysses-degree 2 --model ";
  // Rank 1 cannot open its model (a node-local copy that is missing): MPMD launch with different paths.
  const auto t0 = std::chrono::steady_clock::now();
  auto p = test::runCommand(std::string(PARDIT_MPIEXEC) + " --oversubscribe -n 1 " + PARDIT_BINARY + common +
                            dir.file("m") + " : -n 1 " + PARDIT_BINARY + common + dir.file("missing-model"));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_NE(p.exitCode, 0);
  EXPECT_NE(p.output.find("[rank 1/2] error: " + dir.file("missing-model") + ": no such file"), std::string::npos)
      << p.output;
  EXPECT_LT(secs, 30.0) << "the job must end within seconds";
}

// MPMD launches whose ranks differ in one option that changes control flow (or which collectives run)
// are refused by every rank with one line naming the option and both values, within seconds.
TEST(CliMpi, RanksWithDifferentOptionsAreRefused) {
  TempDir dir;
  ASSERT_EQ(runPardit("synth --preset tiny --out " + dir.file("m")).exitCode, 0);
  const std::string generate = " generate --threads 1 --model " + dir.file("m") + " --prompt-embeds " +
                               dir.file("m/prompt_embeds.safetensors") + " ";  // nothing runs: the check comes first
  const std::string neg = "--negative-prompt-embeds " + dir.file("m/negative_prompt_embeds.safetensors");
  struct Case {
    std::string option, a, b;  // the flags of rank 0 and rank 1 (after the common ones)
  };
  const std::vector<Case> cases = {
      {"--seed", "", "--seed 9"},
      {"--steps", "--steps 3", "--steps 4"},
      {"--height", "", "--height 32"},
      {"--width", "", "--width 64"},
      {"--guidance-scale", "", "--guidance-scale 4"},
      {"--true-cfg-scale", neg, neg + " --true-cfg-scale 2"},
      {"--negative-prompt-embeds", "", neg},
      {"--schedule", "", "--schedule plain"},
      {"--dtype", "", "--dtype bf16"},
      {"--device", "--device cpu", "--device auto"},
      {"--metrics", "", "--metrics " + dir.file("r.h5")},
      {"--save-latents", "--save-latents " + dir.file("a.safetensors"), ""},
      {"--offload", "", "--offload sequential"},
      {"--stream-from", "", "--stream-from file"},
      {"--device-memory-budget", "", "--device-memory-budget 1GiB"},
      {"--ulysses-degree", "--ulysses-degree 2", ""},
      {"--ring-degree", "--ring-degree 2", ""},
      {"--cfg-degree", "--cfg-degree 2", ""},
      {"--pipefusion-degree", "--pipefusion-degree 2", ""},
      {"--num-pipeline-patch", "", "--num-pipeline-patch 2"},
      {"--warmup-steps", "", "--warmup-steps 2"},
      {"--pp-partition", "", "--pp-partition memory"},
  };
  auto check = [&](const std::string& option, const std::string& rank0, const std::string& rank1) {
    const auto t0 = std::chrono::steady_clock::now();
    auto p = test::runCommand(std::string(PARDIT_MPIEXEC) + " --oversubscribe -n 1 " + PARDIT_BINARY + rank0 +
                              " : -n 1 " + PARDIT_BINARY + rank1);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    size_t lines = 0;
    for (size_t pos = 0; (pos = p.output.find("error: ", pos)) != std::string::npos; ++pos) ++lines;
    const size_t at = p.output.find("error: options differ between ranks: " + option + " is ");
    std::printf(
        "[mismatch] %-26s rc %d, %zu error line(s), %.1f s: %s\n", option.c_str(), p.exitCode, lines, secs,
        at == std::string::npos ? "NOT NAMED" : p.output.substr(at + 7, p.output.find('\n', at) - at - 7).c_str());
    EXPECT_NE(p.exitCode, 0) << option;
    EXPECT_EQ(lines, 1u) << option << "\n" << p.output;
    EXPECT_NE(at, std::string::npos) << option << "\n" << p.output;
    EXPECT_LT(secs, 20.0) << option;
  };
  for (const auto& c : cases) check(c.option, generate + c.a, generate + c.b);
  // Another command on one rank.
  check("the command", generate, " forward --threads 1 --model " + dir.file("m") + " --inputs x --output y");
  const std::string forward = " forward --threads 1 --model " + dir.file("m") + " --inputs x --output ";
  check("--output", forward + dir.file("a"), forward + dir.file("b"));
  check("--comm", " bench --threads 1", " bench --threads 1 --comm");
}

// Streaming under a budget changes nothing in every parallel mode: USP, CFG and PipeFusion ranks stream
// their groups and produce the same latents as their fully resident runs.
TEST(CliMpi, StreamedWeightsGiveTheResidentResultInEveryMode) {
  TempDir dir;
  ASSERT_EQ(runPardit("synth --preset tiny --text-len 8 --out " + dir.file("m")).exitCode, 0);
  const std::string base = trueCfgGenerate(dir, "--true-cfg-scale 2 --height 64 --width 64 --steps 2 --seed 1") + " ";
  for (const auto& [n, flags] :
       std::vector<std::pair<int, std::string>>{{2, "--ulysses-degree 2"},
                                                {2, "--cfg-degree 2"},
                                                {2, "--pipefusion-degree 2"},
                                                {4, "--pipefusion-degree 2 --ring-degree 2"}}) {
    auto a = mpirun(n, base + flags + " --save-latents " + dir.file("a.safetensors"));
    ASSERT_EQ(a.exitCode, 0) << a.output;
    auto b = mpirun(n, base + flags + " --offload sequential --device-memory-budget 1GiB --save-latents " +
                           dir.file("b.safetensors"));
    ASSERT_EQ(b.exitCode, 0) << b.output;
    EXPECT_NE(b.output.find("streamed"), std::string::npos) << b.output;
    EXPECT_TRUE(
        at::equal(readTensor(dir.file("a.safetensors"), "latents"), readTensor(dir.file("b.safetensors"), "latents")))
        << flags;
  }
}

// Prompt embeddings in, PNG out, in every parallel layout: the denoising layout plus the patch-parallel
// VAE decode over all ranks give the single-rank picture (within one level on at most 0.1% of values;
// exact layouts only differ by floating-point reassociation).
TEST(CliMpi, ImageLayoutsMatchSingleRank) {
  TempDir dir;
  const std::string base = "generate --threads 1 --model " + fixture("flux_tiny_dev/diffusers") + " --prompt-embeds " +
                           fixture("pipeline_tiny_dev_image.safetensors") +
                           " --height 64 --width 96 --steps 3 --seed 42 --output ";
  auto r = runPardit(base + dir.file("ref.png"));
  ASSERT_EQ(r.exitCode, 0) << r.output;
  const at::Tensor ref = io::readPng(dir.file("ref.png")).pixels.to(at::kInt);
  for (const auto& [n, flags] :
       std::vector<std::pair<int, std::string>>{{2, "--ulysses-degree 2"},
                                                {2, "--ring-degree 2"},
                                                {2, "--pipefusion-degree 2 --warmup-steps 3"},
                                                {4, "--ulysses-degree 2 --ring-degree 2"},
                                                {4, "--pipefusion-degree 2 --ulysses-degree 2 --warmup-steps 3"}}) {
    const std::string png = dir.file("out.png");
    auto p = mpirun(n, base + png + " " + flags);
    ASSERT_EQ(p.exitCode, 0) << flags << "\n" << p.output;
    EXPECT_NE(p.output.find("on " + std::to_string(n) + " ranks"), std::string::npos) << p.output;
    const at::Tensor diff = (io::readPng(png).pixels.to(at::kInt) - ref).abs();
    std::printf("[image] -n %d %s: %lld of %lld values differ from one rank, max %d\n", n, flags.c_str(),
                static_cast<long long>(diff.gt(0).sum().item<int64_t>()), static_cast<long long>(diff.numel()),
                diff.max().item<int>());
    EXPECT_LE(diff.max().item<int>(), 1) << flags;
    EXPECT_LE(diff.gt(0).sum().item<int64_t>(), diff.numel() / 1000) << flags;
  }
}

// A prompt string in every layout: one rank encodes (and only that rank reads the encoders), the
// embeddings reach every rank, and the picture is the single-rank picture.
TEST(CliMpi, PromptLayoutsMatchSingleRank) {
  TempDir dir;
  const std::string base = "generate --threads 1 --model " + fixture("flux_tiny_pipeline") +
                           " --prompt 'a photo of a cat' --negative-prompt 'blurry' --true-cfg-scale 2.5"
                           " --max-sequence-length 16 --height 64 --width 96 --steps 3 --seed 42 --output ";
  auto r = runPardit(base + dir.file("ref.png"));
  ASSERT_EQ(r.exitCode, 0) << r.output;
  const at::Tensor ref = io::readPng(dir.file("ref.png")).pixels.to(at::kInt);
  for (const auto& [n, flags] : std::vector<std::pair<int, std::string>>{{2, "--ulysses-degree 2"},
                                                                         {2, "--cfg-degree 2"},
                                                                         {2, "--pipefusion-degree 2 --warmup-steps 3"},
                                                                         {2, "--ring-degree 2 --text-encoder-rank 1"},
                                                                         {4, "--cfg-degree 2 --ulysses-degree 2"}}) {
    const std::string png = dir.file("out.png");
    auto p = mpirun(n, base + png + " " + flags);
    ASSERT_EQ(p.exitCode, 0) << flags << "\n" << p.output;
    size_t encoders = 0;
    for (size_t pos = 0; (pos = p.output.find("] encoded ", pos)) != std::string::npos; ++pos) ++encoders;
    EXPECT_EQ(encoders, 1u) << "exactly one rank encodes: " << p.output;
    if (flags.find("--text-encoder-rank 1") != std::string::npos) {
      EXPECT_NE(p.output.find("[rank 1/2] encoded"), std::string::npos) << p.output;
    }
    const at::Tensor diff = (io::readPng(png).pixels.to(at::kInt) - ref).abs();
    std::printf("[prompt] -n %d %s: %lld of %lld values differ from one rank, max %d\n", n, flags.c_str(),
                static_cast<long long>(diff.gt(0).sum().item<int64_t>()), static_cast<long long>(diff.numel()),
                diff.max().item<int>());
    EXPECT_LE(diff.max().item<int>(), 1) << flags;
    EXPECT_LE(diff.gt(0).sum().item<int64_t>(), diff.numel() / 1000) << flags;
  }
}

// With the small preset's whole pipeline: the embeddings that one rank encodes and broadcasts are the
// one-rank embeddings bit for bit, whichever rank encodes; and prompt -> latents under PipeFusion with
// full warm-up and CFG parallelism (the layouts that compute what one rank computes) is the one-rank
// result bit for bit on 2 and 4 ranks.
TEST(CliMpi, EncodeAndGenerateOnRanksEqualOneRankBitForBit) {
  TempDir dir;
  ASSERT_EQ(runPardit("synth --preset small --out " + dir.file("m") + " -q").exitCode, 0);
  const std::string prompt = " --threads 1 --model " + dir.file("m") +
                             " --prompt 'a lighthouse at dusk' --negative-prompt 'fog' --max-sequence-length 24 ";
  auto r = runPardit("encode" + prompt + "--output " + dir.file("e1.safetensors"));
  ASSERT_EQ(r.exitCode, 0) << r.output;
  for (const auto& [n, flags] :
       std::vector<std::pair<int, std::string>>{{2, "--ulysses-degree 2"},
                                                {4, "--cfg-degree 2 --ulysses-degree 2 --text-encoder-rank 3"},
                                                {4, "--pipefusion-degree 4 --text-encoder-device cpu"}}) {
    auto p = mpirun(n, "encode" + prompt + "--output " + dir.file("en.safetensors") + " " + flags);
    ASSERT_EQ(p.exitCode, 0) << flags << "\n" << p.output;
    for (const char* t :
         {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"})
      EXPECT_TRUE(at::equal(readTensor(dir.file("en.safetensors"), t), readTensor(dir.file("e1.safetensors"), t)))
          << n << " " << t;
  }
  // Without and with true CFG (its branches on two rank groups: each the one-rank branch).
  for (const std::string cfg : {"", "--true-cfg-scale 2 "}) {
    const std::string gen = "generate" + prompt + cfg +
                            "--height 64 --width 64 --steps 2 --seed 3 --warmup-steps 2 "
                            "--save-latents ";
    r = runPardit(gen + dir.file("l1.safetensors"));
    ASSERT_EQ(r.exitCode, 0) << r.output;
    const std::vector<std::pair<int, std::string>> layouts =
        cfg.empty()
            ? std::vector<std::pair<int, std::string>>{{2, "--pipefusion-degree 2"}, {4, "--pipefusion-degree 4"}}
            : std::vector<std::pair<int, std::string>>{{2, "--cfg-degree 2"},
                                                       {4, "--cfg-degree 2 --pipefusion-degree 2"}};
    for (const auto& [n, flags] : layouts) {
      auto p = mpirun(n, gen + dir.file("ln.safetensors") + " " + flags);
      ASSERT_EQ(p.exitCode, 0) << flags << "\n" << p.output;
      EXPECT_TRUE(at::equal(readTensor(dir.file("ln.safetensors"), "latents"),
                            readTensor(dir.file("l1.safetensors"), "latents")))
          << cfg << flags;
    }
  }
}

// FP8 weights in every parallel mode: the layouts that compute what one rank computes (PipeFusion with full
// warm-up, CFG, their hybrid, and streamed FP8 groups under a budget) give the one-rank FP8 latents bit for
// bit; USP (Ulysses, Ring, both) within floating-point reassociation. A checkpoint written by
// `pardit quantize` runs like quantizing while loading, and PipeFusion stages read only their FP8 groups.
// (True CFG on one PipeFusion group runs both branches as one batch of 2, which the GEMMs may round
// differently from two batches of 1: PipeFusion is compared without true CFG, as for dense weights.)
TEST(CliMpi, Fp8WeightsInEveryParallelMode) {
  TempDir dir;
  ASSERT_EQ(runPardit("synth --preset tiny --text-len 8 --out " + dir.file("m")).exitCode, 0);
  ASSERT_EQ(runPardit("quantize --model " + dir.file("m") + " --out " + dir.file("q")).exitCode, 0);
  const std::string common = "--height 64 --width 64 --steps 3 --seed 2 --warmup-steps 3 ";
  const std::string cfgBase = trueCfgGenerate(dir, "--true-cfg-scale 2 " + common);
  const std::string plainBase = "generate --threads 1 --model " + dir.file("m") + " --prompt-embeds " +
                                dir.file("m/prompt_embeds.safetensors") + " " + common;
  auto oneRank = [&](const std::string& base, const std::string& file) {
    auto r = runPardit(base + " --weight-dtype fp8 --save-latents " + dir.file(file));
    EXPECT_EQ(r.exitCode, 0) << r.output;
    EXPECT_NE(r.output.find("as fp8 e4m3 (row scales)"), std::string::npos) << r.output;
    return readTensor(dir.file(file), "latents");
  };
  const at::Tensor oneCfg = oneRank(cfgBase, "one_cfg.safetensors"), onePlain = oneRank(plainBase, "one.safetensors");
  auto r = runPardit(plainBase + " --save-latents " + dir.file("dense.safetensors"));
  ASSERT_EQ(r.exitCode, 0) << r.output;
  EXPECT_FALSE(at::equal(onePlain, readTensor(dir.file("dense.safetensors"), "latents")))
      << "FP8 must change the latents";
  struct Layout {
    int n;
    std::string flags;
    bool trueCfg, exact;
  };
  for (const auto& l :
       std::vector<Layout>{{2, "--pipefusion-degree 2", false, true},
                           {2, "--pipefusion-degree 2 --offload sequential --device-memory-budget 1GiB", false, true},
                           {2, "--cfg-degree 2", true, true},
                           {4, "--cfg-degree 2 --pipefusion-degree 2", true, true},
                           {2, "--ulysses-degree 2", true, false},
                           {2, "--ring-degree 2", true, false},
                           {4, "--ulysses-degree 2 --ring-degree 2", true, false}}) {
    auto p = mpirun(l.n, (l.trueCfg ? cfgBase : plainBase) + " --weight-dtype fp8 --save-latents " +
                             dir.file("n.safetensors") + " " + l.flags);
    ASSERT_EQ(p.exitCode, 0) << l.flags << "\n" << p.output;
    const at::Tensor out = readTensor(dir.file("n.safetensors"), "latents"), &one = l.trueCfg ? oneCfg : onePlain;
    const double err = test::maxRelError(out, one);
    std::printf("[fp8] -n %d %s%s: max relative error %.3e against one rank with FP8 weights%s\n", l.n, l.flags.c_str(),
                l.trueCfg ? " (true CFG)" : "", err, at::equal(out, one) ? " (bit-identical)" : "");
    if (l.exact) {
      EXPECT_TRUE(at::equal(out, one)) << l.flags;
    } else {
      EXPECT_LE(err, 1e-5) << l.flags;
    }
    if (l.flags.find("offload") != std::string::npos) {
      EXPECT_NE(p.output.find("streamed"), std::string::npos) << p.output;
    }
  }
  // The quantized checkpoint: FP8 by itself (auto), the same latents, on one rank and on a pipeline.
  for (int n : {1, 2}) {
    const std::string q = "generate --threads 1 --model " + dir.file("q") + " --prompt-embeds " +
                          dir.file("m/prompt_embeds.safetensors") + " " + common + "--save-latents " +
                          dir.file("q.safetensors") + (n == 2 ? " --pipefusion-degree 2 --log-level debug" : "");
    auto p = n == 1 ? runPardit(q) : mpirun(n, q);
    ASSERT_EQ(p.exitCode, 0) << p.output;
    EXPECT_TRUE(at::equal(readTensor(dir.file("q.safetensors"), "latents"), onePlain)) << n;
    if (n == 2) {
      // Each stage read its own FP8 groups only: together the two read the checkpoint's transformer bytes once
      // plus the conditioning embedders both stages hold.
      std::vector<uint64_t> read;
      for (size_t pos = 0; (pos = p.output.find("rank bytes: stage=", pos)) != std::string::npos; ++pos) {
        const size_t at = p.output.find(" read=", pos);
        read.push_back(std::stoull(p.output.substr(at + 6)));
      }
      ASSERT_EQ(read.size(), 2u) << p.output;
      const uint64_t total = std::stoull(p.output.substr(p.output.find(" total=") + 7));
      std::printf("[fp8] pipeline stages read %llu and %llu of the FP8 checkpoint's %llu bytes\n",
                  static_cast<unsigned long long>(read[0]), static_cast<unsigned long long>(read[1]),
                  static_cast<unsigned long long>(total));
      EXPECT_LT(read[0], total);
      EXPECT_LT(read[1], total);
      EXPECT_GE(read[0] + read[1], total);
    }
  }
}
