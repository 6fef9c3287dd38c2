#pragma once
// FLUX transformer checkpoint discovery and layout mapping.
//
// Accepted: a diffusers pipeline directory (transformer/config.json with a single
// diffusion_pytorch_model.safetensors or shards listed in diffusion_pytorch_model.safetensors.index.json),
// the transformer directory itself, or a BFL single file (flux1-dev.safetensors style names, optional
// "model.diffusion_model." prefix; the config is inferred from tensor shapes).
//
// Both layouts map onto pardit's internal names (model/flux_config.h). A diffusers tensor that is
// split where the internal one is fused (q|k|v, linear1) becomes several row ranges; the final
// layer's scale|shift halves are swapped to shift|scale by reading the two row ranges in the other
// order. Loading reads only the byte ranges of the requested tensor.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "pardit/io/safetensors.h"
#include "pardit/model/flux.h"
#include "pardit/model/flux_config.h"
#include "pardit/model/fp8.h"

namespace pardit::io {

enum class CheckpointLayout { kDiffusers, kBfl };
std::string layoutName(CheckpointLayout layout);

struct TensorPiece {
  std::shared_ptr<SafetensorsFile> file;
  std::string tensor;  // name inside the file
  int64_t rowBegin = 0;
  int64_t rowEnd = 0;  // rows along dim 0 (1 row for scalars)
  // A float8 weight's scale tensor when the file has one ("<layer>.weight_scale" or ComfyUI's
  // "<layer>.scale_weight": one value for the tensor, or one per row); empty for plain casts.
  std::shared_ptr<SafetensorsFile> scaleFile;
  std::string scaleTensor;
};

// Bytes of one tensor in a file, to be read as they are stored.
struct StoredRange {
  std::shared_ptr<SafetensorsFile> file;
  const TensorInfo* tensor = nullptr;  // owned by `file`
  uint64_t offset = 0;                 // into the tensor's data
  uint64_t bytes = 0;
};

struct TensorSource {
  std::string name;  // internal name
  std::vector<int64_t> shape;
  std::vector<TensorPiece> pieces;  // concatenated along dim 0
  uint64_t nbytes() const;          // bytes read from disk to load it (with the scales of FP8 pieces)
};

class FluxCheckpoint {
 public:
  // Discovers, opens every file's header and validates all tensor names and shapes against the
  // model configuration. Reads no tensor data.
  static FluxCheckpoint open(const std::string& path);

  const std::string& path() const { return path_; }
  CheckpointLayout layout() const { return layout_; }
  const model::FluxConfig& config() const { return config_; }
  // The dtype the weights are stored in (of the first block's largest tensor).
  c10::ScalarType storedDtype() const { return storedDtype_; }
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }

  bool has(const std::string& name) const { return sources_.count(name) != 0; }
  const TensorSource& source(const std::string& name) const;
  // Reads one tensor (only its bytes), converted to dtype and moved to device (FP8 pieces are
  // dequantized with their scales).
  at::Tensor load(const std::string& name, c10::ScalarType dtype, c10::Device device = c10::kCPU) const;
  // A 2-D weight as FP8 rows on `quantizeOn`: stored float8_e4m3fn values with their scales (1 for plain
  // casts) as they are, anything else quantized row by row (model/fp8.h) there (the rows move there first:
  // a GPU quantizes far faster than the CPU).
  model::Fp8Rows loadFp8(const std::string& name, c10::Device quantizeOn = c10::kCPU) const;
  // The file ranges whose bytes, concatenated, are internal tensor `name` in `dtype` (its pieces' rows in
  // order): when every piece is stored in `dtype` with no scale to apply; for float8_e4m3fn, the values of
  // an FP8 weight whose scales (loadFp8Scale) are read apart. Empty when the tensor must be converted while
  // loading (another stored dtype, a scaled float8 weight read densely). For readers that copy bytes
  // without going through load(); the tensor counts as loaded.
  std::vector<StoredRange> storedRanges(const std::string& name, c10::ScalarType dtype) const;
  // The [rows] float32 row scales of a weight stored as float8_e4m3fn (1 for plain casts) without reading
  // its values; a weight stored otherwise is quantized (loadFp8) to find them. Checked finite and positive.
  at::Tensor loadFp8Scale(const std::string& name) const;
  // Whether every piece of a tensor is stored as float8_e4m3fn.
  bool storedFp8(const std::string& name) const;
  // kFp8 when the blocks' linear weights are stored as float8_e4m3fn (an FP8 checkpoint), else kDense.
  model::WeightFormat storedFormat() const { return storedFormat_; }
  model::WeightGetter getter(c10::ScalarType dtype, c10::Device device = c10::kCPU) const;

  uint64_t bytesRead() const;  // tensor bytes read through this checkpoint so far
  // Internal names of the tensors loaded so far (each tensor's bytes are read once per load).
  // A copy: the streamer's prefetch thread may be loading while another thread asks.
  std::set<std::string> tensorsLoaded() const;
  uint64_t totalBytes() const;  // bytes of all model tensors
  // What opening found questionable but could go on without: tensors the model does not use, an invalid
  // model_index.json. Warnings by default; errors under --strict (the caller decides).
  const std::vector<std::string>& findings() const { return findings_; }
  // How the transformer was found (e.g. which file of a folder was chosen), for the log.
  const std::string& choice() const { return choice_; }

 private:
  void addSource(TensorSource source) { sources_[source.name] = std::move(source); }
  static at::Tensor readScale(const TensorPiece& piece);  // [rows] float32
  void validate() const;

  std::string path_;
  CheckpointLayout layout_ = CheckpointLayout::kBfl;
  model::FluxConfig config_;
  c10::ScalarType storedDtype_ = c10::kFloat;
  model::WeightFormat storedFormat_ = model::WeightFormat::kDense;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, TensorSource> sources_;
  mutable std::shared_ptr<std::mutex> loadedMutex_ = std::make_shared<std::mutex>();  // guards loaded_
  mutable std::set<std::string> loaded_;
  std::vector<std::string> findings_;
  std::string choice_;

  friend class CheckpointBuilder;
};

// The diffusers tensors an internal tensor is made of: the internal tensor is the concatenation along
// dim 0 of rows [rowBegin, rowEnd) of each piece's tensor, which has `rows` rows in total.
struct DiffusersPiece {
  std::string name;
  int64_t rowBegin = 0;
  int64_t rowEnd = 0;
  int64_t rows = 0;
};
std::vector<DiffusersPiece> diffusersSourcesOf(const std::string& internalName, const model::FluxConfig& config);

// diffusers transformer/config.json content for a config.
std::string diffusersConfigJson(const model::FluxConfig& config);

}  // namespace pardit::io
