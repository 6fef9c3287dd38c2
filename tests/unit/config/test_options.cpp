// The option table: typed parsing with one-line errors, precedence, help, provenance and the set of
// options every rank must agree on.
#include <gtest/gtest.h>

#include <cstdlib>
#include <set>

#include "config/config.h"
#include "pardit/core/error.h"

using namespace pardit;

namespace {
config::EngineConfig parse(const std::string& command, const std::vector<std::string>& args) {
  return config::parseCommandLine(command, args).config;
}

std::string errorOf(const std::string& command, const std::vector<std::string>& args) {
  try {
    parse(command, args);
  } catch (const Error& e) {
    return e.message();
  }
  return "<no error>";
}

const std::vector<std::string> kGenerate = {"--model", "m", "--prompt-embeds", "e.safetensors"};
std::vector<std::string> generateWith(std::vector<std::string> extra) {
  std::vector<std::string> a = kGenerate;
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}
}  // namespace

TEST(Options, ParsesTypedValues) {
  const auto c = parse("generate", generateWith({"--offload", "sequential", "--stream-from", "file", "--dtype", "bf16",
                                                 "--device-memory-budget", "1.5GiB", "--pp-partition", "3,4",
                                                 "--schedule", "plain", "--seed", "18446744073709551615"}));
  EXPECT_EQ(c.command, config::Command::kGenerate);
  EXPECT_EQ(c.offload, config::Offload::kSequential);
  EXPECT_EQ(c.streamFrom, config::StreamSource::kFile);
  EXPECT_EQ(c.dtype, config::Dtype::kBf16);
  EXPECT_FALSE(c.deviceMemoryBudget.automatic);
  EXPECT_EQ(c.deviceMemoryBudget.bytes, 3ULL << 29);
  EXPECT_EQ(c.ppPartition.mode, config::Partition::Mode::kExplicit);
  EXPECT_EQ(c.ppPartition.counts, (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(c.schedule, config::Schedule::kPlain);
  EXPECT_EQ(c.seed, 18446744073709551615ULL);
  const auto d = parse("bench", {});
  EXPECT_EQ(d.height, 256);  // bench's own defaults
  EXPECT_EQ(d.preset, "small");
}

TEST(Options, SizesAndTheirErrors) {
  EXPECT_EQ(config::parseSize("24GiB", "--x"), 24ULL << 30);
  EXPECT_EQ(config::parseSize("12GB", "--x"), 12'000'000'000ULL);
  EXPECT_EQ(config::parseSize("512MiB", "--x"), 512ULL << 20);
  EXPECT_EQ(config::parseSize("123456", "--x"), 123456ULL);
  EXPECT_THROW(config::parseSize("3 parsecs", "--x"), Error);
  EXPECT_THROW(config::parseSize("-1GiB", "--x"), Error);
  // 2^64 bytes and more are refused, not wrapped.
  EXPECT_NE(errorOf("generate", generateWith({"--device-memory-budget", "16EiB"})).find("--device-memory-budget"),
            std::string::npos);
  EXPECT_NE(errorOf("generate", generateWith({"--device-memory-budget", "17179869184GiB"})).find("2^64"),
            std::string::npos);
}

TEST(Options, BadValuesNameTheFlag) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--offload", "maybe"}, "--offload must be none, auto or sequential, got 'maybe'"},
      {{"--stream-from", "tape"}, "--stream-from must be auto, host or file, got 'tape'"},
      {{"--steps", "0"}, "--steps must be at least 1"},
      {{"--steps", "many"}, "--steps must be an integer"},
      {{"--seed", "-3"}, "--seed must not be negative"},
      {{"--ulysses-degree", "99999999999"}, "--ulysses-degree: 99999999999 is out of range"},
      {{"--guidance-scale", "nan"}, "--guidance-scale must be a finite number"},
      {{"--pp-partition", "3,x"}, "--pp-partition must be compute, memory or a list"},
      {{"--metrics", "--save-latents", "x"}, "--metrics needs a value, got the flag '--save-latents'"},
      {{"--promt", "a cat"}, "unknown option '--promt'; did you mean --prompt?"},
      {{"--prompt-embed", "e"}, "unknown option '--prompt-embed'; did you mean --prompt-embeds?"},
      {{"--step", "3"}, "unknown option '--step'"},
      {{"stray"}, "unexpected argument 'stray'"},
  };
  for (const auto& [extra, expect] : cases)
    EXPECT_NE(errorOf("generate", generateWith(extra)).find(expect), std::string::npos)
        << expect << " <- " << errorOf("generate", generateWith(extra));
  EXPECT_NE(errorOf("encode", {"--model", "m"}).find("--output is required"), std::string::npos);
  EXPECT_NE(errorOf("frobnicate", {}).find("unknown command 'frobnicate'"), std::string::npos);
}

TEST(Options, EnvironmentTyposAreErrors) {
  ::setenv("PARDIT_STEP", "3", 1);
  EXPECT_NE(errorOf("generate", kGenerate)
                .find("PARDIT_STEP is not an option of pardit generate; did you mean "
                      "PARDIT_STEPS (--steps)?"),
            std::string::npos);
  ::unsetenv("PARDIT_STEP");
  ::setenv("PARDIT_STEPS", "4", 1);
  ::setenv("PARDIT_ITERS", "9", 1);  // an option of another command: not this command's business
  EXPECT_EQ(parse("generate", kGenerate).steps, 4);
  EXPECT_EQ(parse("generate", generateWith({"--steps", "2"})).steps, 2);  // the command line wins
  ::setenv("PARDIT_STEPS", "0", 1);
  EXPECT_NE(errorOf("generate", kGenerate).find("environment PARDIT_STEPS: --steps must be at least 1"),
            std::string::npos);
  ::unsetenv("PARDIT_STEPS");
  ::unsetenv("PARDIT_ITERS");
}

// Every option of every command is either checked across ranks or explicitly per rank: the table
// produces both lists, so no option can be left out of the cross-rank check.
TEST(Options, EveryOptionIsSyncedOrExplicitlyLocal) {
  const std::set<std::string> local = {"threads", "log-level", "quiet"};
  for (const auto& [name, text] : config::commands()) {
    config::EngineConfig c =
        parse(name, name == "generate"   ? kGenerate
                    : name == "forward"  ? std::vector<std::string>{"--model", "m", "--inputs", "i", "--output", "o"}
                    : name == "plan"     ? std::vector<std::string>{"--model", "m"}
                    : name == "synth"    ? std::vector<std::string>{"--out", "d"}
                    : name == "encode"   ? std::vector<std::string>{"--model", "m", "--output", "o"}
                    : name == "quantize" ? std::vector<std::string>{"--model", "m", "--out", "d"}
                                         : std::vector<std::string>{});
    std::set<std::string> synced;
    for (const auto& [flag, value] : config::syncedOptions(c)) synced.insert(flag);
    EXPECT_TRUE(synced.count("the command"));
    const std::string help = config::help(c.command);
    for (const auto& [key, value] : config::toMap(c)) {
      if (key == "command") continue;
      EXPECT_TRUE(local.count(key) || synced.count("--" + key)) << name << " --" << key;
      EXPECT_FALSE(local.count(key) && synced.count("--" + key)) << name << " --" << key;
      EXPECT_NE(help.find("--" + key), std::string::npos) << name << " help lacks --" << key;
    }
    EXPECT_NE(help.find("PARDIT_"), std::string::npos);
    EXPECT_NE(help.find("examples:"), std::string::npos);
  }
  // Input files may be node-local copies: only whether they are given must agree.
  const auto generate = parse("generate", kGenerate);
  for (const auto& [flag, value] : config::syncedOptions(generate))
    if (flag == "--model" || flag == "--prompt-embeds") {
      EXPECT_EQ(value, "(given)");
    }
}
