// The request queue's parsing: plain text and JSONL prompt files, seeds, output names, shards, and errors
// that name FILE:LINE:FIELD.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>

#include "pardit/core/error.h"
#include "pardit/pipeline/queue.h"
#include "test_util.h"

using namespace pardit;

namespace {
std::string errorOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.message();
  }
  return "(no error)";
}
}  // namespace

TEST(Queue, PlainTextAndJsonlRequestsWithDefaultsAndSeeds) {
  test::TempDir dir;
  pipeline::GenerateRequest defaults;
  defaults.height = 64;
  defaults.width = 96;
  defaults.steps = 3;
  defaults.seed = 40;
  pipeline::QueueOptions q;
  q.promptFile = dir.file("p.txt");
  q.outputDir = dir.file("out");
  std::ofstream(q.promptFile) << "a cat\n\n  \na dog\r\n";
  auto items = pipeline::readQueue(q, defaults);
  ASSERT_EQ(items.size(), 2u);
  EXPECT_EQ(items[1].request.prompt.texts.at(0), "a dog");
  EXPECT_EQ(items[1].line, 4);
  EXPECT_EQ(items[1].index, 1);
  EXPECT_EQ(items[1].request.seed, 41u);  // --seed + index
  EXPECT_EQ(items[1].file, "00001-41.png");
  EXPECT_EQ(items[1].request.indices, std::vector<int64_t>{1});
  EXPECT_EQ(items[0].request.height, 64);

  q.promptFile = dir.file("p.jsonl");
  q.outputName = "{seed}/{index:03}-{width}x{height}-{steps}.png";
  std::ofstream(q.promptFile)
      << R"({"prompt": "x", "seed": 7, "width": 32, "steps": 5, "negative_prompt": "n", "true_cfg_scale": 2})"
      << "\n"
      << R"({"prompt": "y", "prompt_2": "y2", "guidance_scale": 1.5, "max_sequence_length": 9, "output": "a/b.png"})"
      << "\n";
  items = pipeline::readQueue(q, defaults);
  ASSERT_EQ(items.size(), 2u);
  EXPECT_EQ(items[0].file, "7/000-32x64-5.png");
  EXPECT_EQ(items[0].request.negativePrompt.texts.at(0), "n");
  EXPECT_EQ(items[0].request.trueCfgScale, 2.0);
  EXPECT_EQ(items[1].file, "a/b.png");
  EXPECT_EQ(items[1].request.seed, 41u);
  EXPECT_EQ(items[1].request.prompt.texts2.at(0), "y2");
  EXPECT_EQ(items[1].request.guidanceScale, 1.5);
  EXPECT_EQ(items[1].request.maxSequenceLength, 9);
  EXPECT_EQ(items[1].request.output, dir.file("out") + "/a/b.png");
}

TEST(Queue, ErrorsNameTheFileLineAndField) {
  test::TempDir dir;
  pipeline::QueueOptions q;
  q.promptFile = dir.file("q.jsonl");
  q.outputDir = dir.file("out");
  auto errorFor = [&](const std::string& text) {
    std::ofstream(q.promptFile) << text;
    return errorOf([&] { pipeline::readQueue(q, pipeline::GenerateRequest{}); });
  };
  const std::string f = q.promptFile;
  EXPECT_EQ(errorFor("{\"prompt\": \"a\", \"steps\": 0}\n").rfind(f + ":1:steps: expected an integer >= 1", 0), 0u);
  EXPECT_EQ(errorFor("{\"prompt\": \"a\", \"seed\": -1}\n").rfind(f + ":1:seed: expected an integer", 0), 0u);
  EXPECT_EQ(errorFor("{\"prompt\": \"a\", \"guidance_scale\": \"high\"}\n").rfind(f + ":1:guidance_scale:", 0), 0u);
  EXPECT_EQ(errorFor("{\"prompt\": \"a\"}\n[1, 2]\n").rfind(f + ":2: expected a JSON object", 0), 0u);
  EXPECT_EQ(errorFor("{\"prompt\": \"a\"}\n\n{\"prompt\": 3}\n").rfind(f + ":3:prompt: expected a string", 0), 0u);
  EXPECT_EQ(errorFor("{\"prompt\": \"a\", \"height\": 40}\n").rfind(f + ":1: ", 0), 0u);
  EXPECT_NE(errorFor("\n\n").find("no prompts"), std::string::npos);
  q.outputName = "{index}.png";
  EXPECT_EQ(errorFor("{\"prompt\": \"a\", \"output\": \"1.png\"}\n{\"prompt\": \"b\"}\n"),
            f + ":2: output '1.png' is also the output of line 1");
  EXPECT_NE(errorFor("{\"prompt\": \"a\", \"output\": \"/tmp/x.png\"}\n").find("must be relative"), std::string::npos);
  EXPECT_NE(errorFor("{\"prompt\": \"a\", \"output\": \"x.jpg\"}\n").find("must name a .png"), std::string::npos);
  q.outputDir.clear();
  EXPECT_NE(errorFor("a\n").find("--output-dir"), std::string::npos);
}

TEST(Queue, OutputNamesAndShards) {
  pipeline::GenerateRequest r;
  r.seed = 12;
  r.width = 64;
  EXPECT_EQ(pipeline::formatOutputName("{index:05}-{seed}.png", 3, 5, r), "00003-12.png");
  EXPECT_EQ(pipeline::formatOutputName("l{line}-w{width}.png", 3, 5, r), "l5-w64.png");
  EXPECT_NE(errorOf([&] { pipeline::formatOutputName("{prompt}.png", 0, 1, r); }).find("unknown field {prompt}"),
            std::string::npos);
  EXPECT_NE(errorOf([&] { pipeline::formatOutputName("{index.png", 0, 1, r); }).find("without its '}'"),
            std::string::npos);
  EXPECT_EQ(pipeline::parseShard("2/3"), std::make_pair(2, 3));
  EXPECT_EQ(pipeline::parseShard(""), std::make_pair(0, 1));
  for (const char* bad : {"3/3", "1", "a/b", "-1/2", "1/0", "1/2x"})
    EXPECT_NE(errorOf([&] { pipeline::parseShard(bad); }).find("--shard"), std::string::npos) << bad;
  ::setenv("SLURM_ARRAY_TASK_ID", "7", 1);
  ::setenv("SLURM_ARRAY_TASK_MIN", "5", 1);
  ::setenv("SLURM_ARRAY_TASK_COUNT", "4", 1);
  EXPECT_EQ(pipeline::parseShard("auto"), std::make_pair(2, 4));
  ::unsetenv("SLURM_ARRAY_TASK_ID");
  ::unsetenv("SLURM_ARRAY_TASK_MIN");
  ::unsetenv("SLURM_ARRAY_TASK_COUNT");
  EXPECT_EQ(pipeline::parseShard("auto"), std::make_pair(0, 1));
}
