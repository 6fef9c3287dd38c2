// Hostile input and hostile conditions, through the pardit executable: concurrent metrics appends keep
// every run, outputs never replace inputs or device nodes, non-finite inputs are refused by name and index,
// ranks given different checkpoints or prompts are refused, and a stopped rank ends the job.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <hdf5.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <limits>
#include <regex>

#include "pardit/io/safetensors.h"
#include "test_util.h"

using namespace pardit;
using pardit::test::runCommand;
using pardit::test::runPardit;
using pardit::test::TempDir;
namespace fs = std::filesystem;

namespace {

std::string mpiexec(int n) { return std::string(PARDIT_MPIEXEC) + " -n " + std::to_string(n) + " --oversubscribe "; }

// A tiny model in dir/name (seeded, so two seeds give two different checkpoints).
std::string synth(const TempDir& dir, const std::string& name, int seed = 0) {
  const std::string out = dir.file(name);
  auto r = runPardit("synth --preset tiny --seed " + std::to_string(seed) + " --out " + out + " -q");
  EXPECT_EQ(r.exitCode, 0) << r.output;
  return out;
}

std::string generate(const std::string& model, const std::string& extra) {
  return "generate --threads 1 --model " + model + " --prompt-embeds " + model +
         "/prompt_embeds.safetensors --height 64 --width 64 --steps 2 -q " + extra;
}

std::string fileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

int64_t runsIn(const std::string& path) {
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f < 0) return -1;
  hid_t g = H5Gopen2(f, "runs", H5P_DEFAULT);
  H5G_info_t info{};
  const herr_t ok = g >= 0 ? H5Gget_info(g, &info) : -1;
  if (g >= 0) H5Gclose(g);
  H5Fclose(f);
  return ok < 0 ? -1 : static_cast<int64_t>(info.nlinks);
}

// Makes a metrics file big (a dataset of `mib` MiB beside the runs), so copying it takes a while.
void pad(const std::string& path, int64_t mib) {
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  const hsize_t n = static_cast<hsize_t>(mib) * 1024 * 1024 / 8;
  std::vector<double> data(n, 1.0);
  hid_t space = H5Screate_simple(1, &n, nullptr);
  hid_t ds = H5Dcreate2(f, "padding", H5T_NATIVE_DOUBLE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data()), 0);
  H5Dclose(ds);
  H5Sclose(space);
  H5Fclose(f);
}

int temporariesIn(const std::string& dir) {
  int n = 0;
  for (const auto& e : fs::directory_iterator(dir)) n += e.path().extension() == ".tmp";
  return n;
}

}  // namespace

TEST(Hardening, ConcurrentMetricsAppendsKeepEveryRun) {
  TempDir dir;
  const std::string model = synth(dir, "m"), metrics = dir.file("runs.h5");
  auto first = runPardit(generate(model, "--metrics " + metrics));
  ASSERT_EQ(first.exitCode, 0) << first.output;
  pad(metrics, 192);  // each append copies ~200 MB: the jobs' appends overlap
  constexpr int kJobs = 8;
  // Each job its own Open MPI session directory: concurrent singletons racing to create the shared one
  // (/tmp/ompi.<host>.<uid>) can fail in MPI_Init, which is Open MPI's start-up and not what is tested here.
  std::string script = "cd " + dir.path().string() + " && for i in $(seq 1 " + std::to_string(kJobs) +
                       "); do (mkdir -p ompi.$i && OMPI_MCA_orte_tmpdir_base=$PWD/ompi.$i " + PARDIT_BINARY + " " +
                       generate(model, "--metrics " + metrics) + "; echo $? > rc.$i) & done; wait; cat rc.*";
  auto r = runCommand(script);
  EXPECT_EQ(r.output.find_first_not_of("0\n"), std::string::npos) << "a job failed:\n" << r.output;
  EXPECT_EQ(runsIn(metrics), 1 + kJobs) << r.output;
  EXPECT_EQ(temporariesIn(dir.path()), 0);
}

