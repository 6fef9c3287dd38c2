// `pardit generate --prompt-file`: a queue of requests served by engines loaded once. Its images equal
// separate `pardit generate` runs (one rank, data-parallel groups, groups with Ulysses); a job stopped by
// SIGTERM continues where it stopped without touching what it made; shards cover every line once.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "pardit/io/png.h"
#include "test_util.h"

using namespace pardit;
using pardit::test::fixture;
using pardit::test::runPardit;
using pardit::test::TempDir;
namespace fs = std::filesystem;

namespace {

test::CommandResult mpirun(int n, const std::string& args) {
  return test::runCommand(std::string(PARDIT_MPIEXEC) + " -n " + std::to_string(n) + " --oversubscribe " +
                          PARDIT_BINARY + " " + args);
}

// 12 requests on the tiny pipeline: sizes, seeds, step counts and negative prompts with true CFG mixed;
// two lines without a seed (--seed + index), one with its own output name.
const char* kQueue =
    R"({"prompt": "a cat on the moon", "seed": 1, "width": 64, "height": 64, "steps": 2}
{"prompt": "a dog in the rain", "seed": 2, "width": 96, "height": 64, "steps": 3}

{"prompt": "a red fox", "seed": 3, "width": 64, "height": 96, "steps": 2, "negative_prompt": "blurry", "true_cfg_scale": 2.5}
{"prompt": "an old lighthouse", "width": 64, "height": 64, "steps": 1}
{"prompt": "a bowl of fruit", "seed": 5, "width": 32, "height": 64, "steps": 2, "guidance_scale": 5.0}
{"prompt": "a mountain lake", "seed": 6, "width": 64, "height": 32, "steps": 3, "negative_prompt": "fog", "true_cfg_scale": 1.5}
{"prompt": "a city at night", "seed": 7, "width": 96, "height": 96, "steps": 2}
{"prompt": "a sailing ship", "seed": 8, "width": 64, "height": 64, "steps": 2, "prompt_2": "a tall ship at sea"}
{"prompt": "a snowy forest", "width": 32, "height": 32, "steps": 2, "output": "named/forest.png"}
{"prompt": "a robot", "seed": 10, "width": 64, "height": 64, "steps": 1, "max_sequence_length": 6}
{"prompt": "a desert road", "seed": 11, "width": 48, "height": 64, "steps": 2}
{"prompt": "a garden", "seed": 12, "width": 64, "height": 48, "steps": 2, "negative_prompt": "weeds", "true_cfg_scale": 2.0}
)";

std::string model() { return "--threads 1 --model " + fixture("flux_tiny_pipeline") + " "; }
std::string common() { return model() + "--max-sequence-length 8 "; }

// Every line as its own `pardit generate` command line.
std::vector<std::pair<std::string, std::string>> separateRuns(const std::string& dir) {
  std::vector<std::pair<std::string, std::string>> out;
  std::istringstream in(kQueue);
  int64_t index = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    const auto j = nlohmann::json::parse(line);
    const uint64_t seed = j.contains("seed") ? j["seed"].get<uint64_t>() : 100 + static_cast<uint64_t>(index);
    std::string args = model() + "--prompt '" + j["prompt"].get<std::string>() + "' --seed " + std::to_string(seed) +
                       " --width " + std::to_string(j["width"].get<int>()) + " --height " +
                       std::to_string(j["height"].get<int>()) + " --steps " + std::to_string(j["steps"].get<int>());
    if (j.contains("negative_prompt"))
      args += " --negative-prompt '" + j["negative_prompt"].get<std::string>() + "' --true-cfg-scale " +
              std::to_string(j["true_cfg_scale"].get<double>());
    if (j.contains("guidance_scale")) args += " --guidance-scale " + std::to_string(j["guidance_scale"].get<double>());
    if (j.contains("prompt_2")) args += " --prompt-2 '" + j["prompt_2"].get<std::string>() + "'";
    args += " --max-sequence-length " + std::to_string(j.value("max_sequence_length", 8));
    char name[64];
    std::snprintf(name, sizeof(name), "%05lld-%llu.png", static_cast<long long>(index),
                  static_cast<unsigned long long>(seed));
    const std::string file = j.contains("output") ? j["output"].get<std::string>() : std::string(name);
    out.emplace_back(file, args + " --output " + dir + "/" + fs::path(file).filename().string());
    ++index;
  }
  return out;
}

std::vector<nlohmann::json> manifest(const std::string& dir) {
  std::vector<nlohmann::json> lines;
  std::ifstream in(dir + "/manifest.jsonl");
  for (std::string l; std::getline(in, l);) lines.push_back(nlohmann::json::parse(l));
  return lines;
}

