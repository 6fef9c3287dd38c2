#include "pardit/io/quantize.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "json_file.h"
#include "pardit/core/dtype.h"
#include "pardit/core/error.h"
#include "pardit/core/files.h"
#include "pardit/io/checkpoint.h"
#include "pardit/io/safetensors.h"
#include "pardit/io/text_encoder_checkpoint.h"
#include "pardit/model/fp8.h"
#include "pardit/model/text_encoders.h"

namespace fs = std::filesystem;

namespace pardit::io {

namespace {

const char* kFlag = "--out";

// The file tensors that hold FP8-eligible model weights, by file path.
std::map<std::string, std::set<std::string>> eligibleTensors(const FluxCheckpoint& ck) {
  std::map<std::string, std::set<std::string>> out;
  for (const auto& g : model::fluxWeightGroups(ck.config()))
    for (const auto& t : g.tensors)
      if (model::fluxFp8Eligible(t.name))
        for (const auto& p : ck.source(t.name).pieces) out[p.file->path()].insert(p.tensor);
  return out;
}

// Writes `file` to `target` with its eligible tensors in FP8; returns the tensor bytes written.
uint64_t writeQuantized(const std::shared_ptr<SafetensorsFile>& file, const std::set<std::string>& eligible,
                        const fs::path& target, QuantizeResult& result) {
  SafetensorsWriter w;
  for (const auto& [k, v] : file->metadata()) w.addMetadata(k, v);
  w.addMetadata("pardit_fp8",
                "float8_e4m3fn block linear weights with per-output-row float32 scales in "
                "<layer>.weight_scale");
  for (const auto& t : file->tensors()) {
    const std::string name = t.name;
    if (eligible.count(name)) {
      PARDIT_CHECK(t.shape.size() == 2, file->path(), ": tensor '", name, "' is not a 2-D weight");
      // Both producers quantize the same tensor the same way (deterministic): the scales are written
      // first, so keeping the values between the two would hold every weight in memory at once.
      w.addLazy(name, at::kFloat8_e4m3fn, t.shape,
                [file, name] { return model::quantizeFp8Rows(file->read(name)).values; });
      w.addLazy(model::fp8ScaleName(name), at::kFloat, {t.shape[0]},
                [file, name] { return model::quantizeFp8Rows(file->read(name)).scale; });
      ++result.weightsQuantized;
    } else {
      w.addLazy(name, safetensorsToScalarType(t.dtype), t.shape, [file, name] { return file->read(name); });
    }
    result.bytesIn += t.nbytes();
  }
  w.write(target.string());
  return w.totalBytes();
}

// Links (hard link, else a copy) `from` as `to`, replacing an earlier output there.
void linkOrCopy(const fs::path& from, const fs::path& to, QuantizeResult& result) {
  if (fs::exists(to) && fs::equivalent(from, to)) return;  // already linked by an earlier run
  checkReplaceable(to.string(), kFlag);
  fs::create_directories(to.parent_path());
  std::error_code ec;
  if (fs::exists(to)) fs::remove(to);
  fs::create_hard_link(from, to, ec);
  if (ec) {
    TemporaryFile tmp(to.string());
    fs::copy_file(from, tmp.path(), fs::copy_options::overwrite_existing);
    tmp.commit(kFlag);
  }
  result.linked.push_back(to.string());
}

// Every regular file under `dir` (recursively when asked) except those under `skip`, mirrored into `out`.
void linkTree(const fs::path& dir, const fs::path& out, const std::vector<fs::path>& skip, bool recursive,
              QuantizeResult& result) {
  auto skipped = [&](const fs::path& p) {
    for (const auto& s : skip)
      if (fs::exists(s) && fs::equivalent(p, s)) return true;
    return false;
  };
  for (const auto& e : fs::directory_iterator(dir)) {
    if (skipped(e.path())) continue;
    if (e.is_directory()) {
      if (recursive) linkTree(e.path(), out / e.path().filename(), skip, true, result);
    } else if (e.is_regular_file()) {
      linkOrCopy(e.path(), out / e.path().filename(), result);
    }
  }
}

bool isFloat8Dtype(const std::string& safetensorsDtype) { return safetensorsDtype.rfind("F8_", 0) == 0; }

fs::path fp8Name(const fs::path& file) { return file.stem().string() + "-fp8" + file.extension().string(); }

}  // namespace

namespace {

// The FP8 copy of a model folder of shards (FLUX transformer/, T5 text_encoder_2/): each file with the
// tensors `eligible` picks in FP8, config.json, and the index (when there is one) with the scales added.
void quantizeFolder(const std::vector<std::shared_ptr<SafetensorsFile>>& files,
                    const std::function<std::set<std::string>(const SafetensorsFile&)>& eligible, const fs::path& in,
                    const fs::path& out, const std::string& indexName, QuantizeResult& r) {
  fs::create_directories(out);
  uint64_t total = 0;
  std::map<std::string, std::string> scales;  // scale tensor -> its file
  for (const auto& f : files) {
    const std::set<std::string> names = eligible(*f);
    const std::string target = fs::path(f->path()).filename().string();
    total += writeQuantized(f, names, out / target, r);
    for (const auto& n : names) scales[model::fp8ScaleName(n)] = target;
  }
  r.bytesOut += total;
  if (fs::exists(in / "config.json"))
    detail::writeTextFile(out / "config.json", detail::readJsonFile(in / "config.json").dump(2) + "\n", kFlag);
  if (fs::exists(in / indexName)) {
    nlohmann::json j = detail::readJsonFile(in / indexName);
    for (const auto& [scale, file] : scales) j["weight_map"][scale] = file;
    j["metadata"]["total_size"] = total;
    detail::writeTextFile(out / indexName, j.dump(2) + "\n", kFlag);
  }
}

std::set<std::string> t5Eligible(const SafetensorsFile& f) {
  std::set<std::string> out;
  for (const auto& t : f.tensors())
    if (model::t5Fp8Eligible(t.name) && !isFloat8Dtype(t.dtype)) out.insert(t.name);
  return out;
}

// T5 in FP8 unless it already is.
bool t5NeedsQuantizing(const std::string& path) {
  return T5Checkpoint::open(path).storedFormat() == model::WeightFormat::kDense;
}

}  // namespace

QuantizeResult quantizeCheckpoint(const std::string& modelPath, const std::string& outDir) {
  PARDIT_CHECK(!outDir.empty(), "--out is required (the folder to write the FP8 checkpoint to)");
  const FluxCheckpoint ck = FluxCheckpoint::open(modelPath);
  for (const auto& f : ck.files()) registerInputFile(f->path());
  PARDIT_CHECK(ck.storedFormat() != model::WeightFormat::kFp8, modelPath,
               ": already an FP8 checkpoint (float8_e4m3fn block weights); pardit runs it as it is");
  const fs::path in(modelPath), out(outDir);
  PARDIT_CHECK(!fs::exists(out) || fs::is_directory(out), "--out ", outDir, ": exists and is not a directory");
  if (fs::is_directory(in))
    PARDIT_CHECK(!fs::exists(out) || !fs::equivalent(in, out), "--out ", outDir,
                 ": is the input folder; name a new folder for the FP8 checkpoint");
  fs::create_directories(out);
  const auto eligible = eligibleTensors(ck);
  QuantizeResult r;
  if (ck.layout() == CheckpointLayout::kBfl) {
    const auto& file = ck.files().front();
    const fs::path target = out / fp8Name(file->path());
    auto it = eligible.find(file->path());
    r.bytesOut += writeQuantized(file, it == eligible.end() ? std::set<std::string>{} : it->second, target, r);
    r.modelPath = target.string();
    // A folder of BFL files: the other parts come along, so OUT runs as the input did; T5 (t5xxl_fp16 or
    // t5xxl) in FP8 as t5xxl_fp8_e4m3fn_scaled.safetensors.
    if (fs::is_directory(in)) {
      std::vector<fs::path> skip = {file->path(), out};
      for (const char* name : {"t5xxl_fp16.safetensors", "t5xxl.safetensors"}) {
        const fs::path t5 = in / name;
        if (!fs::exists(t5) || !t5NeedsQuantizing(t5.string())) continue;
        auto f = SafetensorsFile::open(t5.string());
        registerInputFile(t5.string());
        r.bytesOut += writeQuantized(f, t5Eligible(*f), out / "t5xxl_fp8_e4m3fn_scaled.safetensors", r);
        r.t5Quantized = true;
        skip.push_back(t5);
        break;
      }
      linkTree(in, out, skip, /*recursive=*/false, r);
      r.modelPath = out.string();
    }
    return r;
  }
  // diffusers: the transformer folder of the checkpoint, and the pipeline folder above it when there is one.
  const fs::path tdir = fs::path(ck.files().front()->path()).parent_path();
  const bool pipelineFolder = fs::is_directory(in) && fs::exists(in / "transformer" / "config.json");
  quantizeFolder(
      ck.files(),
      [&](const SafetensorsFile& f) {
        auto it = eligible.find(f.path());
        return it == eligible.end() ? std::set<std::string>{} : it->second;
      },
      tdir, pipelineFolder ? out / "transformer" : out, "diffusion_pytorch_model.safetensors.index.json", r);
  r.modelPath = out.string();
  if (!pipelineFolder) return r;
  std::vector<fs::path> skip = {tdir, out};
  // The pipeline's T5 (text_encoder_2/) in FP8 too, unless it already is.
  const fs::path t5dir = in / "text_encoder_2";
  if (fs::exists(t5dir / "config.json") && t5NeedsQuantizing(t5dir.string())) {
    std::vector<std::shared_ptr<SafetensorsFile>> files;
    for (const auto& e : fs::directory_iterator(t5dir))
      if (e.is_regular_file() && e.path().extension() == ".safetensors") {
        files.push_back(SafetensorsFile::open(e.path().string()));
        registerInputFile(e.path().string());
      }
    quantizeFolder(files, t5Eligible, t5dir, out / "text_encoder_2", "model.safetensors.index.json", r);
    r.t5Quantized = true;
    skip.push_back(t5dir);
  }
  linkTree(in, out, skip, /*recursive=*/true, r);
  return r;
}

}  // namespace pardit::io
