#pragma once
// Typed engine configuration for every subcommand. One source of truth for option names, defaults and
// help texts; values come from the command line, then PARDIT_* environment variables, then an INI file
// given with --config (or PARDIT_CONFIG), then the defaults, in that order of precedence.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace pardit::config {

struct EngineConfig {
  std::string command;

  // Common
  std::string model;             // checkpoint directory or file
  std::string dtype = "auto";    // auto | bf16 | fp16 | fp32
  std::string device = "auto";   // auto | cpu | cuda
  int threads = 0;               // intra-op threads per rank; 0 = the library default
  std::string logLevel = "info"; // debug | info | warn | error
  bool quiet = false;
  std::string configFile;

  // Parallel degrees (forward, generate, bench): world size = cfg x ring x ulysses
  int ulyssesDegree = 1;
  int ringDegree = 1;
  int cfgDegree = 1;
  int pipefusionDegree = 1;
  int numPipelinePatch = 0;         // 0: the PipeFusion degree
  int warmupSteps = 1;
  std::string ppPartition = "compute";

  // Memory
  std::string deviceMemoryBudget = "auto";  // SIZE (24GiB, 12GB, bytes) or auto
  std::string offload = "auto";             // none | auto | sequential
  std::string streamFrom = "auto";          // host | file | auto

  // Metrics (generate, forward, bench)
  std::string metrics;  // HDF5 file to append this run to

  // plan
  int worldSize = 1;
  bool json = false;

  // forward
  std::string inputs;
  std::string output;

  // generate
  std::string promptEmbeds;
  std::string negativePromptEmbeds;
  std::string saveLatents;
  int64_t height = 1024;
  int64_t width = 1024;
  int steps = 28;
  double guidanceScale = 3.5;
  double trueCfgScale = 1.0;
  uint64_t seed = 0;
  std::string schedule = "auto";  // auto | shift | plain

  // synth
  std::string preset = "tiny";
  std::string layout = "diffusers";  // diffusers | bfl
  std::string out;
  std::string fill = "random";       // random | zeros
  int64_t textLen = 0;               // 0: the preset's default
  uint64_t shardSize = 10'000'000'000ULL;
  int64_t depth = -1;                // overrides of the preset's block counts (-1: keep)
  int64_t depthSingle = -1;

  // bench
  int warmup = 2;
  int iters = 5;
  int64_t batch = 1;
  std::string benchOutput;
  bool benchComm = false;          // collective micro-benchmark instead of the model
  uint64_t commMaxBytes = 64ULL << 20;
};

struct ParseResult {
  EngineConfig config;
  bool helpShown = false;  // --help was printed; nothing to run
};

// The subcommands and their one-line descriptions.
const std::vector<std::pair<std::string, std::string>>& commands();
std::string usage();

// The resolved options as key/value text, for provenance.
std::map<std::string, std::string> toMap(const EngineConfig& c);

// Parses the arguments after the subcommand name. Throws pardit::Error with a one-line message naming
// the flag, environment variable or file and what was expected.
ParseResult parseCommandLine(const std::string& command, const std::vector<std::string>& args);

}  // namespace pardit::config
