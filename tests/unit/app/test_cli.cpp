// The pardit executable: end-to-end runs and bad input (one-line error naming the file/flag, non-zero exit).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "pardit/io/png.h"
#include "pardit/io/safetensors.h"
#include "test_util.h"

using namespace pardit;
using pardit::test::fixture;
using pardit::test::runPardit;
using pardit::test::TempDir;

namespace {
// The error line: exactly one line mentioning "error:".
std::string errorLine(const std::string& out) {
  std::string line;
  size_t count = 0, pos = 0;
  while ((pos = out.find("error: ", pos)) != std::string::npos) {
    const size_t start = out.rfind('\n', pos) == std::string::npos ? 0 : out.rfind('\n', pos) + 1;
    line = out.substr(start, out.find('\n', pos) - start);
    ++count;
    ++pos;
  }
  return count == 1 ? line : "<" + std::to_string(count) + " error lines in: " + out + ">";
}
}  // namespace

TEST(Cli, ForwardOnBothLayoutsReproducesDiffusers) {
  TempDir dir;
  for (const std::string model : {"flux_tiny_dev/diffusers", "flux_tiny_dev/flux1-tiny-dev.safetensors"}) {
    auto r = runPardit("forward --model " + fixture(model) + " --inputs " + fixture("forward_tiny_dev.safetensors") +
                       " --output " + dir.file("out.safetensors") + " --threads 1");
    ASSERT_EQ(r.exitCode, 0) << r.output;
    auto out = io::SafetensorsFile::open(dir.file("out.safetensors"));
    auto ref = io::SafetensorsFile::open(fixture("forward_tiny_dev.safetensors"));
    EXPECT_LE(test::maxRelError(out->read("sample"), ref->read("sample")), 1e-4) << model;
  }
  // --attention math (the unfused composition) in place of auto's flash attention: the same output within
  // float32 rounding.
  auto r = runPardit("forward --model " + fixture("flux_tiny_dev/diffusers") + " --inputs " +
                     fixture("forward_tiny_dev.safetensors") + " --output " + dir.file("math.safetensors") +
                     " --threads 1 --attention math");
  ASSERT_EQ(r.exitCode, 0) << r.output;
  auto out = io::SafetensorsFile::open(dir.file("math.safetensors"));
  auto ref = io::SafetensorsFile::open(fixture("forward_tiny_dev.safetensors"));
  EXPECT_LE(test::maxRelError(out->read("sample"), ref->read("sample")), 1e-4);
}

// --unfused runs ATen's compositions in place of the fused passes: on the CPU the same bits, in both dtypes.
TEST(Cli, UnfusedGivesTheFusedBits) {
  TempDir dir;
  ASSERT_EQ(runPardit("synth --preset tiny --seed 4 --out " + dir.file("m")).exitCode, 0);
  for (const std::string dtype : {"fp32", "bf16"}) {
    std::vector<at::Tensor> latents;
    for (const std::string flag : {"", " --unfused"}) {
      const std::string out = dir.file(dtype + (flag.empty() ? "-fused" : "-unfused") + ".safetensors");
      auto r = runPardit("generate --model " + dir.file("m") + " --prompt-embeds " +
                         dir.file("m/prompt_embeds.safetensors") + " --height 32 --width 48 --steps 2 --seed 9 " +
                         "--threads 2 --dtype " + dtype + " --save-latents " + out + flag);
      ASSERT_EQ(r.exitCode, 0) << r.output;
      latents.push_back(io::SafetensorsFile::open(out)->read("latents"));
    }
    EXPECT_TRUE(at::equal(latents[0], latents[1])) << dtype;
  }
  auto b = runPardit("bench --model " + dir.file("m") +
                     " --height 32 --width 32 --text-len 8 --warmup 0 --iters 1 "
                     "--threads 1 --unfused");
  ASSERT_EQ(b.exitCode, 0) << b.output;
  EXPECT_NE(b.output.find("fused passes: off"), std::string::npos) << b.output;
  EXPECT_NE(b.output.find(" fused=0"), std::string::npos) << b.output;
}

