#pragma once
// Typed engine configuration for every command, and the one option table behind it.
//
// Each option is declared once (src/config/config.cpp): its flag, type, default, help text, help group,
// the commands that take it and how it must agree across the ranks of a job. From that table come the
// command line, PARDIT_* environment and INI parsing, `--help`, the provenance map written to HDF5 and
// the cross-rank consistency check, so no option can be left out of any of them. Values come from the
// command line, then PARDIT_* environment variables, then an INI file given with --config (or
// PARDIT_CONFIG), then the defaults, in that order of precedence. Every value is parsed and checked
// here, at parse time, into the types below.

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace pardit::config {

enum class Command { kGenerate, kForward, kSynth, kBench, kPlan, kEncode, kQuantize };
enum class Dtype { kAuto, kBf16, kFp16, kFp32 };            // auto: bf16 on CUDA, fp32 on the CPU
enum class DeviceKind { kAuto, kCpu, kCuda };
// auto: FP8 when the checkpoint stores FP8 block weights, else the compute dtype; fp8: block weights in FP8
// (quantized while loading when stored otherwise); compute: every weight in the compute dtype.
enum class WeightDtype { kAuto, kFp8, kCompute };
enum class Offload { kNone, kAuto, kSequential };
enum class StreamSource { kAuto, kHost, kFile };
enum class Schedule { kAuto, kShift, kPlain };
enum class LogLevelOption { kDebug, kInfo, kWarn, kError };
enum class SynthLayout { kDiffusers, kBfl };
enum class SynthFill { kRandom, kZeros };
enum class EncoderDevice { kAuto, kCpu };      // auto: the rank's device
enum class VaeTiling { kAuto, kOn, kOff };      // auto: tiled only when the whole decode does not fit
enum class Attention { kAuto, kFlash, kEfficient, kCudnn, kMath };  // the kernel of the transformer's attention

// Names as the command line spells them ("bf16", "sequential", ...).
template <typename E>
std::string enumName(E value);
// The accepted names of an enum, for help texts and errors.
template <typename E>
std::vector<std::string> enumNames();

// --pp-partition: "compute" (equal block counts), "memory" (equal weight bytes) or explicit counts.
struct Partition {
  enum class Mode { kCompute, kMemory, kExplicit } mode = Mode::kCompute;
  std::vector<int64_t> counts;  // kExplicit: blocks per stage
  std::string str() const;
  bool operator==(const Partition& o) const { return mode == o.mode && counts == o.counts; }
};

// --device-memory-budget: "auto" (free device memory minus headroom) or a size; --host-memory-budget too
// (auto: available host memory shared by the node's ranks, minus headroom).
struct MemoryBudget {
  bool automatic = true;
  uint64_t bytes = 0;
  std::string str() const;
};

// "24GiB", "12GB", "1.5GiB", "512MiB", "4096" (bytes). Errors name `flag`; sizes of 2^64 bytes and
// more are refused.
uint64_t parseSize(const std::string& text, const std::string& flag);

struct EngineConfig {
  Command command = Command::kGenerate;

  // General
  std::string model;                   // checkpoint directory or file (empty: bench's --preset)
  std::string vae;                     // VAE (vae/ directory or ae.safetensors); empty: the one beside the model
  VaeTiling vaeTiling = VaeTiling::kAuto;
  int64_t vaeTileSize = 0;             // pixels; 0: the VAE's sample_size, halved until a tile fits
  Dtype dtype = Dtype::kAuto;
  WeightDtype weightDtype = WeightDtype::kAuto;
  DeviceKind device = DeviceKind::kAuto;
  int threads = 0;                     // intra-op threads per rank; 0 = the library default
  LogLevelOption logLevel = LogLevelOption::kInfo;
  bool quiet = false;
  bool strict = false;                 // unexpected checkpoint contents are errors, not warnings
  bool cudaGraphs = false;             // capture the transformer call in a CUDA graph and replay it
  Attention attention = Attention::kAuto;  // the transformer's attention kernel
  bool unfused = false;                // ATen's compositions instead of pardit's fused passes (to measure them)
  std::string configFile;

  // Parallel layout: world size = cfg x pipefusion x ring x ulysses
  int ulyssesDegree = 1;
  int ringDegree = 1;
  int cfgDegree = 1;
  int pipefusionDegree = 1;
  int numPipelinePatch = 0;            // 0: the PipeFusion degree
  int warmupSteps = 1;
  Partition ppPartition;
  double collectiveTimeout = 300;      // seconds a blocking collective may take before the job is aborted; 0: off

  // Memory
  MemoryBudget deviceMemoryBudget;
  MemoryBudget hostMemoryBudget;
  Offload offload = Offload::kAuto;
  StreamSource streamFrom = StreamSource::kAuto;

  // Metrics (generate, forward, bench)
  std::string metrics;                 // HDF5 file to append this run to

  // plan
  int worldSize = 0;                   // 0: the product of the degrees
  bool json = false;

  // forward
  std::string inputs;
  std::string output;                  // forward: the prediction; generate: the PNG image; bench: the JSON report

  // generate, encode: prompts as text, and the text encoders
  std::string prompt;                  // CLIP's prompt (and T5's unless prompt2 is given)
  std::string prompt2;                 // T5's prompt
  std::string negativePrompt;          // true CFG
  std::string promptFile;              // one prompt per line: a batch
  int64_t maxSequenceLength = 0;       // T5 tokens; 0: 512 for guidance-distilled models (dev), 256 otherwise
  std::string textEncoder;             // CLIP: text_encoder/ or clip_l.safetensors (default: the model's)
  std::string textEncoder2;            // T5: text_encoder_2/ or t5xxl_*.safetensors
  std::string tokenizer;               // CLIP tokenizer directory (default: the model's tokenizer/)
  std::string tokenizer2;              // T5 tokenizer directory (default: tokenizer_2/)
  int textEncoderRank = -1;            // the rank that encodes; -1: the one with the most spare memory
  EncoderDevice textEncoderDevice = EncoderDevice::kAuto;

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
  Schedule schedule = Schedule::kAuto;

  // synth
  std::string preset = "tiny";
  SynthLayout layout = SynthLayout::kDiffusers;
  std::string out;
  SynthFill fill = SynthFill::kRandom;
  int64_t textLen = 0;                 // synth: 0 = the preset's default
  uint64_t shardSize = 10'000'000'000ULL;
  int64_t depth = -1;                  // overrides of the preset's block counts (-1: keep)
  int64_t depthSingle = -1;

  // bench
  int warmup = 2;
  int iters = 5;
  int64_t batch = 1;
  bool benchComm = false;              // collective micro-benchmark instead of the model
  bool benchDecode = false;            // the VAE decode instead of the transformer
  bool benchProfile = false;           // one more forward under the operator profiler
  bool benchEncode = false;            // the encode stage instead of the transformer
  uint64_t commMaxBytes = 64ULL << 20;
};

// A config with the defaults of `command` (bench and plan differ from generate in a few sizes).
EngineConfig defaults(Command command);

struct ParseResult {
  EngineConfig config;
  bool helpShown = false;  // --help was printed; nothing to run
};

// The commands and their one-line descriptions.
const std::vector<std::pair<std::string, std::string>>& commands();
std::string commandName(Command command);
std::string usage();
// The grouped help of one command: every option with its default, its PARDIT_* name, and examples.
std::string help(Command command);

// Every option of the command with its value, for provenance (the HDF5 "config" attributes).
std::map<std::string, std::string> toMap(const EngineConfig& c);

// The options whose values must be the same on every rank of a job, in table order: the command, every
// option that changes what runs or which collectives run (degrees, sizes, steps, seed, dtype, memory
// options, metrics, outputs, ...), and for input files that may be node-local copies, only whether they
// are given. Per-rank options (threads, log level, the paths of inputs) are left out.
std::vector<std::pair<std::string, std::string>> syncedOptions(const EngineConfig& c);

// Parses the arguments after the command name. Throws pardit::Error with a one-line message naming the
// flag, environment variable or file and what was expected.
ParseResult parseCommandLine(const std::string& command, const std::vector<std::string>& args);

}  // namespace pardit::config