TEST(Hardening, OutputsNeverReplaceInputsOrDeviceNodes) {
  TempDir dir;
  const std::string model = synth(dir, "m");
  const std::string weights = model + "/transformer/diffusion_pytorch_model.safetensors";
  const std::string embeds = model + "/prompt_embeds.safetensors";
  const std::string before = fileBytes(weights), embedsBefore = fileBytes(embeds);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--save-latents " + weights, "is an input of this run"},
      {"--save-latents " + embeds, "is an input of this run"},
      {"--metrics " + model + "/transformer/config.json", "is an input of this run"},
      {"--output " + embeds, "is an input of this run"},
      {"--save-latents /dev/full", "exists and is not a regular file"},
      {"--save-latents .", "is a directory"},
      {"--metrics /dev/null", "exists and is not a regular file"}};
  for (const auto& [flags, message] : cases) {
    auto r = runPardit(generate(model, flags));
    EXPECT_NE(r.exitCode, 0) << flags << "\n" << r.output;
    EXPECT_NE(r.output.find(message), std::string::npos) << flags << "\n" << r.output;
    EXPECT_EQ(r.output.find("step 1/"), std::string::npos) << "checked only after the work: " << flags;
  }
  EXPECT_EQ(fileBytes(weights), before);
  EXPECT_EQ(fileBytes(embeds), embedsBefore);
  EXPECT_TRUE(fs::is_character_file("/dev/full") || !fs::exists("/dev/full"));
  EXPECT_EQ(temporariesIn(model), 0);
}

TEST(Hardening, NonFiniteInputsAreRefusedByNameAndIndex) {
  TempDir dir;
  const std::string model = synth(dir, "m");
  auto f = io::SafetensorsFile::open(model + "/prompt_embeds.safetensors");
  at::Tensor pe = f->read("prompt_embeds").clone(), pooled = f->read("pooled_prompt_embeds");
  pe[0][3][5] = std::numeric_limits<float>::quiet_NaN();
  io::writeSafetensors(dir.file("nan.safetensors"), {{"prompt_embeds", pe}, {"pooled_prompt_embeds", pooled}});
  auto r = runPardit("generate --threads 1 --model " + model + " --prompt-embeds " + dir.file("nan.safetensors") +
                     " --height 64 --width 64 --steps 2 --save-latents " + dir.file("x.safetensors"));
  EXPECT_NE(r.exitCode, 0) << r.output;
  EXPECT_NE(r.output.find("tensor 'prompt_embeds' has a non-finite value (nan) at index [0, 3, 5]"), std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(dir.file("x.safetensors")));
  // Finite inputs so large the model overflows: the run stops at the step where the latents went bad.
  pe = f->read("prompt_embeds") * 1e38;
  io::writeSafetensors(dir.file("huge.safetensors"), {{"prompt_embeds", pe}, {"pooled_prompt_embeds", pooled}});
  r = runPardit("generate --threads 1 --dtype bf16 --model " + model + " --prompt-embeds " +
                dir.file("huge.safetensors") + " --height 64 --width 64 --steps 2 --save-latents " +
                dir.file("x.safetensors"));
  EXPECT_NE(r.exitCode, 0) << r.output;
  EXPECT_NE(r.output.find("the latents became non-finite (NaN or Inf) at step 1 of 2"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir.file("x.safetensors")));
  // An empty text sequence is refused too.
  io::writeSafetensors(dir.file("empty.safetensors"),
                       {{"prompt_embeds", at::zeros({1, 0, pe.size(2)})}, {"pooled_prompt_embeds", pooled}});
  r = runPardit("generate --threads 1 --model " + model + " --prompt-embeds " + dir.file("empty.safetensors") +
                " --height 64 --width 64 --steps 2");
  EXPECT_NE(r.exitCode, 0) << r.output;
  EXPECT_NE(r.output.find("dimension 1 is empty"), std::string::npos) << r.output;
}

