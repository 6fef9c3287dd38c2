#include "pardit/pipeline/queue.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <tuple>

#include "pardit/core/dtype.h"
#include "pardit/core/error.h"
#include "pardit/core/files.h"
#include "pardit/core/format.h"
#include "pardit/core/log.h"
#include "pardit/core/timer.h"
#include "pardit/dist/runtime.h"
#include "pardit/dist/watchdog.h"
#include "pardit/io/png.h"
#include "pardit/metrics/metrics.h"
#include "pardit/pipeline/latents.h"
#include "rank_setup.h"

namespace pardit::pipeline {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kManifest = "manifest.jsonl";

int envInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  PARDIT_CHECK(end && *end == '\0', "--shard auto: ", name, "='", v, "' is not an integer");
  return static_cast<int>(x);
}

// A JSON value of a queue line as the field's type, with errors naming FILE:LINE:FIELD.
struct LineReader {
  std::string where;  // "FILE:LINE"
  const json& obj;

  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    PARDIT_THROW(where, ":", field, ": expected ", what, ", got ", obj.at(field).dump());
  }
  std::optional<std::string> text(const std::string& field) const {
    if (!obj.contains(field)) return std::nullopt;
    if (!obj.at(field).is_string()) fail(field, "a string");
    return obj.at(field).get<std::string>();
  }
  std::optional<int64_t> integer(const std::string& field, int64_t lowest) const {
    if (!obj.contains(field)) return std::nullopt;
    const json& v = obj.at(field);
    if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > INT64_MAX) ||
        v.get<int64_t>() < lowest)
      fail(field, "an integer >= " + std::to_string(lowest));
    return v.get<int64_t>();
  }
  std::optional<uint64_t> seed(const std::string& field) const {
    if (!obj.contains(field)) return std::nullopt;
    const json& v = obj.at(field);
    if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<int64_t>() >= 0))
      fail(field, "an integer from 0 to 2^64-1");
    return v.get<uint64_t>();
  }
  std::optional<double> number(const std::string& field) const {
    if (!obj.contains(field)) return std::nullopt;
    const json& v = obj.at(field);
    if (!v.is_number() || !std::isfinite(v.get<double>())) fail(field, "a finite number");
    return v.get<double>();
  }
};

const std::vector<std::string>& knownFields() {
  static const std::vector<std::string> f{
      "prompt",         "prompt_2",       "negative_prompt",     "seed",  "width", "height", "steps",
      "guidance_scale", "true_cfg_scale", "max_sequence_length", "output"};
  return f;
}

std::string trimRight(std::string s) {
  while (!s.empty() && (s.back() == '\r' || s.back() == '\n' || s.back() == ' ' || s.back() == '\t')) s.pop_back();
  return s;
}

bool blank(const std::string& s) { return s.find_first_not_of(" \t\r\n") == std::string::npos; }

// A relative name inside the output directory, without "..".
void checkRelativeName(const std::string& name, const std::string& where) {
  PARDIT_CHECK(!name.empty(), where, ": the output name is empty");
  const fs::path p(name);
  PARDIT_CHECK(p.is_relative(), where, ": output '", name, "' must be relative to --output-dir");
  for (const auto& part : p) PARDIT_CHECK(part != "..", where, ": output '", name, "' leaves --output-dir ('..')");
  PARDIT_CHECK(p.extension() == ".png", where, ": output '", name, "' must name a .png file");
}

// Appends one line to the manifest: a single write under an exclusive lock, then fsync, so lines from
// several writers (replica groups, shards) never interleave and a finished line survives a crash.
void appendManifest(const std::string& dir, const json& line) {
  const std::string path = (fs::path(dir) / kManifest).string();
  const std::string text = line.dump() + "\n";
  const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  PARDIT_CHECK(fd >= 0, path, ": cannot open the manifest for appending: ", std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  PARDIT_CHECK(::flock(fd, LOCK_EX) == 0, path, ": cannot lock the manifest: ", std::strerror(errno));
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    PARDIT_CHECK(n > 0, path, ": cannot append to the manifest: ", std::strerror(errno));
    done += static_cast<size_t>(n);
  }
  ::fsync(fd);
  ::flock(fd, LOCK_UN);
}