TEST(Cli, SynthThenGenerateIsDeterministicAcrossLayouts) {
  TempDir dir;
  for (const std::string layout : {"diffusers", "bfl"}) {
    auto r = runPardit("synth --preset tiny --layout " + layout + " --seed 3 --out " + dir.file(layout));
    ASSERT_EQ(r.exitCode, 0) << r.output;
  }
  const std::string embeds = dir.file("diffusers/prompt_embeds.safetensors");
  auto a =
      runPardit("generate --model " + dir.file("diffusers") + " --prompt-embeds " + embeds +
                " --height 32 --width 48 --steps 2 --seed 9 --threads 1 --save-latents " + dir.file("a.safetensors"));
  ASSERT_EQ(a.exitCode, 0) << a.output;
  EXPECT_NE(a.output.find("step 2/2"), std::string::npos);
  auto b =
      runPardit("generate --model " + dir.file("bfl/flux1-tiny.safetensors") + " --prompt-embeds " + embeds +
                " --height 32 --width 48 --steps 2 --seed 9 --threads 1 --save-latents " + dir.file("b.safetensors"));
  ASSERT_EQ(b.exitCode, 0) << b.output;
  at::Tensor la = io::SafetensorsFile::open(dir.file("a.safetensors"))->read("latents");
  at::Tensor lb = io::SafetensorsFile::open(dir.file("b.safetensors"))->read("latents");
  EXPECT_EQ(la.sizes(), (std::vector<int64_t>{1, 6, 64}));
  EXPECT_TRUE(at::equal(la, lb));
  // The latents carry what it takes to unpack and trace them.
  const auto meta = io::SafetensorsFile::open(dir.file("a.safetensors"))->metadata();
  for (const auto& [k, v] : std::map<std::string, std::string>{{"height", "32"},
                                                               {"width", "48"},
                                                               {"seed", "9"},
                                                               {"steps", "2"},
                                                               {"guidance_scale", "3.5"},
                                                               {"true_cfg_scale", "1"},
                                                               {"schedule", "shifted"},
                                                               {"model", dir.file("diffusers")},
                                                               {"dtype", "fp32"},
                                                               {"format", "pt"}})
    EXPECT_EQ(meta.count(k) ? meta.at(k) : "(missing)", v) << k;
  EXPECT_NE(meta.at("layout").find("ulysses 1"), std::string::npos) << meta.at("layout");
  // True CFG changes the result; the negative file comes from synth.
  auto c = runPardit("generate --model " + dir.file("diffusers") + " --prompt-embeds " + embeds +
                     " --negative-prompt-embeds " + dir.file("diffusers/negative_prompt_embeds.safetensors") +
                     " --true-cfg-scale 3 --height 32 --width 48 --steps 2 --seed 9 --threads 1 --save-latents " +
                     dir.file("c.safetensors"));
  ASSERT_EQ(c.exitCode, 0) << c.output;
  at::Tensor lc = io::SafetensorsFile::open(dir.file("c.safetensors"))->read("latents");
  EXPECT_FALSE(at::allclose(la, lc));
  // The synthetic pipeline is complete: a text prompt through its tokenizers and encoders to a PNG, the same
  // picture from both layouts.
  for (const std::string& model : {dir.file("diffusers"), dir.file("bfl/flux1-tiny.safetensors")}) {
    auto p = runPardit("generate --model " + model +
                       " --prompt 'a cozy cabin in the snow' --max-sequence-length 16"
                       " --height 32 --width 48 --steps 2 --seed 9 --threads 1 --output " +
                       dir.file(std::to_string(model.size()) + ".png"));
    ASSERT_EQ(p.exitCode, 0) << p.output;
  }
  EXPECT_TRUE(
      at::equal(io::readPng(dir.file(std::to_string(dir.file("diffusers").size()) + ".png")).pixels,
                io::readPng(dir.file(std::to_string(dir.file("bfl/flux1-tiny.safetensors").size()) + ".png")).pixels));
}

