#include "pardit/config/config.h"

#include <boost/program_options.hpp>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>

#include "pardit/core/error.h"

namespace po = boost::program_options;

namespace pardit::config {

const std::vector<std::pair<std::string, std::string>>& commands() {
  static const std::vector<std::pair<std::string, std::string>> list = {
      {"generate", "run the text-to-image sampling loop from prompt embeddings"},
      {"forward", "run one transformer call on tensors from a safetensors file"},
      {"synth", "write a random-weight FLUX checkpoint in the real file layout"},
      {"bench", "time transformer forwards and the machine's GEMM rate"},
      {"plan", "print each rank's memory plan from the checkpoint headers (no weights read)"},
  };
  return list;
}

std::string usage() {
  std::ostringstream os;
  os << "usage: pardit <command> [options]\n\ncommands:\n";
  for (const auto& [name, text] : commands()) os << "  " << name << std::string(10 - name.size(), ' ') << text << "\n";
  os << "\n'pardit <command> --help' lists a command's options. Options can also be set with PARDIT_<OPTION>\n"
        "environment variables (e.g. PARDIT_STEPS=4) or in an INI file given with --config FILE.\n";
  return os.str();
}

namespace {

void addCommon(po::options_description& d, EngineConfig& c, bool needModel) {
  d.add_options()
      ("help,h", "print this help")
      ("config", po::value(&c.configFile), "INI file with options (key = value, keys as the long flags)")
      ("dtype", po::value(&c.dtype)->default_value(c.dtype), "compute dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
      ("device", po::value(&c.device)->default_value(c.device), "auto, cpu or cuda")
      ("threads", po::value(&c.threads)->default_value(c.threads), "intra-op CPU threads per rank (0: library default)")
      ("log-level", po::value(&c.logLevel)->default_value(c.logLevel), "debug, info, warn or error")
      ("quiet,q", po::bool_switch(&c.quiet), "print errors only");
  if (needModel)
    d.add_options()("model", po::value(&c.model), "FLUX checkpoint: diffusers directory or BFL .safetensors file");
}

void addMetrics(po::options_description& d, EngineConfig& c) {
  d.add_options()("metrics", po::value(&c.metrics),
                  "append this run's metrics (timings, communication, memory, provenance) to an HDF5 file");
}

void addParallel(po::options_description& d, EngineConfig& c) {
  d.add_options()
      ("ulysses-degree", po::value(&c.ulyssesDegree)->default_value(c.ulyssesDegree),
       "Ulysses sequence parallelism (all-to-all over attention heads); must divide the head count")
      ("ring-degree", po::value(&c.ringDegree)->default_value(c.ringDegree),
       "Ring sequence parallelism (K/V blocks passed around a ring)")
      ("cfg-degree", po::value(&c.cfgDegree)->default_value(c.cfgDegree),
       "2: the true-CFG branches (generate) or batch halves (forward) on two rank groups")
      ("pipefusion-degree", po::value(&c.pipefusionDegree)->default_value(c.pipefusionDegree),
       "PipeFusion pipeline stages; each rank loads only its stage's weights")
      ("num-pipeline-patch", po::value(&c.numPipelinePatch)->default_value(c.numPipelinePatch),
       "PipeFusion patches (row stripes) per image; 0: the PipeFusion degree")
      ("warmup-steps", po::value(&c.warmupSteps)->default_value(c.warmupSteps),
       "PipeFusion synchronous steps with fresh K/V before the patch pipeline")
      ("pp-partition", po::value(&c.ppPartition)->default_value(c.ppPartition),
       "PipeFusion stage split: compute (equal block counts), memory (equal weight bytes) or N0,N1,...")
      ("device-memory-budget", po::value(&c.deviceMemoryBudget)->default_value(c.deviceMemoryBudget),
       "device memory per rank for weights, activations and buffers: 24GiB, 12GB, bytes, or auto (free memory "
       "minus 1 GiB headroom)")
      ("offload", po::value(&c.offload)->default_value(c.offload),
       "none (all weights resident), auto (stream what does not fit) or sequential (stream every block)")
      ("stream-from", po::value(&c.streamFrom)->default_value(c.streamFrom),
       "source of streamed weights: host (a host copy of this rank's shard, pinned on CUDA), file, or auto "
       "(host on CUDA when it fits in half the available host memory, file on CPU)");
}

po::options_description describe(const std::string& command, EngineConfig& c) {
  po::options_description d("pardit " + command + " options");
  if (command == "forward") {
    addCommon(d, c, true);
    addParallel(d, c);
    addMetrics(d, c);
    d.add_options()
        ("inputs", po::value(&c.inputs), "safetensors file with hidden_states, encoder_hidden_states, pooled_projections, "
                                         "timestep, img_ids, txt_ids (and guidance for models with guidance embeddings)")
        ("output", po::value(&c.output), "safetensors file to write the prediction to (tensor 'sample')");
  } else if (command == "generate") {
    addCommon(d, c, true);
    addParallel(d, c);
    addMetrics(d, c);
    d.add_options()
        ("prompt-embeds", po::value(&c.promptEmbeds), "safetensors file with prompt_embeds [B,T,D] and pooled_prompt_embeds [B,P]")
        ("negative-prompt-embeds", po::value(&c.negativePromptEmbeds), "the same for the negative prompt (true CFG)")
        ("height", po::value(&c.height)->default_value(c.height), "image height in pixels (multiple of 16)")
        ("width", po::value(&c.width)->default_value(c.width), "image width in pixels (multiple of 16)")
        ("steps", po::value(&c.steps)->default_value(c.steps), "denoising steps")
        ("guidance-scale", po::value(&c.guidanceScale)->default_value(c.guidanceScale),
         "distilled guidance (models with guidance embeddings, e.g. FLUX.1-dev)")
        ("true-cfg-scale", po::value(&c.trueCfgScale)->default_value(c.trueCfgScale),
         "true classifier-free guidance scale; > 1 with --negative-prompt-embeds enables it")
        ("seed", po::value(&c.seed)->default_value(c.seed), "seed of the initial noise")
        ("schedule", po::value(&c.schedule)->default_value(c.schedule),
         "auto (scheduler_config.json, else shifted for guidance-distilled models), shift (dev) or plain (schnell)")
        ("save-latents", po::value(&c.saveLatents), "write the final packed latents [B,S,64] (tensor 'latents')");
  } else if (command == "plan") {
    addCommon(d, c, true);
    addParallel(d, c);
    d.add_options()
        ("world-size", po::value(&c.worldSize)->default_value(c.worldSize), "ranks of the planned job")
        ("height", po::value(&c.height)->default_value(c.height), "image height in pixels")
        ("width", po::value(&c.width)->default_value(c.width), "image width in pixels")
        ("text-len", po::value(&c.textLen)->default_value(512), "text tokens (512 for FLUX.1-dev, 256 for schnell)")
        ("batch", po::value(&c.batch)->default_value(c.batch), "images per prompt")
        ("true-cfg-scale", po::value(&c.trueCfgScale)->default_value(c.trueCfgScale),
         "> 1 plans for true CFG (both branches: on the two CFG ranks, or as one batch of 2)")
        ("json", po::bool_switch(&c.json), "print the plan as JSON");
  } else if (command == "synth") {
    addCommon(d, c, false);
    d.add_options()
        ("preset", po::value(&c.preset)->default_value(c.preset), "tiny, small, medium, flux-dev or flux-schnell")
        ("layout", po::value(&c.layout)->default_value(c.layout), "diffusers or bfl")
        ("out", po::value(&c.out), "output directory")
        ("seed", po::value(&c.seed)->default_value(c.seed), "seed of the random weights")
        ("fill", po::value(&c.fill)->default_value(c.fill), "random, or zeros (sparse files: real headers, no disk use)")
        ("text-len", po::value(&c.textLen)->default_value(c.textLen), "tokens in the sample prompt embeddings (0: preset default)")
        ("shard-size", po::value(&c.shardSize)->default_value(c.shardSize), "largest diffusers shard in bytes")
        ("depth", po::value(&c.depth)->default_value(c.depth), "double-stream blocks (-1: the preset's)")
        ("depth-single", po::value(&c.depthSingle)->default_value(c.depthSingle), "single-stream blocks (-1: the preset's)");
  } else if (command == "bench") {
    addCommon(d, c, true);
    addParallel(d, c);
    addMetrics(d, c);
    d.add_options()
        ("preset", po::value(&c.preset)->default_value("small"), "model preset when no --model is given (weights in memory)")
        ("height", po::value(&c.height)->default_value(256), "image height in pixels")
        ("width", po::value(&c.width)->default_value(256), "image width in pixels")
        ("text-len", po::value(&c.textLen)->default_value(128), "text tokens")
        ("batch", po::value(&c.batch)->default_value(c.batch), "batch size")
        ("warmup", po::value(&c.warmup)->default_value(c.warmup), "untimed forwards before timing")
        ("iters", po::value(&c.iters)->default_value(c.iters), "timed forwards")
        ("output", po::value(&c.benchOutput), "write every sample and the summary as JSON to this file")
        ("comm", po::bool_switch(&c.benchComm), "collective micro-benchmark (all-to-all, all-gather, ring send/recv) "
                                                 "over the world, bandwidths as nccl-tests reports them")
        ("comm-max-bytes", po::value(&c.commMaxBytes)->default_value(c.commMaxBytes), "largest message of --comm");
  } else {
    PARDIT_THROW("unknown command '", command, "'; expected one of generate, forward, synth, bench, plan");
  }
  return d;
}

// PARDIT_GUIDANCE_SCALE -> guidance-scale, for the options this command has.
std::string envName(const std::string& var, const po::options_description& d) {
  static const std::string prefix = "PARDIT_";
  if (var.compare(0, prefix.size(), prefix) != 0) return "";
  std::string name = var.substr(prefix.size());
  for (char& ch : name) ch = ch == '_' ? '-' : static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (name == "help") return "";
  return d.find_nothrow(name, false) != nullptr ? name : "";
}

}  // namespace

std::map<std::string, std::string> toMap(const EngineConfig& c) {
  std::map<std::string, std::string> m;
  auto put = [&](const char* k, const auto& v) {
    std::ostringstream os;
    os << v;
    m[k] = os.str();
  };
  put("command", c.command);
  put("model", c.model);
  put("dtype", c.dtype);
  put("device", c.device);
  put("threads", c.threads);
  put("ulysses-degree", c.ulyssesDegree);
  put("ring-degree", c.ringDegree);
  put("cfg-degree", c.cfgDegree);
  put("pipefusion-degree", c.pipefusionDegree);
  put("num-pipeline-patch", c.numPipelinePatch);
  put("warmup-steps", c.warmupSteps);
  put("pp-partition", c.ppPartition);
  put("device-memory-budget", c.deviceMemoryBudget);
  put("offload", c.offload);
  put("stream-from", c.streamFrom);
  if (c.command == "forward") {
    put("inputs", c.inputs);
    put("output", c.output);
  } else {
    put("height", c.height);
    put("width", c.width);
  }
  if (c.command == "generate") {
    put("prompt-embeds", c.promptEmbeds);
    put("negative-prompt-embeds", c.negativePromptEmbeds);
    put("steps", c.steps);
    put("guidance-scale", c.guidanceScale);
    put("true-cfg-scale", c.trueCfgScale);
    put("seed", c.seed);
    put("schedule", c.schedule);
  }
  if (c.command == "bench") {
    put("preset", c.preset);
    put("text-len", c.textLen);
    put("batch", c.batch);
    put("warmup", c.warmup);
    put("iters", c.iters);
  }
  return m;
}

ParseResult parseCommandLine(const std::string& command, const std::vector<std::string>& args) {
  ParseResult result;
  EngineConfig& c = result.config;
  c.command = command;
  po::options_description desc = describe(command, c);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(args).options(desc).run(), vm);
  } catch (const po::error& e) {
    PARDIT_THROW("pardit ", command, ": ", e.what(), " (see 'pardit ", command, " --help')");
  }
  if (vm.count("help")) {
    std::cout << desc << "\n";
    result.helpShown = true;
    return result;
  }
  try {
    po::store(po::parse_environment(desc, [&desc](const std::string& var) { return envName(var, desc); }), vm);
  } catch (const po::error& e) {
    PARDIT_THROW("environment: ", e.what(), " (PARDIT_* variables)");
  }
  std::string configFile = vm.count("config") ? vm["config"].as<std::string>() : "";
  if (configFile.empty()) {
    if (const char* env = std::getenv("PARDIT_CONFIG")) configFile = env;
  }
  if (!configFile.empty()) {
    std::ifstream in(configFile);
    PARDIT_CHECK(in.good(), configFile, ": cannot open config file (--config)");
    try {
      po::store(po::parse_config_file(in, desc, /*allow_unregistered=*/false), vm);
    } catch (const po::error& e) {
      PARDIT_THROW(configFile, ": ", e.what());
    }
  }
  po::notify(vm);
  c.configFile = configFile;
  return result;
}

}  // namespace pardit::config