// The indices the manifest already has a line for (a torn last line, from a crash, is ignored).
std::set<int64_t> manifestIndices(const std::string& dir) {
  std::set<int64_t> out;
  std::ifstream in(fs::path(dir) / kManifest);
  std::string line;
  while (std::getline(in, line)) {
    const json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("index") && j["index"].is_number_integer()) out.insert(j["index"].get<int64_t>());
  }
  return out;
}

json manifestLine(const QueueItem& item, int group, const GenerateResult* result, double queueWait) {
  json j;
  j["index"] = item.index;
  j["file"] = item.file;
  j["prompt"] = item.request.prompt.texts.empty() ? std::string() : item.request.prompt.texts[0];
  j["seed"] = item.request.seed;
  j["width"] = item.request.width;
  j["height"] = item.request.height;
  j["steps"] = item.request.steps;
  if (result) {
    const RunReport& r = result->report;
    j["seconds"] = {{"queue_wait", queueWait}, {"encode", r.encodeSeconds}, {"load", r.loadSeconds},
                    {"denoise", r.runSeconds}, {"decode", r.decodeSeconds}, {"write", r.writeSeconds}};
    j["group"] = group;
  } else {
    j["recovered"] = true;  // the image was made by an earlier job that stopped before its manifest line
  }
  return j;
}

// Whether every rank of `rt` passed `ok`.
bool allOk(dist::Runtime& rt, bool ok) { return detail::worldReduce(rt, ok ? 1.0 : 0.0, dist::ReduceOp::kMin) == 1.0; }

// The largest signal number any rank of `rt` has recorded (0: none).
int agreedStop(dist::Runtime& rt) {
  return static_cast<int>(detail::worldReduce(rt, stopSignal(), dist::ReduceOp::kMax));
}

// Work a request is predicted to take, to deal requests to the replica groups evenly.
double cost(const GenerateRequest& r, int64_t textTokens) {
  const double tokens = static_cast<double>(r.height / 16) * static_cast<double>(r.width / 16);
  return r.steps * (tokens + static_cast<double>(textTokens)) * (r.trueCfgScale > 1.0 ? 2.0 : 1.0);
}

struct StopGuard {
  bool on;
  explicit StopGuard(bool enable) : on(enable) {
    if (on) enableGracefulStop();
  }
  ~StopGuard() {
    if (on) disableGracefulStop();
  }
};

}  // namespace

std::pair<int, int> parseShard(const std::string& text) {
  if (text.empty()) return {0, 1};
  if (text == "auto") {
    const int count = envInt("SLURM_ARRAY_TASK_COUNT", 1);
    const int id = envInt("SLURM_ARRAY_TASK_ID", 0) - envInt("SLURM_ARRAY_TASK_MIN", 0);
    PARDIT_CHECK(count >= 1 && id >= 0 && id < count, "--shard auto: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN = ", id,
                 " is not below SLURM_ARRAY_TASK_COUNT = ", count, " (an array with steps? pass --shard I/N)");
    return {id, count};
  }
  const auto slash = text.find('/');
  int i = -1, n = 0;
  try {
    size_t a = 0, b = 0;
    PARDIT_CHECK(slash != std::string::npos, "");
    i = std::stoi(text.substr(0, slash), &a);
    n = std::stoi(text.substr(slash + 1), &b);
    PARDIT_CHECK(a == slash && b == text.size() - slash - 1, "");
  } catch (const std::exception&) {
    PARDIT_THROW("--shard must be I/N (0 <= I < N) or auto, got '", text, "'");
  }
  PARDIT_CHECK(n >= 1 && i >= 0 && i < n, "--shard must be I/N with 0 <= I < N, got '", text, "'");
  return {i, n};
}