TEST(Cli, EnvironmentAndIniFileFillOptionsWithCommandLinePrecedence) {
  TempDir dir;
  ASSERT_EQ(runPardit("synth --preset tiny --out " + dir.file("m")).exitCode, 0);
  std::ofstream(dir.file("run.ini")) << "# a run\nheight = 32\nwidth = 32\nsteps = 3\nthreads = 1\n";
  const std::string base =
      "generate --model " + dir.file("m") + " --prompt-embeds " + dir.file("m/prompt_embeds.safetensors");
  auto r = runPardit(base + " --config " + dir.file("run.ini"));
  EXPECT_EQ(r.exitCode, 0) << r.output;
  EXPECT_NE(r.output.find("3 steps"), std::string::npos) << r.output;
  r = runPardit("--steps 1 " + base);  // not an option position: the command comes first
  EXPECT_NE(r.exitCode, 0);
  r = runPardit(base + " --config " + dir.file("run.ini") + " --steps 2");
  EXPECT_NE(r.output.find("2 steps"), std::string::npos) << r.output;
  r = runPardit("");
  EXPECT_EQ(r.exitCode, 2);
  const std::string env =
      "env PARDIT_STEPS=4 PARDIT_HEIGHT=16 PARDIT_WIDTH=16 " + std::string(PARDIT_BINARY) + " " + base;
  FILE* p = ::popen((env + " 2>&1").c_str(), "r");
  std::string out;
  char buf[512];
  while (std::fgets(buf, sizeof(buf), p)) out += buf;
  EXPECT_EQ(::pclose(p), 0) << out;
  EXPECT_NE(out.find("4 steps"), std::string::npos) << out;
  std::ofstream(dir.file("bad.ini")) << "stepz = 3\n";
  r = runPardit(base + " --config " + dir.file("bad.ini"));
  EXPECT_NE(r.exitCode, 0);
  EXPECT_NE(errorLine(r.output).find("bad.ini"), std::string::npos) << r.output;
}

struct BadRun {
  const char* what;
  std::string args;
  std::vector<std::string> mustMention;
};