TEST(Hardening, RanksGivenDifferentCheckpointsOrPromptsAreRefused) {
  TempDir dir;
  const std::string a = synth(dir, "a", 1), b = synth(dir, "b", 2);
  // The same options, another checkpoint on rank 1 (as a node with another copy under the same path).
  const std::string common = " --threads 1 --height 64 --width 64 --steps 2 --ulysses-degree 2 -q --prompt-embeds " +
                             a + "/prompt_embeds.safetensors";
  auto r = runCommand(mpiexec(1) + PARDIT_BINARY + " generate --model " + a + common + " : -n 1 " + PARDIT_BINARY +
                      " generate --model " + b + common);
  EXPECT_NE(r.exitCode, 0) << r.output;
  EXPECT_NE(
      r.output.find("the checkpoint files differ between ranks: --model file diffusion_pytorch_model.safetensors"),
      std::string::npos)
      << r.output;
  // The same checkpoint, other prompt embeddings on rank 1.
  const std::string model = " generate --threads 1 --height 64 --width 64 --steps 2 --ulysses-degree 2 -q --model " + a;
  r = runCommand(mpiexec(1) + PARDIT_BINARY + model + " --prompt-embeds " + a + "/prompt_embeds.safetensors : -n 1 " +
                 PARDIT_BINARY + model + " --prompt-embeds " + b + "/prompt_embeds.safetensors");
  EXPECT_NE(r.exitCode, 0) << r.output;
  EXPECT_NE(r.output.find("the inputs differ between ranks: --prompt-embeds contents"), std::string::npos) << r.output;
}

TEST(Hardening, AStoppedRankEndsTheJobWithinTheCollectiveTimeout) {
  TempDir dir;
  const std::string model = synth(dir, "m"), log = dir.file("log");
  const std::string run = mpiexec(2) + PARDIT_BINARY + " generate --threads 1 --model " + model + " --prompt-embeds " +
                          model +
                          "/prompt_embeds.safetensors --height 128 --width 128 --steps 100000 "
                          "--ulysses-degree 2 --collective-timeout 10";
  // Start the job, wait for its first steps, stop one rank (SIGSTOP: alive but silent), wait for the end.
  const std::string script = "(" + run + " > " + log + " 2>&1; echo rc=$? >> " + log + ") & job=$!; " +
                             "for i in $(seq 1 300); do grep -q 'step 3/' " + log + " && break; sleep 0.2; done; " +
                             "kill -STOP $(pgrep -f '^" + PARDIT_BINARY + " generate.*" + model + "' | tail -n 1); " +
                             "start=$(date +%s); wait $job; echo waited=$(( $(date +%s) - start ))";
  const auto t0 = std::chrono::steady_clock::now();
  auto r = runCommand(script);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string out = fileBytes(log);
  // Which operation (and its sequence number on which communicator), since which step, for how long.
  EXPECT_TRUE(
      std::regex_search(out, std::regex("MPI_[A-Za-z]+ #[0-9]+ on the [a-z ]+ has not completed after "
                                        "[0-9.]+ s \\(started at step [0-9]+/100000; --collective-timeout 10\\)")))
      << out;
  EXPECT_EQ(out.find("rc=0"), std::string::npos) << out;
  EXPECT_LT(seconds, 90) << r.output;  // start-up plus at most ~45 s after the stop
  const auto waited = r.output.find("waited=");
  ASSERT_NE(waited, std::string::npos) << r.output;
  EXPECT_LE(std::stoi(r.output.substr(waited + 7)), 45) << r.output;
  EXPECT_TRUE(runCommand("pgrep -f '^" + std::string(PARDIT_BINARY) + " generate.*" + model + "'").output.empty())
      << "a rank was left behind";
}