std::string formatOutputName(const std::string& tmpl, int64_t index, int64_t line, const GenerateRequest& r) {
  std::string out;
  for (size_t pos = 0; pos < tmpl.size();) {
    const char c = tmpl[pos];
    if (c != '{') {
      PARDIT_CHECK(c != '}', "--output-name '", tmpl, "': a '}' without its '{'");
      out += c;
      ++pos;
      continue;
    }
    const size_t close = tmpl.find('}', pos);
    PARDIT_CHECK(close != std::string::npos, "--output-name '", tmpl, "': a '{' without its '}'");
    std::string field = tmpl.substr(pos + 1, close - pos - 1);
    int width = 0;
    if (const auto colon = field.find(':'); colon != std::string::npos) {
      const std::string spec = field.substr(colon + 1);
      PARDIT_CHECK(!spec.empty() && spec.size() <= 3 && spec.find_first_not_of("0123456789") == std::string::npos &&
                       spec[0] == '0',
                   "--output-name '", tmpl, "': {", field, "}: the width must be written 0N (e.g. {index:05})");
      width = std::stoi(spec);
      field = field.substr(0, colon);
    }
    uint64_t value = 0;
    if (field == "index")
      value = static_cast<uint64_t>(index);
    else if (field == "seed")
      value = r.seed;
    else if (field == "width")
      value = static_cast<uint64_t>(r.width);
    else if (field == "height")
      value = static_cast<uint64_t>(r.height);
    else if (field == "steps")
      value = static_cast<uint64_t>(r.steps);
    else if (field == "line")
      value = static_cast<uint64_t>(line);
    else
      PARDIT_THROW("--output-name '", tmpl, "': unknown field {", field,
                   "}; expected {index}, {seed}, {width}, {height}, {steps} or {line}");
    std::string digits = std::to_string(value);
    if (static_cast<int>(digits.size()) < width) digits.insert(0, static_cast<size_t>(width) - digits.size(), '0');
    out += digits;
    pos = close + 1;
  }
  return out;
}

std::vector<QueueItem> readQueue(const QueueOptions& q, const GenerateRequest& defaults) {
  PARDIT_CHECK(!q.promptFile.empty(), "--prompt-file needs a file");
  PARDIT_CHECK(!q.outputDir.empty(), "--prompt-file needs --output-dir DIR for its images (and manifest.jsonl)");
  std::ifstream in(q.promptFile);
  PARDIT_CHECK(in.good(), q.promptFile, ": cannot open (--prompt-file)");
  registerInputFile(q.promptFile);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(trimRight(line));
  PARDIT_CHECK(!in.bad(), q.promptFile, ": read error (--prompt-file)");
  // JSONL when the first non-empty line is an object; then every line must be one.
  bool jsonl = false;
  for (const auto& l : lines)
    if (!blank(l)) {
      jsonl = l.find_first_not_of(" \t") != std::string::npos && l[l.find_first_not_of(" \t")] == '{';
      break;
    }
  std::vector<QueueItem> items;
  std::map<std::string, int64_t> outputs;  // file -> line
  for (size_t n = 0; n < lines.size(); ++n) {
    if (blank(lines[n])) continue;
    QueueItem item;
    item.index = static_cast<int64_t>(items.size());
    item.line = static_cast<int64_t>(n) + 1;
    const std::string where = q.promptFile + ":" + std::to_string(item.line);
    GenerateRequest r = defaults;
    r.prompt = PromptInput{};
    r.negativePrompt = PromptInput{};
    r.saveLatents.clear();
    r.decode = true;
    r.indices = {item.index};
    bool seedGiven = false;
    std::string output;
    if (!jsonl) {
      r.prompt.texts = {lines[n]};
      if (!defaults.negativePrompt.texts.empty()) r.negativePrompt.texts = defaults.negativePrompt.texts;
    } else {
      json obj = json::parse(lines[n], nullptr, /*allow_exceptions=*/false);
      PARDIT_CHECK(!obj.is_discarded(), where, ": not valid JSON (the file is JSONL: one object per line)");
      PARDIT_CHECK(obj.is_object(), where, ": expected a JSON object, got ", obj.dump());
      for (const auto& [key, value] : obj.items()) {
        const auto& known = knownFields();
        if (std::find(known.begin(), known.end(), key) == known.end()) {
          std::string list;
          for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
          PARDIT_THROW(where, ":", key, ": unknown field (expected ", list, ")");
        }
      }
      const LineReader f{where, obj};
      const auto prompt = f.text("prompt");
      PARDIT_CHECK(prompt.has_value(), where, ":prompt: missing (every line needs a prompt)");
      PARDIT_CHECK(!blank(*prompt), where, ":prompt: empty");
      r.prompt.texts = {*prompt};
      if (auto v = f.text("prompt_2")) r.prompt.texts2 = {*v};
      if (auto v = f.text("negative_prompt"))
        r.negativePrompt.texts = {*v};
      else if (!defaults.negativePrompt.texts.empty())
        r.negativePrompt.texts = defaults.negativePrompt.texts;
      if (auto v = f.seed("seed")) {
        r.seed = *v;
        seedGiven = true;
      }
      if (auto v = f.integer("width", 16)) r.width = *v;
      if (auto v = f.integer("height", 16)) r.height = *v;
      if (auto v = f.integer("steps", 1)) {
        if (*v > std::numeric_limits<int>::max()) f.fail("steps", "an integer from 1 to 2147483647");
        r.steps = static_cast<int>(*v);
      }
      if (auto v = f.number("guidance_scale")) r.guidanceScale = *v;
      if (auto v = f.number("true_cfg_scale")) r.trueCfgScale = *v;
      if (auto v = f.integer("max_sequence_length", 0)) r.maxSequenceLength = *v;
      if (auto v = f.text("output")) output = *v;
    }
    // A line without a seed: the default seed + its index (wrapping as unsigned arithmetic does).
    if (!seedGiven) r.seed = defaults.seed + static_cast<uint64_t>(item.index);
    try {
      if (r.negativePrompt.texts.empty() && r.trueCfgScale > 1.0)
        PARDIT_THROW("true_cfg_scale ", formatNumber(r.trueCfgScale), " needs a negative_prompt");
      item.file = output.empty() ? formatOutputName(q.outputName, item.index, item.line, r) : output;
      checkRelativeName(item.file, where);
      r.output = (fs::path(q.outputDir) / item.file).lexically_normal().string();
      r.check();
    } catch (const Error& e) {
      const std::string& m = e.message();
      PARDIT_THROW(m.rfind(where, 0) == 0 ? m : where + ": " + m);
    }
    const auto [it, fresh] = outputs.emplace(item.file, item.line);
    PARDIT_CHECK(fresh, where, ": output '", item.file, "' is also the output of line ", it->second);
    item.request = std::move(r);
    items.push_back(std::move(item));
  }
  PARDIT_CHECK(!items.empty(), q.promptFile, ": no prompts (--prompt-file)");
  return items;
}