TEST(Cli, BadInputGivesOneLineErrorAndNonZeroExit) {
  TempDir dir;
  ASSERT_EQ(runPardit("synth --preset tiny --out " + dir.file("m")).exitCode, 0);
  const std::string model = dir.file("m");
  const std::string embeds = dir.file("m/prompt_embeds.safetensors");
  // Inputs missing 'guidance' for a model with guidance embeddings.
  {
    auto src = io::SafetensorsFile::open(fixture("forward_tiny_dev.safetensors"));
    std::map<std::string, at::Tensor> t;
    for (const auto& i : src->tensors())
      if (i.name != "guidance") t[i.name] = src->read(i.name);
    io::writeSafetensors(dir.file("noguid.safetensors"), t);
  }
  // A truncated model file and a corrupt header.
  std::filesystem::create_directories(dir.file("trunc"));
  std::filesystem::copy_file(fixture("flux_tiny_dev/flux1-tiny-dev.safetensors"),
                             dir.file("trunc/flux1-x.safetensors"));
  std::filesystem::resize_file(dir.file("trunc/flux1-x.safetensors"), 500000);
  { std::ofstream(dir.file("garbage.safetensors")) << "\xff\xff\xff\xff\xff\xff\xff\x7fgarbage"; }
  std::filesystem::create_directories(dir.file("empty"));

  const std::vector<BadRun> cases = {
      {"missing inputs tensor",
       "forward --model " + fixture("flux_tiny_dev/diffusers") + " --inputs " + dir.file("noguid.safetensors") +
           " --output " + dir.file("o.safetensors"),
       {"noguid.safetensors", "'guidance'"}},
      {"inputs for another model",
       "forward --model " + fixture("flux_tiny_schnell/diffusers") + " --inputs " +
           fixture("forward_tiny_dev.safetensors") + " --output " + dir.file("o.safetensors"),
       {"forward_tiny_dev.safetensors", "encoder_hidden_states"}},
      {"truncated model",
       "generate --model " + dir.file("trunc/flux1-x.safetensors") + " --prompt-embeds " + embeds,
       {"flux1-x.safetensors"}},
      {"corrupt header",
       "generate --model " + dir.file("garbage.safetensors") + " --prompt-embeds " + embeds,
       {"garbage.safetensors", "header length"}},
      {"directory without model",
       "generate --model " + dir.file("empty") + " --prompt-embeds " + embeds,
       {"empty", "no FLUX transformer found"}},
      {"bad height", "generate --model " + model + " --prompt-embeds " + embeds + " --height 50", {"--height"}},
      {"embeddings of the wrong width",
       "generate --model " + fixture("flux_tiny_schnell/diffusers") + " --prompt-embeds " + embeds +
           " --height 32 --width 32",
       {"prompt_embeds.safetensors", "prompt_embeds"}},
      {"true cfg without negative",
       "generate --model " + model + " --prompt-embeds " + embeds + " --true-cfg-scale 4",
       {"--negative-prompt-embeds"}},
      {"unknown option", "generate --model " + model + " --stepz 3", {"stepz"}},
      {"bad option value", "generate --model " + model + " --steps many", {"--steps"}},
      {"missing prompt embeds", "generate --model " + model, {"--prompt-embeds"}},
      {"unknown preset", "synth --preset huge --out " + dir.file("h"), {"huge"}},
      {"unknown dtype", "forward --model " + model + " --inputs x --output y --dtype fp8", {"--dtype"}},
      {"unknown command", "frobnicate", {"frobnicate"}},
  };
  for (const auto& c : cases) {
    auto r = runPardit(c.args);
    EXPECT_NE(r.exitCode, 0) << c.what;
    const std::string line = errorLine(r.output);
    for (const auto& m : c.mustMention) EXPECT_NE(line.find(m), std::string::npos) << c.what << ": " << r.output;
  }
  EXPECT_FALSE(std::filesystem::exists(dir.file("o.safetensors")));  // nothing written on failure
}

