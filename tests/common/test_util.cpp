#include "test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <random>

namespace pardit::test {

TempDir::TempDir() {
  std::random_device rd;
  path_ = std::filesystem::temp_directory_path() /
          ("pardit-test-" + std::to_string(::getpid()) + "-" + std::to_string(rd()));
  std::filesystem::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

model::FluxInputs inputsOn(const model::FluxInputs& in, const c10::Device& device) {
  auto to = [&](const at::Tensor& t) { return t.defined() ? t.to(device) : t; };
  return {to(in.img), to(in.txt), to(in.pooled), to(in.timestep), to(in.guidance), to(in.imgIds), to(in.txtIds)};
}

model::FluxInputs fixtureInputs(const io::SafetensorsFile& f, at::ScalarType dtype) {
  model::FluxInputs in;
  in.img = f.read("hidden_states").to(dtype);
  in.txt = f.read("encoder_hidden_states").to(dtype);
  in.pooled = f.read("pooled_projections").to(dtype);
  in.timestep = f.read("timestep");
  if (f.contains("guidance")) in.guidance = f.read("guidance");
  in.imgIds = f.read("img_ids");
  in.txtIds = f.read("txt_ids");
  return in;
}

memory::RankWorkload wholeModel(const model::FluxConfig& c, c10::ScalarType dtype, int64_t imageTokens,
                                int64_t textTokens, model::WeightFormat format) {
  memory::RankWorkload w;
  w.config = c;
  w.dtype = dtype;
  w.weightFormat = format;
  for (const auto& g : model::fluxWeightGroups(c)) w.groups.push_back(g.name);
  w.imageTokens = imageTokens;
  w.textTokens = textTokens;
  return w;
}

double maxRelError(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  return (x - y).abs().max().item<double>() / y.abs().max().item<double>();
}

CommandResult runPardit(const std::string& args) {
  const char* binary = std::getenv("PARDIT_BINARY");  // the test binary run from a bundle (bench/gpu_check.sh)
  return runCommand(std::string(binary && *binary ? binary : PARDIT_BINARY) + " " + args);
}

CommandResult runCommand(const std::string& commandLine) {
  CommandResult r;
  const std::string cmd = commandLine + " 2>&1";
  FILE* pipe = ::popen(cmd.c_str(), "r");
  if (!pipe) return r;
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0) r.output.append(buf.data(), n);
  const int status = ::pclose(pipe);
  r.exitCode = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

}  // namespace pardit::test
