#include "config/config.h"

#include <boost/program_options.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <tuple>

#include "pardit/core/error.h"
#include "pardit/core/files.h"

extern char** environ;

namespace po = boost::program_options;

namespace pardit::config {

// ---- enums ---------------------------------------------------------------------------------------------

namespace {
// The names of each enum's values, in declaration order (the values count up from 0).
template <typename E>
const std::vector<const char*>& namesOf();
// clang-format off
template <> const std::vector<const char*>& namesOf<Command>() { static const std::vector<const char*> n{"generate", "forward", "synth", "bench", "plan", "encode", "quantize"}; return n; }
template <> const std::vector<const char*>& namesOf<Dtype>() { static const std::vector<const char*> n{"auto", "bf16", "fp16", "fp32"}; return n; }
template <> const std::vector<const char*>& namesOf<WeightDtype>() { static const std::vector<const char*> n{"auto", "fp8", "compute"}; return n; }
template <> const std::vector<const char*>& namesOf<DeviceKind>() { static const std::vector<const char*> n{"auto", "cpu", "cuda"}; return n; }
template <> const std::vector<const char*>& namesOf<Offload>() { static const std::vector<const char*> n{"none", "auto", "sequential"}; return n; }
template <> const std::vector<const char*>& namesOf<StreamSource>() { static const std::vector<const char*> n{"auto", "host", "file"}; return n; }
template <> const std::vector<const char*>& namesOf<Schedule>() { static const std::vector<const char*> n{"auto", "shift", "plain"}; return n; }
template <> const std::vector<const char*>& namesOf<LogLevelOption>() { static const std::vector<const char*> n{"debug", "info", "warn", "error"}; return n; }
template <> const std::vector<const char*>& namesOf<SynthLayout>() { static const std::vector<const char*> n{"diffusers", "bfl"}; return n; }
template <> const std::vector<const char*>& namesOf<SynthFill>() { static const std::vector<const char*> n{"random", "zeros"}; return n; }
template <> const std::vector<const char*>& namesOf<EncoderDevice>() { static const std::vector<const char*> n{"auto", "cpu"}; return n; }
template <> const std::vector<const char*>& namesOf<VaeTiling>() { static const std::vector<const char*> n{"auto", "on", "off"}; return n; }
template <> const std::vector<const char*>& namesOf<Attention>() { static const std::vector<const char*> n{"auto", "flash", "efficient", "cudnn", "math"}; return n; }
// clang-format on

std::string joinOr(const std::vector<std::string>& names) {
  std::string s;
  for (size_t i = 0; i < names.size(); ++i) s += (i == 0 ? "" : i + 1 == names.size() ? " or " : ", ") + names[i];
  return s;
}

template <typename E>
E enumFromString(const std::string& text, const std::string& flag) {
  const auto& names = namesOf<E>();
  for (size_t i = 0; i < names.size(); ++i)
    if (text == names[i]) return static_cast<E>(i);
  PARDIT_THROW(flag, " must be ", joinOr(enumNames<E>()), ", got '", text, "'");
}
}  // namespace

template <typename E>
std::string enumName(E value) {
  const auto i = static_cast<size_t>(value);
  return i < namesOf<E>().size() ? namesOf<E>()[i] : "?";
}

template <typename E>
std::vector<std::string> enumNames() {
  return std::vector<std::string>(namesOf<E>().begin(), namesOf<E>().end());
}

#define PARDIT_ENUM_INSTANTIATE(E)     \
  template std::string enumName<E>(E); \
  template std::vector<std::string> enumNames<E>();
PARDIT_ENUM_INSTANTIATE(Command)
PARDIT_ENUM_INSTANTIATE(Dtype)
PARDIT_ENUM_INSTANTIATE(WeightDtype)
PARDIT_ENUM_INSTANTIATE(DeviceKind)
PARDIT_ENUM_INSTANTIATE(Offload)
PARDIT_ENUM_INSTANTIATE(StreamSource)
PARDIT_ENUM_INSTANTIATE(Schedule)
PARDIT_ENUM_INSTANTIATE(LogLevelOption)
PARDIT_ENUM_INSTANTIATE(SynthLayout)
PARDIT_ENUM_INSTANTIATE(SynthFill)
PARDIT_ENUM_INSTANTIATE(EncoderDevice)
PARDIT_ENUM_INSTANTIATE(VaeTiling)
PARDIT_ENUM_INSTANTIATE(Attention)
#undef PARDIT_ENUM_INSTANTIATE

std::string commandName(Command command) { return enumName(command); }

// ---- composite values ------------------------------------------------------------------------------

uint64_t parseSize(const std::string& text, const std::string& flag) {
  size_t pos = 0;
  double value = 0;
  try {
    value = std::stod(text, &pos);
  } catch (const std::exception&) {
    PARDIT_THROW(flag, " must be a size like 24GiB, 12GB, 512MiB or a byte count, got '", text, "'");
  }
  std::string unit = text.substr(pos);
  for (auto& ch : unit) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  static const std::map<std::string, double> kUnits = {{"", 1.0},
                                                       {"b", 1.0},
                                                       {"kb", 1e3},
                                                       {"mb", 1e6},
                                                       {"gb", 1e9},
                                                       {"tb", 1e12},
                                                       {"kib", 1024.0},
                                                       {"mib", 1024.0 * 1024},
                                                       {"gib", 1024.0 * 1024 * 1024},
                                                       {"tib", 1024.0 * 1024 * 1024 * 1024}};
  auto it = kUnits.find(unit);
  PARDIT_CHECK(it != kUnits.end(), flag, ": unknown unit '", text.substr(pos), "' in '", text,
               "' (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)");
  const double bytes = value * it->second;
  PARDIT_CHECK(std::isfinite(bytes) && bytes >= 1, flag, " must be a positive size, got '", text, "'");
  PARDIT_CHECK(bytes < 18446744073709551615.0, flag, ": '", text, "' is more than 2^64 bytes");
  return static_cast<uint64_t>(bytes);
}

// ---- the option table ------------------------------------------------------------------------------

namespace {

enum class Group { kModel, kText, kParallel, kMemory, kSampling, kOutput, kMetrics, kSynth, kPlan, kBench };
const char* groupTitle(Group g) {
  switch (g) {
    case Group::kModel:
      return "model and device";
    case Group::kText:
      return "prompts and text encoders";
    case Group::kParallel:
      return "parallel layout (world size = data-parallel x cfg x pipefusion x ring x ulysses)";
    case Group::kMemory:
      return "memory";
    case Group::kSampling:
      return "sampling";
    case Group::kOutput:
      return "inputs and outputs";
    case Group::kMetrics:
      return "metrics";
    case Group::kSynth:
      return "synthetic model";
    case Group::kPlan:
      return "plan";
    case Group::kBench:
      return "benchmark";
  }
  return "";
}

// How an option must agree across the ranks of a job.
enum class Sync {
  kValue,     // the same value everywhere (it changes what runs, or which collectives run)
  kPresence,  // given everywhere or nowhere (input files: node-local copies may have other paths)
  kLocal,     // per rank (threads, logging)
};

unsigned bit(Command c) { return 1u << static_cast<unsigned>(c); }
const unsigned kModelCommands = bit(Command::kGenerate) | bit(Command::kForward) | bit(Command::kBench) |
                                bit(Command::kPlan) | bit(Command::kEncode);
const unsigned kRunCommands =
    bit(Command::kGenerate) | bit(Command::kForward) | bit(Command::kBench) | bit(Command::kEncode);
const unsigned kAll = kModelCommands | bit(Command::kSynth);
// Options every command takes (logging, threads).
const unsigned kEvery = kAll | bit(Command::kQuantize);

struct Option {
  std::string name;
  char shortName = 0;
  Group group = Group::kModel;
  Sync sync = Sync::kValue;
  unsigned commands = 0;
  unsigned requiredBy = 0;
  bool isSwitch = false;
  std::string placeholder;
  std::string help;
  std::function<void(EngineConfig&, const std::string& text)> set;  // parses and checks `text`
  std::function<std::string(const EngineConfig&)> get;
};

// Value parsing, with errors that name the flag.
template <typename T>
T parseInteger(const std::string& text, const std::string& flag) {
  static_assert(std::is_integral_v<T>);
  size_t used = 0;
  long double v = 0;
  try {
    v = std::stold(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  PARDIT_CHECK(used == text.size() && !text.empty() && v == std::floor(v), flag, " must be an integer, got '", text,
               "'");
  PARDIT_CHECK(v >= static_cast<long double>(std::numeric_limits<T>::min()) &&
                   v <= static_cast<long double>(std::numeric_limits<T>::max()),
               flag, ": ", text, " is out of range");
  return static_cast<T>(v);
}

void parseInto(int& out, const std::string& t, const std::string& f) { out = parseInteger<int>(t, f); }
void parseInto(int64_t& out, const std::string& t, const std::string& f) { out = parseInteger<int64_t>(t, f); }
void parseInto(uint64_t& out, const std::string& t, const std::string& f) {
  PARDIT_CHECK(t.empty() || t[0] != '-', f, " must not be negative, got '", t, "'");
  out = parseInteger<uint64_t>(t, f);
}
void parseInto(double& out, const std::string& t, const std::string& f) {
  size_t used = 0;
  try {
    out = std::stod(t, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  PARDIT_CHECK(used == t.size() && !t.empty() && std::isfinite(out), f, " must be a finite number, got '", t, "'");
}
void parseInto(std::string& out, const std::string& t, const std::string&) { out = t; }
template <typename E, typename = std::enable_if_t<std::is_enum_v<E>>>
void parseInto(E& out, const std::string& t, const std::string& f) {
  out = enumFromString<E>(t, f);
}
void parseInto(Partition& out, const std::string& t, const std::string& f) {
  out = Partition{};
  if (t == "compute") return;
  if (t == "memory") {
    out.mode = Partition::Mode::kMemory;
    return;
  }
  out.mode = Partition::Mode::kExplicit;
  std::stringstream ss(t);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      out.counts.push_back(parseInteger<int64_t>(item, f));
    } catch (const Error&) {
      PARDIT_THROW(f, " must be compute, memory or a list of block counts like 10,10,9,9; got '", t, "'");
    }
    PARDIT_CHECK(out.counts.back() >= 1, f, ": every stage needs at least one block, got '", t, "'");
  }
  PARDIT_CHECK(!out.counts.empty(), f, " must be compute, memory or a list of block counts; got '", t, "'");
}
void parseInto(MemoryBudget& out, const std::string& t, const std::string& f) {
  out = MemoryBudget{};
  if (t == "auto") return;
  out.automatic = false;
  out.bytes = parseSize(t, f);
}

std::string format(int v) { return std::to_string(v); }
std::string format(int64_t v) { return std::to_string(v); }
std::string format(uint64_t v) { return std::to_string(v); }
std::string format(bool v) { return v ? "true" : "false"; }
std::string format(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}
std::string format(const std::string& v) { return v; }
std::string format(const Partition& v) {
  if (v.mode == Partition::Mode::kCompute) return "compute";
  if (v.mode == Partition::Mode::kMemory) return "memory";
  std::string s;
  for (size_t i = 0; i < v.counts.size(); ++i) s += (i ? "," : "") + std::to_string(v.counts[i]);
  return s;
}
std::string format(const MemoryBudget& v) { return v.automatic ? "auto" : std::to_string(v.bytes); }
template <typename E, typename = std::enable_if_t<std::is_enum_v<E>>>
std::string format(E v) {
  return enumName(v);
}

// Checks of single values (relations between options are checked where they are used).
template <typename T>
std::function<void(const T&, const std::string&)> atLeast(T low) {
  return [low](const T& v, const std::string& flag) {
    PARDIT_CHECK(v >= low, flag, " must be at least ", low, ", got ", v);
  };
}

// The fields every option has.
Option described(const char* name, Group group, Sync sync, unsigned commands, const char* help) {
  Option o;
  o.name = name;
  o.group = group;
  o.sync = sync;
  o.commands = commands;
  o.help = help;
  return o;
}

template <typename T, typename C>
Option opt(const char* name, T C::*member, Group group, Sync sync, unsigned commands, const char* placeholder,
           const char* help, std::function<void(const T&, const std::string&)> check = {}) {
  Option o = described(name, group, sync, commands, help);
  o.placeholder = placeholder;
  const std::string flag = std::string("--") + name;
  o.set = [member, flag, check](EngineConfig& c, const std::string& text) {
    // A flag given without its value must not swallow the next flag.
    PARDIT_CHECK(text.rfind("--", 0) != 0, flag, " needs a value, got the flag '", text, "'");
    T v{};
    parseInto(v, text, flag);
    if (check) check(v, flag);
    c.*member = v;
  };
  o.get = [member](const EngineConfig& c) { return format(c.*member); };
  return o;
}

template <typename C>
Option flagOpt(const char* name, char shortName, bool C::*member, Group group, Sync sync, unsigned commands,
               const char* help) {
  Option o = described(name, group, sync, commands, help);
  o.shortName = shortName;
  o.isSwitch = true;
  o.set = [member](EngineConfig& c, const std::string&) { c.*member = true; };
  o.get = [member](const EngineConfig& c) { return format(c.*member); };
  return o;
}

void required(Option o, unsigned commands, std::vector<Option>& table) {
  o.requiredBy = commands;
  table.push_back(std::move(o));
}

const std::vector<Option>& optionTable() {
  static const std::vector<Option> table = [] {
    using C = Command;
    const unsigned gen = bit(C::kGenerate), fwd = bit(C::kForward), synth = bit(C::kSynth), bench = bit(C::kBench),
                   plan = bit(C::kPlan), enc = bit(C::kEncode), quant = bit(C::kQuantize);
    std::vector<Option> t;
    auto add = [&t](Option o) { t.push_back(std::move(o)); };
    // model and device
    required(opt("model", &EngineConfig::model, Group::kModel, Sync::kPresence, kModelCommands | quant, "PATH",
                 "FLUX checkpoint: a diffusers pipeline or transformer directory, or a BFL .safetensors file"),
             gen | fwd | plan | enc | quant, t);
    add(opt("vae", &EngineConfig::vae, Group::kModel, Sync::kPresence, gen | bench | plan, "PATH",
            "VAE for --output: a diffusers vae/ directory or a BFL ae.safetensors (default: the one beside --model)"));
    add(opt("vae-tiling", &EngineConfig::vaeTiling, Group::kMemory, Sync::kValue, gen | bench | plan, "MODE",
            "decode in overlapping tiles as diffusers' enable_tiling (seams: not the exact decode): auto (only when "
            "the patch-parallel decode does not fit the budget), on or off"));
    add(opt("vae-tile-size", &EngineConfig::vaeTileSize, Group::kMemory, Sync::kValue, gen | bench | plan, "PX",
            "tile of the tiled decode, a multiple of 8 (0: the VAE's sample_size, 1024 for FLUX.1, halved until one "
            "tile fits the budget)",
            atLeast<int64_t>(0)));
    add(opt("dtype", &EngineConfig::dtype, Group::kModel, Sync::kValue, kAll, "TYPE",
            "compute dtype: auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16 or fp32 (synth: the stored dtype)"));
    add(opt("weight-dtype", &EngineConfig::weightDtype, Group::kModel, Sync::kValue, kModelCommands, "TYPE",
            "transformer weights: fp8 (the blocks' linear weights as float8 e4m3 with one scale per output row, "
            "quantized while loading when stored otherwise; halves resident and streamed bytes), compute (every "
            "weight in --dtype), or auto (fp8 for an FP8 checkpoint, else compute)"));
    add(opt("device", &EngineConfig::device, Group::kModel, Sync::kValue, kModelCommands, "KIND",
            "auto, cpu or cuda (one GPU per rank, by local rank; plan: cpu plans a CPU run)"));
    add(opt("threads", &EngineConfig::threads, Group::kModel, Sync::kLocal, kEvery, "N",
            "intra-op CPU threads per rank (0: the library default)", atLeast(0)));
    add(opt("log-level", &EngineConfig::logLevel, Group::kModel, Sync::kLocal, kEvery, "LEVEL",
            "debug, info, warn or error"));
    add(flagOpt("strict", 0, &EngineConfig::strict, Group::kModel, Sync::kValue, kModelCommands,
                "stop on what is otherwise a warning: tensors in the checkpoint the model does not use, an invalid "
                "model_index.json"));
    add(flagOpt("cuda-graphs", 0, &EngineConfig::cudaGraphs, Group::kModel, Sync::kValue, gen | fwd | bench,
                "capture the transformer call in a CUDA graph after its first (eager) call and replay it: one launch "
                "instead of thousands, bit-identical results; needs one GPU's whole transformer with resident "
                "weights (no --ulysses-degree/--ring-degree/--pipefusion-degree > 1, nothing streamed)"));
    add(opt("attention", &EngineConfig::attention, Group::kModel, Sync::kValue, gen | fwd | bench, "KERNEL",
            "the transformer's attention kernel: auto (on CUDA the one PyTorch's scaled_dot_product_attention "
            "picks, for Ring attention's blocks flash (memory-efficient in fp32); flash on the CPU), flash "
            "(bf16/fp16 on CUDA), efficient or cudnn (CUDA only; cudnn bf16/fp16), or math (the unfused float32 "
            "composition: a reference, slow)"));
    add(flagOpt("unfused", 0, &EngineConfig::unfused, Group::kModel, Sync::kValue, gen | fwd | bench,
                "run ATen's compositions of the operations pardit fuses (RoPE, QK RMSNorm + RoPE, adaptive "
                "modulation, gated residuals) instead of its single passes, to measure what they gain: the same "
                "bits, except on CUDA, where QK RMSNorm then sums in at::rms_norm's order"));
    add(flagOpt("quiet", 'q', &EngineConfig::quiet, Group::kModel, Sync::kLocal, kEvery, "print errors only"));
    // parallel layout
    const unsigned par = kModelCommands;
    // The four degrees; each at least 1.
    // clang-format off
    const std::vector<std::tuple<const char*, int EngineConfig::*, const char*>> degrees = {
        {"ulysses-degree", &EngineConfig::ulyssesDegree, "Ulysses sequence parallelism (all-to-all over attention heads); must divide the head count"},
        {"ring-degree", &EngineConfig::ringDegree, "Ring sequence parallelism (K/V blocks passed around a ring)"},
        {"cfg-degree", &EngineConfig::cfgDegree, "2: the true-CFG branches (generate) or batch halves (forward) on two rank groups"},
        {"pipefusion-degree", &EngineConfig::pipefusionDegree, "PipeFusion pipeline stages; each rank loads only its stage's weights"}};
    // clang-format on
    for (const auto& [name, member, help] : degrees)
      add(opt(name, member, Group::kParallel, Sync::kValue, par, "N", help, atLeast(1)));
    add(opt("data-parallel-degree", &EngineConfig::dataParallelDegree, Group::kParallel, Sync::kValue, gen | plan, "D",
            "replica groups that share a --prompt-file queue: each is a whole layout of the other degrees, reads only "
            "its own shard of the weights and encodes its own prompts (world size = D x cfg x pipefusion x ring x "
            "ulysses)",
            atLeast(1)));
    add(opt("num-pipeline-patch", &EngineConfig::numPipelinePatch, Group::kParallel, Sync::kValue, par, "M",
            "PipeFusion patches (row stripes) per image; 0: the PipeFusion degree", atLeast(0)));
    add(opt("warmup-steps", &EngineConfig::warmupSteps, Group::kParallel, Sync::kValue, par, "N",
            "PipeFusion synchronous steps with fresh K/V before the patch pipeline", atLeast(0)));
    add(opt("collective-timeout", &EngineConfig::collectiveTimeout, Group::kParallel, Sync::kValue, kRunCommands,
            "SECONDS",
            "abort the job when a collective or transfer has not completed after this long (a stopped, "
            "hung or unreachable rank), naming the operation and the step; 0: never",
            atLeast(0.0)));
    add(opt("pp-partition", &EngineConfig::ppPartition, Group::kParallel, Sync::kValue, par, "SPLIT",
            "PipeFusion stage split: compute (equal block counts), memory (equal weight bytes) or N0,N1,..."));
    // memory
    add(opt("device-memory-budget", &EngineConfig::deviceMemoryBudget, Group::kMemory, Sync::kValue, par, "SIZE",
            "device memory per rank for weights, activations and buffers: 24GiB, 12GB, bytes, or auto (free memory "
            "minus 1 GiB headroom; the CPU: available host memory shared by the node's ranks; plan: what a rank "
            "would get on this machine)"));
    add(opt("offload", &EngineConfig::offload, Group::kMemory, Sync::kValue, par, "MODE",
            "none (all weights resident), auto (stream what does not fit) or sequential (stream every block)"));
    add(opt("stream-from", &EngineConfig::streamFrom, Group::kMemory, Sync::kValue, par, "SOURCE",
            "source of streamed weights: host (a copy of this rank's streamed groups in host memory, pinned on "
            "CUDA), file (read from the checkpoint by several threads each time), or auto (host on CUDA when the "
            "copy fits --host-memory-budget, else file)"));
    add(opt("host-memory-budget", &EngineConfig::hostMemoryBudget, Group::kMemory, Sync::kValue, par, "SIZE",
            "host memory per rank for streaming: 64GiB, bytes, or auto (available host memory shared by the "
            "node's ranks, minus 1 GiB headroom)"));
    // metrics
    add(opt("metrics", &EngineConfig::metrics, Group::kMetrics, Sync::kValue, kRunCommands, "FILE.h5",
            "append this run's metrics (timings, communication, memory, provenance) to an HDF5 file"));
    // inputs and outputs
    required(opt("inputs", &EngineConfig::inputs, Group::kOutput, Sync::kPresence, fwd, "FILE",
                 "safetensors file with hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, "
                 "txt_ids (and guidance for models with guidance embeddings)"),
             fwd, t);
    required(opt("output", &EngineConfig::output, Group::kOutput, Sync::kValue, fwd | gen | bench | enc, "FILE",
                 "generate: the PNG image (several images: FILE-0.png, FILE-1.png, ...); encode: safetensors file for "
                 "the prompt embeddings; forward: safetensors file for the prediction (tensor 'sample'); bench: JSON "
                 "report of every sample"),
             fwd | enc, t);
    // prompts and text encoders
    add(opt("prompt", &EngineConfig::prompt, Group::kText, Sync::kValue, gen | enc | bench, "TEXT",
            "the prompt (CLIP's, and T5's unless --prompt-2 is given)"));
    add(opt("prompt-2", &EngineConfig::prompt2, Group::kText, Sync::kValue, gen | enc, "TEXT", "T5's prompt"));
    add(opt("negative-prompt", &EngineConfig::negativePrompt, Group::kText, Sync::kValue, gen | enc, "TEXT",
            "the negative prompt of true CFG (with --true-cfg-scale > 1)"));
    add(opt("prompt-file", &EngineConfig::promptFile, Group::kText, Sync::kPresence, gen | enc, "FILE",
            "generate: a queue of requests, one image each, into --output-dir: one prompt per line, or JSONL "
            "objects with prompt, prompt_2, negative_prompt, seed, width, height, steps, guidance_scale, "
            "true_cfg_scale, max_sequence_length, output (missing fields from the command line; a line without a "
            "seed gets --seed + its index); encode: one prompt per line, a batch (empty lines are skipped)"));
    add(opt("output-dir", &EngineConfig::outputDir, Group::kOutput, Sync::kValue, gen, "DIR",
            "--prompt-file: the images and manifest.jsonl (one line per finished image); running the same command "
            "again skips the images already there with the same parameters"));
    add(opt("output-name", &EngineConfig::outputName, Group::kOutput, Sync::kValue, gen, "TEMPLATE",
            "--prompt-file: file names in --output-dir from {index}, {seed}, {width}, {height}, {steps}, {line} "
            "({index:05}: zero-padded); a JSONL line's output wins"));
    add(opt("shard", &EngineConfig::shard, Group::kOutput, Sync::kValue, gen, "I/N",
            "--prompt-file: make only the requests whose index % N == I; auto: this Slurm array task's share "
            "(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT)"));
    add(opt("batch-size", &EngineConfig::batchSize, Group::kOutput, Sync::kValue, gen, "N",
            "--prompt-file: up to N queued requests of one shape (size, steps, guidance, true CFG, text length) share "
            "one transformer call; each image is the one its request makes alone",
            atLeast(1)));
    add(flagOpt("overwrite", 0, &EngineConfig::overwrite, Group::kOutput, Sync::kValue, gen,
                "--prompt-file: replace an image in --output-dir that was made with other parameters (without it "
                "that is an error)"));
    add(opt("max-sequence-length", &EngineConfig::maxSequenceLength, Group::kText, Sync::kValue,
            gen | enc | plan | bench, "N",
            "T5 tokens (0: 512 for guidance-distilled models such as FLUX.1-dev, 256 otherwise)", atLeast<int64_t>(0)));
    add(opt("text-encoder", &EngineConfig::textEncoder, Group::kText, Sync::kPresence, gen | enc | plan | bench, "PATH",
            "CLIP text encoder: text_encoder/ or a single file such as clip_l.safetensors (default: the model's)"));
    add(opt("text-encoder-2", &EngineConfig::textEncoder2, Group::kText, Sync::kPresence, gen | enc | plan | bench,
            "PATH",
            "T5 encoder: text_encoder_2/ or a single file such as t5xxl_fp16.safetensors (default: the model's)"));
    add(opt("tokenizer", &EngineConfig::tokenizer, Group::kText, Sync::kPresence, gen | enc | bench, "DIR",
            "CLIP tokenizer: vocab.json + merges.txt, or tokenizer.json (default: the model's tokenizer/)"));
    add(opt("tokenizer-2", &EngineConfig::tokenizer2, Group::kText, Sync::kPresence, gen | enc | bench, "DIR",
            "T5 tokenizer: tokenizer.json or spiece.model (default: the model's tokenizer_2/)"));
    add(opt("text-encoder-rank", &EngineConfig::textEncoderRank, Group::kText, Sync::kValue, gen | enc | plan, "R",
            "the rank that runs the text encoders (-1: the rank with the most spare memory after its plan)",
            atLeast(-1)));
    add(opt("text-encoder-device", &EngineConfig::textEncoderDevice, Group::kText, Sync::kValue, gen | enc | bench,
            "KIND", "auto (the rank's device) or cpu (keep the encoders off the GPU)"));
    add(opt("prompt-embeds", &EngineConfig::promptEmbeds, Group::kOutput, Sync::kPresence, gen, "FILE",
            "instead of --prompt: safetensors file with prompt_embeds [B,T,4096] and pooled_prompt_embeds [B,768]"));
    add(opt("negative-prompt-embeds", &EngineConfig::negativePromptEmbeds, Group::kOutput, Sync::kPresence, gen, "FILE",
            "the same for the negative prompt (true CFG)"));
    add(opt("save-latents", &EngineConfig::saveLatents, Group::kOutput, Sync::kValue, gen, "FILE",
            "write the final packed latents [B,S,64] (tensor 'latents') as safetensors"));
    // sampling
    add(opt("height", &EngineConfig::height, Group::kSampling, Sync::kValue, gen | bench | plan, "PX",
            "image height in pixels (multiple of 16)", atLeast<int64_t>(16)));
    add(opt("width", &EngineConfig::width, Group::kSampling, Sync::kValue, gen | bench | plan, "PX",
            "image width in pixels (multiple of 16)", atLeast<int64_t>(16)));
    add(opt("steps", &EngineConfig::steps, Group::kSampling, Sync::kValue, gen, "N", "denoising steps", atLeast(1)));
    add(opt("guidance-scale", &EngineConfig::guidanceScale, Group::kSampling, Sync::kValue, gen, "G",
            "distilled guidance (models with guidance embeddings, e.g. FLUX.1-dev)"));
    add(opt("true-cfg-scale", &EngineConfig::trueCfgScale, Group::kSampling, Sync::kValue, gen | plan, "C",
            "true classifier-free guidance; > 1 with --negative-prompt-embeds enables it (plan: both branches)"));
    add(opt("seed", &EngineConfig::seed, Group::kSampling, Sync::kValue, gen | synth, "N",
            "seed of the initial noise (synth: of the random weights)"));
    add(opt(
        "schedule", &EngineConfig::schedule, Group::kSampling, Sync::kValue, gen, "KIND",
        "auto (scheduler_config.json, else shifted for guidance-distilled models), shift (dev) or plain (schnell)"));
    add(opt("text-len", &EngineConfig::textLen, Group::kSampling, Sync::kValue, synth | bench | plan, "N",
            "text tokens (plan: 512 for FLUX.1-dev, 256 for schnell; synth: of the sample prompt embeddings, 0: the "
            "preset's)",
            atLeast<int64_t>(0)));
    add(opt("batch", &EngineConfig::batch, Group::kSampling, Sync::kValue, bench | plan, "N", "images per prompt",
            atLeast<int64_t>(1)));
    // plan
    add(opt("world-size", &EngineConfig::worldSize, Group::kPlan, Sync::kValue, plan, "N",
            "ranks of the planned job (0: the product of the degrees)", atLeast(0)));
    add(flagOpt("json", 0, &EngineConfig::json, Group::kPlan, Sync::kValue, plan, "print the plan as JSON"));
    // synth
    add(opt("preset", &EngineConfig::preset, Group::kSynth, Sync::kValue, synth | bench, "NAME",
            "tiny, small, medium, flux-dev or flux-schnell (bench: the in-memory model when no --model is given)"));
    add(opt("layout", &EngineConfig::layout, Group::kSynth, Sync::kValue, synth, "LAYOUT", "diffusers or bfl"));
    required(opt("out", &EngineConfig::out, Group::kOutput, Sync::kValue, synth | quant, "DIR",
                 "output directory (synth: the model; quantize: the FP8 copy, another folder than the input's)"),
             synth | quant, t);
    add(opt("fill", &EngineConfig::fill, Group::kSynth, Sync::kValue, synth, "KIND",
            "random, or zeros (sparse files: real headers, no disk use)"));
    add(opt("shard-size", &EngineConfig::shardSize, Group::kSynth, Sync::kValue, synth, "BYTES",
            "largest diffusers shard in bytes", atLeast<uint64_t>(1)));
    add(opt("depth", &EngineConfig::depth, Group::kSynth, Sync::kValue, synth, "N",
            "double-stream blocks (-1: the preset's)", atLeast<int64_t>(-1)));
    add(opt("depth-single", &EngineConfig::depthSingle, Group::kSynth, Sync::kValue, synth, "N",
            "single-stream blocks (-1: the preset's)", atLeast<int64_t>(-1)));
    // bench
    add(opt("warmup", &EngineConfig::warmup, Group::kBench, Sync::kValue, bench, "N", "untimed forwards before timing",
            atLeast(0)));
    add(opt("iters", &EngineConfig::iters, Group::kBench, Sync::kValue, bench, "N", "timed forwards", atLeast(1)));
    add(flagOpt("decode", 0, &EngineConfig::benchDecode, Group::kBench, Sync::kValue, bench,
                "time the VAE decode of one image of --height x --width on all ranks (planned as generate plans it: "
                "patch-parallel, or tiles) and measure each rank's activation memory"));
    add(flagOpt("encode", 0, &EngineConfig::benchEncode, Group::kBench, Sync::kValue, bench,
                "time the encode stage (tokenizers, CLIP, T5) of --batch copies of --prompt (default: a built-in "
                "prompt) at --max-sequence-length on one rank"));
    add(flagOpt("profile", 0, &EngineConfig::benchProfile, Group::kBench, Sync::kValue, bench,
                "after timing, run one more forward under an operator profiler and print each ATen operator's total "
                "time and calls (rank 0), grouped into GEMM, attention, norms, copies and elementwise work"));
    add(flagOpt("comm", 0, &EngineConfig::benchComm, Group::kBench, Sync::kValue, bench,
                "collective micro-benchmark (all-to-all, all-gather, ring send/recv) over the world, bandwidths as "
                "nccl-tests reports them"));
    add(opt("comm-max-bytes", &EngineConfig::commMaxBytes, Group::kBench, Sync::kValue, bench, "BYTES",
            "largest message of --comm", atLeast<uint64_t>(1024)));
    return t;
  }();
  return table;
}

std::vector<const Option*> optionsOf(Command command) {
  std::vector<const Option*> out;
  for (const auto& o : optionTable())
    if (o.commands & bit(command)) out.push_back(&o);
  return out;
}

Command parseCommand(const std::string& name) {
  const auto& names = namesOf<Command>();
  for (size_t i = 0; i < names.size(); ++i)
    if (name == names[i]) return static_cast<Command>(i);
  PARDIT_THROW("unknown command '", name, "'; expected one of ", joinOr(enumNames<Command>()));
}

std::string envNameOf(const std::string& option) {
  std::string s = "PARDIT_";
  for (char ch : option) s += ch == '-' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  return s;
}

size_t editDistance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// The option of `command` closest to `name`, or "" when none is close.
std::string nearestOption(const std::string& name, Command command) {
  std::string best;
  size_t bestDistance = 3;
  for (const Option* o : optionsOf(command)) {
    const size_t d = editDistance(name, o->name);
    const bool prefix = o->name.rfind(name, 0) == 0 && name.size() >= 3;
    if (d < bestDistance || (prefix && bestDistance > 1)) {
      best = o->name;
      bestDistance = prefix ? 1 : d;
    }
  }
  return best;
}

std::string didYouMean(const std::string& name, Command command, const char* prefix) {
  const std::string n = nearestOption(name, command);
  return n.empty() ? std::string() : std::string("; did you mean ") + prefix + n + "?";
}

}  // namespace

// ---- defaults, help, provenance ----------------------------------------------------------------------

EngineConfig defaults(Command command) {
  EngineConfig c;
  c.command = command;
  if (command == Command::kBench) {
    c.height = c.width = 256;
    c.iters = 5;
    c.textLen = 128;
    c.preset = "small";
  } else if (command == Command::kPlan) {
    c.textLen = 512;
    c.dtype = Dtype::kBf16;
  }
  return c;
}

const std::vector<std::pair<std::string, std::string>>& commands() {
  static const std::vector<std::pair<std::string, std::string>> list = {
      {"generate", "prompt in, image out: encode, denoise, decode, write a PNG"},
      {"encode", "run the text encoders: prompt embeddings as FluxPipeline.encode_prompt makes them"},
      {"forward", "run one transformer call on tensors from a safetensors file"},
      {"synth", "write a random-weight FLUX checkpoint in the real file layout"},
      {"bench", "time transformer forwards and the machine's GEMM rate"},
      {"plan", "print each rank's memory plan from the checkpoint headers (no weights read)"},
      {"quantize", "write an FP8 copy of a checkpoint (float8 e4m3 block weights with per-row scales), same layout"},
  };
  return list;
}

std::string usage() {
  std::ostringstream os;
  os << "usage: pardit <command> [options]\n       pardit --version | --help\n\ncommands:\n";
  for (const auto& [name, text] : commands()) os << "  " << name << std::string(10 - name.size(), ' ') << text << "\n";
  os << "\n'pardit <command> --help' lists a command's options. Options can also be set with PARDIT_<OPTION>\n"
        "environment variables (e.g. PARDIT_STEPS=4) or in an INI file given with --config FILE.\n"
        "Parallel runs: mpirun -n 4 pardit generate ... --ulysses-degree 2 --ring-degree 2\n";
  return os.str();
}

std::string help(Command command) {
  static const std::map<Command, std::vector<std::string>> kExamples = {
      {Command::kGenerate,
       {"pardit generate --model FLUX.1-dev --prompt \"a cat on the moon\" --output cat.png",
        "pardit generate --model tiny --prompt-embeds tiny/prompt_embeds.safetensors --height 256 --width 256 "
        "--steps 4 --save-latents out.safetensors",
        "mpirun -n 4 pardit generate --model FLUX.1-dev --prompt-embeds e.safetensors --ulysses-degree 2 "
        "--ring-degree 2 --save-latents out.safetensors",
        "mpirun -n 2 pardit generate --model M --prompt-embeds e.safetensors --pipefusion-degree 2 "
        "--device-memory-budget 12GiB --metrics runs.h5 --save-latents out.safetensors"}},
      {Command::kEncode,
       {"pardit encode --model FLUX.1-dev --prompt \"a cat\" --output embeds.safetensors",
        "pardit encode --model FLUX.1-schnell --prompt-file prompts.txt --negative-prompt blurry --output "
        "e.safetensors"}},
      {Command::kForward,
       {"pardit forward --model M --inputs in.safetensors --output out.safetensors",
        "mpirun -n 2 pardit forward --model M --inputs in.safetensors --output out.safetensors --ring-degree 2"}},
      {Command::kSynth,
       {"pardit synth --preset small --out small",
        "pardit synth --preset flux-dev --fill zeros --layout bfl --out dev"}},
      {Command::kBench,
       {"pardit bench --preset small --threads 2", "mpirun -n 2 pardit bench --ulysses-degree 2 --output r.json",
        "mpirun -n 2 pardit bench --comm"}},
      {Command::kQuantize,
       {"pardit quantize --model FLUX.1-dev --out FLUX.1-dev-fp8",
        "pardit quantize --model flux1-dev.safetensors --out fp8   (writes fp8/flux1-dev-fp8.safetensors)"}},
      {Command::kPlan,
       {"pardit plan --model FLUX.1-dev --device-memory-budget 24GiB",
        "pardit plan --model FLUX.1-dev --pipefusion-degree 4 --device-memory-budget 8GiB --json"}},
  };
  const EngineConfig d = defaults(command);
  std::ostringstream os;
  const std::string name = commandName(command);
  os << "usage: pardit " << name << " [options]";
  for (const Option* o : optionsOf(command))
    if (o->requiredBy & bit(command)) os << " --" << o->name << " " << o->placeholder;
  os << "\n";
  for (const auto& [n, text] : commands())
    if (n == name) os << text << "\n";
  for (int g = 0; g <= static_cast<int>(Group::kBench); ++g) {
    std::vector<const Option*> in;
    for (const Option* o : optionsOf(command))
      if (static_cast<int>(o->group) == g) in.push_back(o);
    if (in.empty()) continue;
    os << "\n" << groupTitle(static_cast<Group>(g)) << ":\n";
    for (const Option* o : in) {
      std::string flags = "  --" + o->name + (o->isSwitch ? "" : " " + o->placeholder);
      if (o->shortName) flags += ", -" + std::string(1, o->shortName);
      os << flags << "\n      " << o->help;
      if (o->requiredBy & bit(command)) {
        os << " [required]";
      } else if (!o->isSwitch) {
        const std::string v = o->get(d);
        os << " [default: " << (v.empty() ? "none" : v) << "]";
      }
      os << " (" << envNameOf(o->name) << ")\n";
    }
  }
  os << "\ngeneral:\n  --config FILE\n      INI file with options (key = value, keys as the long flags) "
        "(PARDIT_CONFIG)\n"
     << "  --help, -h\n      print this help\n";
  os << "\nexamples:\n";
  for (const auto& e : kExamples.at(command)) os << "  " << e << "\n";
  return os.str();
}

std::map<std::string, std::string> toMap(const EngineConfig& c) {
  std::map<std::string, std::string> m;
  m["command"] = commandName(c.command);
  for (const Option* o : optionsOf(c.command)) m[o->name] = o->get(c);
  return m;
}

std::vector<std::pair<std::string, std::string>> syncedOptions(const EngineConfig& c) {
  std::vector<std::pair<std::string, std::string>> out{{"the command", commandName(c.command)}};
  for (const Option* o : optionsOf(c.command)) {
    if (o->sync == Sync::kValue) {
      const std::string v = o->get(c);
      out.push_back({"--" + o->name, v.empty() ? "(not given)" : v});
    }
    if (o->sync == Sync::kPresence) out.push_back({"--" + o->name, o->get(c).empty() ? "(not given)" : "(given)"});
  }
  return out;
}

// ---- parsing -------------------------------------------------------------------------------------

namespace {

// Boost parses the syntax (every value as text); the table parses and checks the values.
po::options_description syntaxOf(const std::vector<const Option*>& options) {
  po::options_description desc;
  desc.add_options()("help,h", "")("config", po::value<std::string>(), "");
  for (const Option* o : options) {
    const std::string spec = o->shortName ? o->name + "," + o->shortName : o->name;
    if (o->isSwitch) {
      desc.add_options()(spec.c_str(), po::bool_switch(), "");
    } else {
      desc.add_options()(spec.c_str(), po::value<std::string>(), "");
    }
  }
  return desc;
}

// The command line; `stray` gets the words that are no option (reported after the values, whose errors
// are more specific).
po::variables_map readCommandLine(const std::vector<std::string>& args, const po::options_description& desc,
                                  Command command, std::vector<std::string>& stray) {
  const std::string name = commandName(command);
  po::variables_map vm;
  try {
    // No prefix guessing: --prompt must not silently become --prompt-embeds.
    const int style = po::command_line_style::default_style & ~po::command_line_style::allow_guessing;
    const po::parsed_options parsed = po::command_line_parser(args).options(desc).style(style).run();
    stray = po::collect_unrecognized(parsed.options, po::include_positional);
    po::store(parsed, vm);
  } catch (const po::unknown_option& e) {
    std::string option = e.get_option_name();
    while (!option.empty() && option[0] == '-') option.erase(0, 1);
    PARDIT_THROW("pardit ", name, ": unknown option '", e.get_option_name(), "'", didYouMean(option, command, "--"),
                 " (see 'pardit ", name, " --help')");
  } catch (const po::error& e) {
    PARDIT_THROW("pardit ", name, ": ", e.what(), " (see 'pardit ", name, " --help')");
  }
  return vm;
}

// PARDIT_<OPTION> values of this command's options. A variable that is no option of any command but
// one edit away (two for longer names) from one of this command's is a typo (PARDIT_STEP=3): an error.
std::map<std::string, std::string> readEnvironment(const std::vector<const Option*>& options, Command command) {
  std::set<std::string> anyCommand;
  for (const auto& o : optionTable()) anyCommand.insert(envNameOf(o.name));
  // Variables of pardit's scripts (launch/, bench/, slurm/), not options.
  static const std::set<std::string> kToolVariables = {
      "PARDIT_CONFIG",   "PARDIT_VENV",      "PARDIT_ROOT",          "PARDIT_BUILD_DIR",        "PARDIT_BUILD_TYPE",
      "PARDIT_JOBS",     "PARDIT_TEST_JOBS", "PARDIT_PYTHON",        "PARDIT_BASE_PYTHON",      "PARDIT_OUT",
      "PARDIT_LAUNCHER", "PARDIT_ENV_SETUP", "PARDIT_TORCH_VERSION", "PARDIT_DIFFUSERS_VERSION"};
  std::map<std::string, std::string> env;
  for (char** e = environ; e && *e; ++e) {
    const std::string kv = *e;
    const size_t eq = kv.find('=');
    const std::string var = kv.substr(0, eq);
    if (var.rfind("PARDIT_", 0) != 0 || eq == std::string::npos) continue;
    bool mine = false;
    for (const Option* o : options)
      if (envNameOf(o->name) == var) {
        env[o->name] = kv.substr(eq + 1);
        mine = true;
      }
    if (mine || anyCommand.count(var) || kToolVariables.count(var)) continue;
    std::string asOption = var.substr(7);
    for (char& ch : asOption) ch = ch == '_' ? '-' : static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    const std::string near = nearestOption(asOption, command);
    const size_t allowed = asOption.size() >= 6 ? 2 : 1;
    PARDIT_CHECK(near.empty() || editDistance(asOption, near) > allowed, "environment: ", var,
                 " is not an option of pardit ", commandName(command), "; did you mean ", envNameOf(near), " (--", near,
                 ")?");
  }
  return env;
}

po::variables_map readConfigFile(const std::string& configFile, const po::options_description& desc, Command command) {
  po::variables_map fileVm;
  if (configFile.empty()) return fileVm;
  std::ifstream in(configFile);
  PARDIT_CHECK(in.good(), configFile, ": cannot open config file (--config)");
  registerInputFile(configFile);
  try {
    po::store(po::parse_config_file(in, desc, /*allow_unregistered=*/false), fileVm);
  } catch (const po::unknown_option& e) {
    PARDIT_THROW(configFile, ": unknown key '", e.get_option_name(), "'", didYouMean(e.get_option_name(), command, ""));
  } catch (const po::error& e) {
    PARDIT_THROW(configFile, ": ", e.what());
  }
  return fileVm;
}

// The text of an option given in `vm` (a switch that is set gives ""), or nothing.
std::optional<std::string> givenIn(const po::variables_map& vm, const Option& o) {
  if (!vm.count(o.name) || vm[o.name].defaulted()) return std::nullopt;
  if (o.isSwitch) return vm[o.name].as<bool>() ? std::optional<std::string>("") : std::nullopt;
  return vm[o.name].as<std::string>();
}

}  // namespace

ParseResult parseCommandLine(const std::string& commandText, const std::vector<std::string>& args) {
  const Command command = parseCommand(commandText);
  ParseResult result;
  EngineConfig& c = result.config;
  c = defaults(command);
  const auto options = optionsOf(command);
  // Boost's description of a command's syntax is the same on every call: built once per command.
  static std::mutex syntaxMutex;
  static std::map<Command, std::shared_ptr<const po::options_description>> syntaxes;
  std::shared_ptr<const po::options_description> syntax;
  {
    std::lock_guard<std::mutex> lock(syntaxMutex);
    auto& cached = syntaxes[command];
    if (!cached) cached = std::make_shared<const po::options_description>(syntaxOf(options));
    syntax = cached;
  }
  const po::options_description& desc = *syntax;
  std::vector<std::string> stray;
  const po::variables_map vm = readCommandLine(args, desc, command, stray);
  if (vm.count("help")) {
    result.helpShown = true;
    return result;
  }
  const auto env = readEnvironment(options, command);
  c.configFile = vm.count("config") ? vm["config"].as<std::string>() : "";
  if (c.configFile.empty())
    if (const char* e = std::getenv("PARDIT_CONFIG")) c.configFile = e;
  const po::variables_map fileVm = readConfigFile(c.configFile, desc, command);
  // Precedence: command line, environment, file, default.
  for (const Option* o : options) {
    const auto cli = givenIn(vm, *o), file = givenIn(fileVm, *o);
    const auto envIt = env.find(o->name);
    try {
      if (cli) {
        o->set(c, *cli);
      } else if (envIt != env.end()) {
        const std::string& v = envIt->second;
        const bool on = v == "1" || v == "true";
        PARDIT_CHECK(!o->isSwitch || on || v == "0" || v == "false", "must be 1, true, 0 or false, got '", v, "'");
        if (!o->isSwitch || on) o->set(c, o->isSwitch ? "" : v);
      } else if (file) {
        o->set(c, *file);
      }
    } catch (const Error& e) {
      const std::string source = cli                  ? ""
                                 : envIt != env.end() ? "environment " + envNameOf(o->name) + ": "
                                                      : c.configFile + ": ";
      PARDIT_THROW(source, e.message());
    }
  }
  const std::string where = "pardit " + commandText;
  PARDIT_CHECK(stray.empty(), where, ": unexpected argument '", stray.empty() ? "" : stray.front(),
               "' (options are --name value; see 'pardit ", commandText, " --help')");
  for (const Option* o : options)
    PARDIT_CHECK(!(o->requiredBy & bit(command)) || !o->get(c).empty(), where, ": --", o->name, " is required (",
                 o->help, ")");
  if (command == Command::kGenerate) {
    const bool queue = !c.promptFile.empty();
    PARDIT_CHECK(!queue || c.output.empty(), where,
                 ": --prompt-file makes one image per line into --output-dir DIR (names from --output-name); "
                 "--output names a single image");
    PARDIT_CHECK(!queue || c.saveLatents.empty(), where, ": --save-latents is for a single request, not --prompt-file");
    PARDIT_CHECK(
        !queue || (c.prompt.empty() && c.prompt2.empty() && c.promptEmbeds.empty() && c.negativePromptEmbeds.empty()),
        where, ": --prompt-file takes its prompts from the file (not --prompt, --prompt-2 or --prompt-embeds)");
    PARDIT_CHECK(!queue || !c.outputDir.empty(), where, ": --prompt-file needs --output-dir DIR for its images");
    for (const auto& [flag, given] : {std::pair<const char*, bool>{"--output-dir", !c.outputDir.empty()},
                                      {"--shard", !c.shard.empty()},
                                      {"--overwrite", c.overwrite},
                                      {"--batch-size > 1", c.batchSize > 1},
                                      {"--data-parallel-degree > 1", c.dataParallelDegree > 1}})
      PARDIT_CHECK(queue || !given, where, ": ", flag, " is for a queue of requests: pass --prompt-file FILE");
  }
  return result;
}

}  // namespace pardit::config