// Prompt embeddings in, PNG out: the pixels equal diffusers' FluxPipeline (tiny dev transformer and VAE,
// fixtures from tests/reference/make_vae_fixtures.py) on both checkpoint layouts, and the PNG carries the
// run's parameters.
TEST(Cli, GenerateWritesThePngOfFluxPipeline) {
  TempDir dir;
  auto ref = io::SafetensorsFile::open(fixture("pipeline_tiny_dev_image.safetensors"));
  const auto& meta = ref->metadata();
  const at::Tensor pixels = ref->read("pixels")[0];
  for (const std::string model : {"flux_tiny_dev/diffusers", "flux_tiny_dev/flux1-tiny-dev.safetensors"}) {
    const std::string png = dir.file("cat.png");
    auto r = runPardit("generate --threads 1 --model " + fixture(model) + " --prompt-embeds " +
                       fixture("pipeline_tiny_dev_image.safetensors") + " --height " + meta.at("height") + " --width " +
                       meta.at("width") + " --steps " + meta.at("steps") + " --guidance-scale " +
                       meta.at("guidance_scale") + " --seed " + meta.at("seed") + " --output " + png);
    ASSERT_EQ(r.exitCode, 0) << r.output;
    EXPECT_NE(r.output.find("decoded 1 image 96x64"), std::string::npos) << r.output;
    const io::PngImage img = io::readPng(png);
    ASSERT_EQ(img.pixels.sizes(), pixels.sizes());
    const at::Tensor diff = (img.pixels.to(at::kInt) - pixels.to(at::kInt)).abs();
    std::printf("[fidelity] pardit generate --output (%s) vs FluxPipeline: %lld of %lld values differ, max %d\n",
                model.c_str(), static_cast<long long>(diff.gt(0).sum().item<int64_t>()),
                static_cast<long long>(diff.numel()), diff.max().item<int>());
    EXPECT_LE(diff.max().item<int>(), 1) << model;
    EXPECT_LE(diff.gt(0).sum().item<int64_t>(), diff.numel() / 1000) << model;
    ASSERT_FALSE(img.text.empty());
    EXPECT_EQ(img.text[0].first, "parameters");
    for (const std::string part : {"Steps: 3", "Seed: 42", "Size: 96x64", "Guidance: 3.5", "Parallel: cfg 1"})
      EXPECT_NE(img.text[0].second.find(part), std::string::npos) << img.text[0].second;
  }
  // --output and --save-latents together; a missing output directory fails before anything is loaded.
  auto both = runPardit("generate --threads 1 --model " + fixture("flux_tiny_dev/diffusers") + " --prompt-embeds " +
                        fixture("pipeline_tiny_dev_image.safetensors") + " --height 32 --width 32 --steps 1 --output " +
                        dir.file("a.png") + " --save-latents " + dir.file("a.safetensors"));
  ASSERT_EQ(both.exitCode, 0) << both.output;
  EXPECT_TRUE(std::filesystem::exists(dir.file("a.png")) && std::filesystem::exists(dir.file("a.safetensors")));
  auto missing = runPardit("generate --threads 1 --model " + fixture("flux_tiny_dev/diffusers") + " --prompt-embeds " +
                           fixture("pipeline_tiny_dev_image.safetensors") +
                           " --height 32 --width 32 --steps 1 --output " + dir.file("no/such/dir/a.png"));
  EXPECT_NE(missing.exitCode, 0);
  EXPECT_NE(missing.output.find("--output"), std::string::npos) << missing.output;
  EXPECT_EQ(missing.output.find("step 1/1"), std::string::npos) << "must fail before the denoising loop";
  // A VAE that is not there: one clear line naming it.
  auto noVae = runPardit("generate --threads 1 --model " + fixture("flux_tiny_dev/diffusers") + " --prompt-embeds " +
                         fixture("pipeline_tiny_dev_image.safetensors") + " --vae " + dir.file("nowhere") +
                         " --output " + dir.file("b.png"));
  EXPECT_NE(noVae.exitCode, 0);
  EXPECT_NE(errorLine(noVae.output).find("nowhere"), std::string::npos) << noVae.output;
}