// Largest difference of two PNGs' pixels (8-bit levels).
int maxPixelDiff(const std::string& a, const std::string& b) {
  const at::Tensor x = io::readPng(a).pixels.to(at::kInt), y = io::readPng(b).pixels.to(at::kInt);
  if (!x.sizes().equals(y.sizes())) return 256;
  return (x - y).abs().max().item<int>();
}

}  // namespace

TEST(Queue, ImagesEqualSeparateRunsOnOneRankAndInDataParallelGroups) {
  TempDir dir;
  std::ofstream(dir.file("queue.jsonl")) << kQueue;
  fs::create_directories(dir.file("ref"));
  const auto runs = separateRuns(dir.file("ref"));
  ASSERT_EQ(runs.size(), 12u);
  for (const auto& [file, args] : runs) {
    auto r = runPardit("generate " + args);
    ASSERT_EQ(r.exitCode, 0) << args << "\n" << r.output;
  }
  const std::string queue = "generate " + common() + "--prompt-file " + dir.file("queue.jsonl") + " --seed 100 ";
  struct Layout {
    int ranks;
    std::string flags;
    int tolerance;  // 8-bit levels: 0 where the layout is bit for bit the single rank
  };
  // --batch-size: the same images within one level (a batched GEMM rounds some values otherwise).
  for (const Layout& l :
       {Layout{1, "", 0}, Layout{2, "--data-parallel-degree 2", 0},
        Layout{4, "--data-parallel-degree 2 --ulysses-degree 2", 1}, Layout{1, "--batch-size 3", 1}}) {
    const std::string out =
        dir.file("out" + std::to_string(l.ranks) + (l.flags.find("batch") != std::string::npos ? "b" : ""));
    auto r = l.ranks == 1 ? runPardit(queue + "--output-dir " + out + " " + l.flags)
                          : mpirun(l.ranks, queue + "--output-dir " + out + " " + l.flags);
    ASSERT_EQ(r.exitCode, 0) << l.flags << "\n" << r.output;
    // The text encoders fit beside the tiny transformer: loaded by the first request, reused by the others.
    if (l.ranks == 1) {
      EXPECT_NE(r.output.find("loaded by an earlier request"), std::string::npos) << r.output;
    }
    int worst = 0;
    for (const auto& [file, args] : runs) {
      const std::string ref = dir.file("ref/" + fs::path(file).filename().string());
      ASSERT_TRUE(fs::exists(out + "/" + file)) << file << "\n" << r.output;
      worst = std::max(worst, maxPixelDiff(out + "/" + file, ref));
    }
    std::printf("[queue] -n %d %s: 12 images, largest pixel difference to separate runs %d\n", l.ranks, l.flags.c_str(),
                worst);
    EXPECT_LE(worst, l.tolerance) << l.flags;
    const auto lines = manifest(out);
    EXPECT_EQ(lines.size(), 12u);
    std::set<int64_t> indices, groups;
    size_t batched = 0;
    for (const auto& j : lines) {
      batched += j["batch"].get<int>() > 1;
      indices.insert(j["index"].get<int64_t>());
      groups.insert(j["group"].get<int64_t>());
      EXPECT_TRUE(fs::exists(out + "/" + j["file"].get<std::string>()));
    }
    EXPECT_EQ(indices.size(), 12u);
    EXPECT_EQ(groups.size(), l.flags.find("data-parallel") == std::string::npos ? 1u : 2u) << "both groups made images";
    if (l.flags.find("--batch-size") != std::string::npos) {
      EXPECT_GE(batched, 2u) << "requests of one shape shared a transformer call";
      // A batched image carries its own request's parameters: the same queue unbatched finds them all made.
      auto again = runPardit(queue + "--output-dir " + out);
      ASSERT_EQ(again.exitCode, 0) << again.output;
      EXPECT_NE(again.output.find("12 of 12 requests already made"), std::string::npos) << again.output;
    } else {
      EXPECT_EQ(batched, 0u);
    }
    // Each PNG says which line it is.
    const auto text = io::readPng(out + "/named/forest.png").text;
    EXPECT_NE(text.at(0).second.find("Index: 8"), std::string::npos) << text.at(0).second;
  }
}