QueueReport runQueue(const EngineOptions& options, dist::Runtime& world, const QueueOptions& q,
                     const GenerateRequest& defaults) {
  Timer jobTimer;
  // From here on a signal stops the job between two images (after loading, before the first, when it came
  // earlier); the running image and the final count are never cut short by the first one.
  const StopGuard guard(q.gracefulStop);
  QueueReport report;
  std::vector<QueueItem> items;
  // 1. The whole queue, on every rank, before anything else.
  world.agree([&] {
    options.check();
    PARDIT_CHECK(world.worldSize() == options.worldSize(), "the job has ", world.worldSize(),
                 " ranks, but --data-parallel-degree ", options.dataParallelDegree, " x (",
                 options.degrees().describe(), ") needs ", options.worldSize());
    PARDIT_CHECK(q.shardCount >= 1 && q.shardIndex >= 0 && q.shardIndex < q.shardCount, "--shard ", q.shardIndex, "/",
                 q.shardCount, " is not I/N with 0 <= I < N");
    PARDIT_CHECK(q.batchSize >= 1, "--batch-size must be at least 1, got ", q.batchSize);
    items = readQueue(q, defaults);
    if (options.cfgDegree > 1)
      for (const auto& item : items)
        PARDIT_CHECK(item.request.trueCfgScale > 1.0, q.promptFile, ":", item.line, ": --cfg-degree ",
                     options.cfgDegree,
                     " runs the two branches of true CFG: every request needs a negative_prompt and "
                     "true_cfg_scale > 1");
    std::error_code ec;
    fs::create_directories(q.outputDir, ec);
    PARDIT_CHECK(fs::is_directory(q.outputDir), "--output-dir ", q.outputDir, ": cannot create the directory",
                 ec ? ": " + ec.message() : std::string());
    for (const auto& item : items) {
      const fs::path parent = fs::path(item.request.output).parent_path();
      fs::create_directories(parent, ec);
      PARDIT_CHECK(fs::is_directory(parent), q.promptFile, ":", item.line, ": cannot create the directory ",
                   parent.string(), " for output '", item.file, "'");
      checkReplaceable(item.request.output, q.promptFile + ":" + std::to_string(item.line) + ": output");
    }
    // Writable: a temporary file made and removed (permissions alone do not tell, e.g. a read-only mount).
    const std::string probe = temporaryPathFor((fs::path(q.outputDir) / kManifest).string());
    const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    PARDIT_CHECK(fd >= 0, "--output-dir ", q.outputDir, ": cannot write there: ", std::strerror(errno));
    ::close(fd);
    ::unlink(probe.c_str());
  });
  std::string all;
  for (const auto& item : items) {
    const GenerateRequest& r = item.request;
    all += item.file + '\0' + r.prompt.texts.at(0) + '\0' + (r.prompt.texts2.empty() ? "" : r.prompt.texts2[0]) + '\0' +
           (r.negativePrompt.texts.empty() ? "" : r.negativePrompt.texts[0]) + '\0' + std::to_string(r.seed) + ',' +
           std::to_string(r.width) + 'x' + std::to_string(r.height) + ',' + std::to_string(r.steps) + ',' +
           formatNumber(r.guidanceScale) + ',' + formatNumber(r.trueCfgScale) + ',' +
           std::to_string(r.maxSequenceLength) + '\0';
  }
  world.agree([&] {
    world.checkSame(
        {{"the queue", std::to_string(items.size()) + " requests, " + formatHash(fnv1a(all.data(), all.size()))}},
        "the prompt file", "every rank must read the same prompt file");
  });
  report.total = static_cast<int64_t>(items.size());
  std::vector<QueueItem> shard;
  for (auto& item : items)
    if (item.index % q.shardCount == q.shardIndex) shard.push_back(std::move(item));
  report.shard = static_cast<int64_t>(shard.size());

  // 2. One engine per replica group (headers only).
  std::unique_ptr<dist::Runtime> groupRt = world.replicaGroup(options.dataParallelDegree);
  const int groups = options.dataParallelDegree;
  const int group = world.worldRank() / groupRt->worldSize();
  const bool leader = groupRt->worldRank() == 0;
  std::optional<Engine> engine;
  bool ok = true;
  try {
    engine.emplace(options, *groupRt);
  } catch (const dist::CollectiveFailure&) {
    ok = false;
  }
  if (!allOk(world, ok)) throw dist::CollectiveFailure(0);

  // 3. Resume: an existing output with this request's parameters is done; one with others is an error
  // (unless --overwrite). Every rank looks, and all must see the same (a shared output directory).
  std::vector<char> done(shard.size(), 0);
  world.agree([&] {
    for (size_t i = 0; i < shard.size(); ++i) {
      const std::string& path = shard[i].request.output;
      std::error_code ec;
      if (!fs::exists(fs::symlink_status(path, ec))) continue;
      const std::string where = q.promptFile + ":" + std::to_string(shard[i].line);
      PARDIT_CHECK(fs::is_regular_file(path), where, ": output ", path, " exists and is not a regular file");
      std::string found;
      try {
        for (const auto& [key, value] : io::readPngText(path))
          if (key == "pardit-request") found = value;
      } catch (const Error&) {
        found.clear();  // not a PNG pardit can read: not this request's image
      }
      if (found == engine->imageIdentity(shard[i].request)) {
        done[i] = 1;
        continue;
      }
      PARDIT_CHECK(q.overwrite, where, ": output ", path,
                   " exists and was not made from this request (another prompt, seed, size, steps or model); pass "
                   "--overwrite to replace it, or choose another --output-dir");
    }
    std::string seen;
    for (char d : done) seen += d ? '1' : '0';
    world.checkSame({{"outputs found", formatHash(fnv1a(seen.data(), seen.size()))}}, "the output directory",
                    "every rank must see the same --output-dir (a shared file system)");
  });
  std::vector<size_t> pending;
  for (size_t i = 0; i < shard.size(); ++i)
    if (!done[i]) pending.push_back(i);
  report.skipped = report.shard - static_cast<int64_t>(pending.size());
  // Images made by a job that stopped between writing them and their manifest line get their line now.
  if (world.worldRank() == 0 && report.skipped > 0) {
    const std::set<int64_t> listed = manifestIndices(q.outputDir);
    for (size_t i = 0; i < shard.size(); ++i)
      if (done[i] && !listed.count(shard[i].index))
        appendManifest(q.outputDir, manifestLine(shard[i], group, nullptr, 0));
  }
  if (report.skipped > 0)
    logInfo0("queue: ", report.skipped, " of ", report.shard, " requests already made in ", q.outputDir,
             " (same parameters, read from the PNGs); ", pending.size(), " to make");

  // 4. Each shape among the pending requests checked on its group (layout, VAE, outputs, memory plan: what
  // readQueue could not check alone), and one plan for the largest, before any weight is read.
  const int64_t defaultT = engine->modelConfig().guidanceEmbed ? 512 : 256;
  auto textTokens = [&](const GenerateRequest& r) { return r.maxSequenceLength > 0 ? r.maxSequenceLength : defaultT; };
  try {
    int64_t maxTokens = 0, maxText = 0, maxH = 16, maxW = 16;
    bool anyCfg = false;
    std::set<std::tuple<int64_t, int64_t, int64_t, bool, bool>> shapes;
    for (size_t i : pending) {
      const GenerateRequest& r = shard[i].request;
      if (shapes.emplace(r.height, r.width, textTokens(r), r.trueCfgScale > 1.0, !r.prompt.texts2.empty()).second)
        engine->check(r);
      const int64_t tokens = (r.height / 16) * (r.width / 16);
      if (tokens > maxTokens) {
        maxTokens = tokens;
        maxH = r.height;
        maxW = r.width;
      }
      maxText = std::max(maxText, textTokens(r));
      anyCfg |= r.trueCfgScale > 1.0;
    }
    if (!pending.empty())
      engine->reserve(std::min<int64_t>(q.batchSize, static_cast<int64_t>(pending.size())), maxH, maxW, maxText,
                      anyCfg);
  } catch (const dist::CollectiveFailure&) {
    ok = false;
  }
  if (!allOk(world, ok)) throw dist::CollectiveFailure(0);

  // 5. Deal: each request to the group predicted to be free first (the same on every rank).
  std::vector<double> load(static_cast<size_t>(groups), 0.0);
  std::vector<size_t> mine;
  for (size_t i : pending) {
    const auto g = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    load[g] += cost(shard[i].request, textTokens(shard[i].request));
    if (static_cast<int>(g) == group) mine.push_back(i);
  }
  if (groups > 1)
    logInfo0("queue: ", pending.size(), " requests dealt to ", groups, " replica groups of ", groupRt->worldSize(),
             groupRt->worldSize() == 1 ? " rank" : " ranks", " (", options.degrees().describe(), ")");

  // 6. Batches of this group's requests: each with up to --batch-size later ones of the same shape, in order.
  auto sameShape = [&](const GenerateRequest& a, const GenerateRequest& b) {
    return a.height == b.height && a.width == b.width && a.steps == b.steps && a.guidanceScale == b.guidanceScale &&
           a.trueCfgScale == b.trueCfgScale && textTokens(a) == textTokens(b) && a.schedule == b.schedule;
  };
  std::vector<std::vector<size_t>> batches;
  std::vector<char> taken(mine.size(), 0);
  for (size_t k = 0; k < mine.size(); ++k) {
    if (taken[k]) continue;
    batches.push_back({mine[k]});
    taken[k] = 1;
    for (size_t l = k + 1; l < mine.size() && static_cast<int>(batches.back().size()) < q.batchSize; ++l)
      if (!taken[l] && sameShape(shard[mine[k]].request, shard[mine[l]].request)) {
        batches.back().push_back(mine[l]);
        taken[l] = 1;
      }
  }

  // 7. Make them, one batch after the other; between two, the group agrees on whether a signal asked it to stop.
  int64_t made = 0;
  int stop = 0;
  try {
    for (const auto& batch : batches) {
      stop = agreedStop(*groupRt);
      if (stop) break;
      const double wait = jobTimer.seconds();
      Timer t;
      // The batch as one request: each image with its own prompt, seed, output and index.
      GenerateRequest request = shard[batch[0]].request;
      request.prompt = PromptInput{};
      request.negativePrompt = PromptInput{};
      request.output.clear();
      request.indices.clear();
      bool second = false;
      for (size_t i : batch) second |= !shard[i].request.prompt.texts2.empty();
      for (size_t i : batch) {
        const GenerateRequest& r = shard[i].request;
        request.prompt.texts.push_back(r.prompt.texts.at(0));
        if (second)
          request.prompt.texts2.push_back(r.prompt.texts2.empty() ? r.prompt.texts.at(0) : r.prompt.texts2[0]);
        if (r.trueCfgScale > 1.0) request.negativePrompt.texts.push_back(r.negativePrompt.texts.at(0));
        request.seeds.push_back(r.seed);
        request.outputs.push_back(r.output);
        request.indices.push_back(shard[i].index);
      }
      request.queueMetrics = {
          {"index", static_cast<double>(shard[batch[0]].index)}, {"line", static_cast<double>(shard[batch[0]].line)},
          {"batch", static_cast<double>(batch.size())},          {"replica_group", static_cast<double>(group)},
          {"replica_groups", static_cast<double>(groups)},       {"queue_wait_s", wait}};
      const GenerateResult result = engine->generate(request);
      made += static_cast<int64_t>(batch.size());
      if (leader) {
        for (size_t b = 0; b < batch.size(); ++b) {
          const QueueItem& item = shard[batch[b]];
          json line = manifestLine(item, group, &result, wait);
          line["batch"] = batch.size();
          appendManifest(q.outputDir, line);
          logInfo(groups > 1 ? "group " + std::to_string(group) + ": " : std::string(), "image ", item.index, " (line ",
                  item.line, ") -> ", item.request.output, " in ", formatSeconds(t.seconds()),
                  batch.size() > 1 ? " (a batch of " + std::to_string(batch.size()) + ")" : std::string(), " [",
                  made - static_cast<int64_t>(batch.size() - b) + 1, "/", mine.size(),
                  groups > 1 ? " of this group" : "", "]");
        }
      }
    }
    if (!stop) stop = agreedStop(*groupRt);
  } catch (const dist::CollectiveFailure&) {
    ok = false;
  }
  // 8. Every group's count (groups finish at different times: no time limit on this wait).
  const double timeout = world.watchdog().timeout();
  world.watchdog().setTimeout(0.0);
  const bool failed = detail::worldReduce(world, ok ? 0.0 : 1.0, dist::ReduceOp::kMax) > 0;
  const int64_t left = static_cast<int64_t>(mine.size()) - made;
  report.made = static_cast<int64_t>(detail::worldReduce(world, leader ? made : 0, dist::ReduceOp::kSum));
  report.remaining = static_cast<int64_t>(detail::worldReduce(world, leader ? left : 0, dist::ReduceOp::kSum));
  report.stopSignal = static_cast<int>(detail::worldReduce(world, stop, dist::ReduceOp::kMax));
  world.watchdog().setTimeout(timeout);
  if (failed) throw dist::CollectiveFailure(0);
  report.seconds = jobTimer.seconds();
  report.imagesPerHour = report.seconds > 0 ? static_cast<double>(report.made) * 3600.0 / report.seconds : 0.0;
  // The job as one more run of --metrics: its wall time as its one step, images made, per-job rates.
  if (!options.metrics.empty()) {
    metrics::MetricsRecorder recorder(world);
    recorder.addStep(report.seconds);
    recorder.setTotalSeconds(report.seconds);
    metrics::RunInfo info;
    info.command = "queue";
    info.config = options.provenance;
    info.model = engine->modelName();
    info.device = engine->device().str();
    info.images = report.made;
    info.steps = 1;
    info.dtype = dtypeName(engine->dtype());
    const double made = static_cast<double>(report.made);
    info.queue = {{"requests", static_cast<double>(report.total)},
                  {"shard_requests", static_cast<double>(report.shard)},
                  {"skipped", static_cast<double>(report.skipped)},
                  {"made", made},
                  {"remaining", static_cast<double>(report.remaining)},
                  {"replica_groups", static_cast<double>(groups)},
                  {"seconds", report.seconds},
                  {"images_per_hour", report.imagesPerHour},
                  {"device_seconds_per_image", made > 0 ? report.seconds * world.worldSize() / made : 0.0}};
    const std::string id = recorder.write(options.metrics, info);
    logInfo0("metrics: appended the queue job as run ", id, " to ", options.metrics);
  }
  return report;
}

}  // namespace pardit::pipeline