// A prompt string in, a PNG out: the tokenizers, CLIP and T5, the transformer and the VAE together give
// the pixels of diffusers' FluxPipeline (the tiny pipeline of tests/reference/make_text_fixtures.py), with
// and without true CFG; `pardit encode` gives FluxPipeline.encode_prompt's embeddings.
TEST(Cli, PromptInImageOutEqualsFluxPipeline) {
  TempDir dir;
  auto ref = io::SafetensorsFile::open(fixture("text_tiny.safetensors"));
  const auto prompts = nlohmann::json::parse(ref->metadata().at("prompts"));
  const std::string model = fixture("flux_tiny_pipeline"), len = ref->metadata().at("max_sequence_length");
  const std::string prompt = "'" + prompts[1].get<std::string>() + "'";
  auto e = runPardit("encode --threads 1 --model " + model + " --prompt " + prompt + " --max-sequence-length " + len +
                     " --output " + dir.file("e.safetensors"));
  ASSERT_EQ(e.exitCode, 0) << e.output;
  auto embeds = io::SafetensorsFile::open(dir.file("e.safetensors"));
  for (const std::string name : {"prompt_embeds", "pooled_prompt_embeds"}) {
    const double err = test::maxRelError(embeds->read(name), ref->read(name));
    std::printf("[fidelity] pardit encode %s vs FluxPipeline.encode_prompt: max relative error %.3e\n", name.c_str(),
                err);
    EXPECT_LE(err, 1e-5) << name;
  }
  for (const auto& [name, flags] : std::vector<std::pair<std::string, std::string>>{
           {"plain", ""},
           {"true_cfg", " --negative-prompt '" + prompts[0].get<std::string>() + "' --true-cfg-scale 2.5"}}) {
    const std::string png = dir.file(name + ".png");
    auto r = runPardit("generate --threads 1 --model " + model + " --prompt " + prompt + flags +
                       " --max-sequence-length " + len + " --height 64 --width 96 --steps 3 --seed 42 --output " + png);
    ASSERT_EQ(r.exitCode, 0) << r.output;
    const at::Tensor diff = (io::readPng(png).pixels.to(at::kInt) - ref->read("pixels_" + name).to(at::kInt)).abs();
    std::printf("[fidelity] pardit generate --prompt (%s) vs FluxPipeline: %lld of %lld values differ, max %d\n",
                name.c_str(), static_cast<long long>(diff.gt(0).sum().item<int64_t>()),
                static_cast<long long>(diff.numel()), diff.max().item<int>());
    EXPECT_LE(diff.max().item<int>(), 1) << name;
    EXPECT_LE(diff.gt(0).sum().item<int64_t>(), diff.numel() / 1000) << name;
    EXPECT_NE(io::readPng(png).text[0].second.find(prompts[1].get<std::string>()), std::string::npos);
  }
  // A prompt file is a queue: one PNG per non-empty line, named by index and seed (--seed + index).
  std::ofstream(dir.file("prompts.txt")) << "a cat\n\na dog\n";
  auto queue =
      runPardit("generate --threads 1 --model " + model + " --prompt-file " + dir.file("prompts.txt") +
                " --max-sequence-length 8 --height 32 --width 32 --steps 1 --seed 10 --output-dir " + dir.file("q"));
  ASSERT_EQ(queue.exitCode, 0) << queue.output;
  EXPECT_TRUE(std::filesystem::exists(dir.file("q/00000-10.png")) &&
              std::filesystem::exists(dir.file("q/00001-11.png")))
      << queue.output;
  // --output names one image: with a prompt file it is an error naming both.
  auto both2 = runPardit("generate --threads 1 --model " + model + " --prompt-file " + dir.file("prompts.txt") +
                         " --output " + dir.file("b.png"));
  EXPECT_NE(both2.exitCode, 0);
  EXPECT_NE(errorLine(both2.output).find("--output-dir"), std::string::npos) << both2.output;
  // True CFG with a text prompt needs a text negative prompt; a model without encoders names the flag.
  auto noNeg = runPardit("generate --threads 1 --model " + model + " --prompt cat --true-cfg-scale 2 --output " +
                         dir.file("x.png"));
  EXPECT_NE(noNeg.exitCode, 0);
  EXPECT_NE(errorLine(noNeg.output).find("negative"), std::string::npos) << noNeg.output;
  auto noEncoder = runPardit("generate --threads 1 --model " + fixture("flux_tiny_dev/flux1-tiny-dev.safetensors") +
                             " --prompt cat --output " + dir.file("y.png"));
  EXPECT_NE(noEncoder.exitCode, 0);
  EXPECT_NE(errorLine(noEncoder.output).find("--text-encoder"), std::string::npos) << noEncoder.output;
}

// `pardit plan` with the default budget (auto) plans for what a rank would get on this machine, and derives
// the world size from the degrees; it shows the text encoders' rank and the decode it would run.
TEST(Cli, PlanWithTheDefaultBudgetAndDerivedWorldSize) {
  auto r = runPardit("plan --model " + fixture("flux_tiny_pipeline") + " --pipefusion-degree 2 --height 64 --width 64");
  ASSERT_EQ(r.exitCode, 0) << r.output;
  EXPECT_NE(r.output.find("budget auto: this machine's available host memory shared by 2 rank(s)"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("2 rank(s): cfg 1 x pipefusion 2"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("text encoders on rank"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("decode: patch-parallel (exact)"), std::string::npos) << r.output;
  r = runPardit("plan --model " + fixture("flux_tiny_pipeline") +
                " --json --device-memory-budget 1GiB --vae-tiling on");
  ASSERT_EQ(r.exitCode, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["decode"]["mode"], "tiles");
  EXPECT_EQ(j["ranks"][0]["budget_bytes"], 1ull << 30);
  EXPECT_FALSE(j.contains("budget_source"));
}