TEST(Queue, StoppedBySigtermThenResumedWithoutTouchingWhatWasMade) {
  TempDir dir;
  std::ofstream(dir.file("queue.jsonl")) << kQueue;
  const std::string out = dir.file("out");
  const std::string cmd = std::string(PARDIT_BINARY) + " generate " + common() + "--prompt-file " +
                          dir.file("queue.jsonl") + " --seed 100 --output-dir " + out;
  // Started in the background; SIGTERM once the manifest has three lines.
  const std::string pidFile = dir.file("pid");
  const std::string logFile = dir.file("log");
  ASSERT_EQ(
      std::system(
          ("(" + cmd + " > " + logFile + " 2>&1; echo $? > " + dir.file("rc") + ") & echo $! > " + pidFile).c_str()),
      0);
  const auto start = std::chrono::steady_clock::now();
  while (manifest(out).size() < 3 && std::chrono::steady_clock::now() - start < std::chrono::seconds(120))
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_GE(manifest(out).size(), 3u);
  // The subshell's child is pardit: signal it.
  std::ifstream pidIn(pidFile);
  int subshell = 0;
  pidIn >> subshell;
  ASSERT_EQ(std::system(("pkill -TERM -P " + std::to_string(subshell)).c_str()), 0);
  while (!fs::exists(dir.file("rc")) && std::chrono::steady_clock::now() - start < std::chrono::seconds(180))
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::ifstream rcIn(dir.file("rc"));
  int rc = -1;
  rcIn >> rc;
  std::ifstream logIn(logFile);
  const std::string log((std::istreambuf_iterator<char>(logIn)), std::istreambuf_iterator<char>());
  EXPECT_EQ(rc, 75) << log;
  EXPECT_NE(log.find("run the same command again"), std::string::npos) << log;
  const auto first = manifest(out);
  ASSERT_GE(first.size(), 3u);
  ASSERT_LT(first.size(), 12u) << "stopped before the end";
  // Nothing half-written: every PNG there is in the manifest, and no temporary is left.
  std::map<std::string, std::pair<ino_t, int64_t>> made;
  for (const auto& e : fs::recursive_directory_iterator(out)) {
    if (!e.is_regular_file()) continue;
    const std::string name = e.path().filename().string();
    EXPECT_EQ(name.find(".tmp"), std::string::npos) << name;
    if (e.path().extension() != ".png") continue;
    struct stat st {};
    ASSERT_EQ(::stat(e.path().c_str(), &st), 0);
    made[fs::relative(e.path(), out).string()] = {
        st.st_ino, static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
  }
  EXPECT_EQ(made.size(), first.size());
  // The same command again: the rest, and the first images untouched.
  auto again = test::runCommand(cmd);
  ASSERT_EQ(again.exitCode, 0) << again.output;
  EXPECT_NE(again.output.find(std::to_string(first.size()) + " of 12 requests already made"), std::string::npos)
      << again.output;
  for (const auto& [file, id] : made) {
    struct stat st {};
    ASSERT_EQ(::stat((out + "/" + file).c_str(), &st), 0);
    EXPECT_EQ(st.st_ino, id.first) << file;
    EXPECT_EQ(static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec, id.second) << file;
  }
  const auto lines = manifest(out);
  std::set<int64_t> indices;
  for (const auto& j : lines) indices.insert(j["index"].get<int64_t>());
  EXPECT_EQ(lines.size(), 12u);
  EXPECT_EQ(indices.size(), 12u) << "no duplicates";
  // A third time: nothing to do.
  auto third = test::runCommand(cmd);
  ASSERT_EQ(third.exitCode, 0) << third.output;
  EXPECT_NE(third.output.find("0 images made, 12 already there"), std::string::npos) << third.output;
  EXPECT_EQ(manifest(out).size(), 12u);
  // Another request under a name that exists: an error naming the line, before anything loads.
  std::ofstream(dir.file("other.jsonl")) << R"({"prompt": "something else", "seed": 1, "output": "00000-1.png"})"
                                         << "\n";
  auto clash = test::runCommand(std::string(PARDIT_BINARY) + " generate " + common() + "--prompt-file " +
                                dir.file("other.jsonl") + " --output-dir " + out);
  EXPECT_NE(clash.exitCode, 0);
  EXPECT_NE(clash.output.find("other.jsonl:1: output"), std::string::npos) << clash.output;
  EXPECT_NE(clash.output.find("--overwrite"), std::string::npos) << clash.output;
  EXPECT_EQ(clash.output.find("loaded"), std::string::npos) << clash.output;
}

// Under a budget that leaves no room beside the transformer, the encoders are loaded for each request.
TEST(Queue, TextEncodersAreReleasedWhenTheyDoNotFitBesideTheTransformer) {
  TempDir dir;
  std::ofstream(dir.file("q.txt")) << "a cat\na dog\n";
  const std::string base = "generate " + common() + "--prompt-file " + dir.file("q.txt") +
                           " --height 64 --width 64 --steps 1 --device-memory-budget ";
  auto tight = runPardit(base + "34MiB --output-dir " + dir.file("tight"));
  ASSERT_EQ(tight.exitCode, 0) << tight.output;
  EXPECT_EQ(tight.output.find("kept loaded"), std::string::npos) << tight.output;
  auto roomy = runPardit(base + "1GiB --output-dir " + dir.file("roomy"));
  ASSERT_EQ(roomy.exitCode, 0) << roomy.output;
  EXPECT_NE(roomy.output.find("loaded by an earlier request"), std::string::npos) << roomy.output;
  for (const char* f : {"00000-0.png", "00001-1.png"})
    EXPECT_TRUE(at::equal(io::readPng(dir.file(std::string("tight/") + f)).pixels,
                          io::readPng(dir.file(std::string("roomy/") + f)).pixels))
        << f;
}

TEST(Queue, ShardsCoverEveryLineOnce) {
  TempDir dir;
  std::ofstream(dir.file("queue.jsonl")) << kQueue;
  const std::string out = dir.file("out");
  for (int i = 0; i < 3; ++i) {
    auto r = runPardit("generate " + common() + "--prompt-file " + dir.file("queue.jsonl") + " --seed 100 --shard " +
                       std::to_string(i) + "/3 --output-dir " + out);
    ASSERT_EQ(r.exitCode, 0) << r.output;
    EXPECT_NE(r.output.find("shard " + std::to_string(i) + "/3: 4 of the file's 12"), std::string::npos) << r.output;
  }
  std::map<int64_t, int> seen;
  for (const auto& j : manifest(out)) ++seen[j["index"].get<int64_t>()];
  EXPECT_EQ(seen.size(), 12u);
  for (const auto& [index, count] : seen) EXPECT_EQ(count, 1) << index;
  // --shard auto takes a Slurm array task's share.
  auto r = test::runCommand("SLURM_ARRAY_TASK_ID=5 SLURM_ARRAY_TASK_MIN=4 SLURM_ARRAY_TASK_COUNT=3 " +
                            std::string(PARDIT_BINARY) + " generate " + common() + "--prompt-file " +
                            dir.file("queue.jsonl") + " --seed 100 --shard auto --output-dir " + out);
  ASSERT_EQ(r.exitCode, 0) << r.output;
  EXPECT_NE(r.output.find("0 images made, 4 already there (shard auto: 4 of the file's 12)"), std::string::npos)
      << r.output;
}

TEST(Queue, BadQueuesEndEveryRankBeforeLoading) {
  TempDir dir;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"prompt\": \"a\"}\n{\"prompt\": \"b\", \"seed\": \"x\"}\n", "q.jsonl:2:seed: expected an integer"},
      {"{\"prompt\": \"a\"}\n{\"prompt\": \"b\"\n", "q.jsonl:2: not valid JSON"},
      {"{\"prompt\": \"a\", \"size\": 3}\n", "q.jsonl:1:size: unknown field"},
      {"{\"prompt\": \"a\", \"width\": 50}\n", "q.jsonl:1: "},
      {"{\"seed\": 3}\n", "q.jsonl:1:prompt: missing"},
      {"{\"prompt\": \"a\", \"output\": \"x.png\"}\n{\"prompt\": \"b\", \"output\": \"x.png\"}\n",
       "q.jsonl:2: output 'x.png' is also the output of line 1"},
      {"{\"prompt\": \"a\", \"true_cfg_scale\": 2}\n", "q.jsonl:1: true_cfg_scale 2 needs a negative_prompt"},
      {"{\"prompt\": \"a\", \"output\": \"../x.png\"}\n", "leaves --output-dir"},
      {"{\"prompt\": \"a\", \"width\": 4096, \"height\": 4096}\n{\"prompt\": \"b\"}\n", "budget"},
  };
  for (const auto& [text, expected] : cases) {
    std::ofstream(dir.file("q.jsonl")) << text;
    auto r = mpirun(2, "generate " + common() + "--device-memory-budget 200MiB --prompt-file " + dir.file("q.jsonl") +
                           " --data-parallel-degree 2 --output-dir " + dir.file("out"));
    EXPECT_NE(r.exitCode, 0) << text;
    EXPECT_NE(r.output.find(expected), std::string::npos) << text << "\n" << r.output;
    EXPECT_EQ(r.output.find("step 1/"), std::string::npos) << "nothing may run: " << r.output;
  }
  // An output directory that cannot be written, and a world size the degrees do not make.
  auto r = runPardit("generate " + common() + "--prompt-file " + dir.file("q.jsonl") + " --output-dir /proc/pardit-q");
  EXPECT_NE(r.exitCode, 0);
  EXPECT_NE(r.output.find("--output-dir /proc/pardit-q"), std::string::npos) << r.output;
  std::ofstream(dir.file("q.jsonl")) << "a cat\n";
  r = mpirun(2, "generate " + common() + "--prompt-file " + dir.file("q.jsonl") + " --output-dir " + dir.file("out") +
                    " --data-parallel-degree 2 --ulysses-degree 2");
  EXPECT_NE(r.exitCode, 0);
  EXPECT_NE(r.output.find("needs 4"), std::string::npos) << r.output;
}
