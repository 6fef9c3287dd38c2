#pragma once
// safetensors reader and writer.
//
// The reader parses and fully validates the header on open (length bounded by the file size and by
// kMaxHeaderBytes, JSON syntax, known dtypes, shape x dtype size == data_offsets span, offsets inside
// the data area, no overlaps and no holes) and then reads single tensors -- or row ranges of them --
// with pread(). It never maps or reads the whole file. Every error names the file and the tensor.

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace pardit::io {

// Largest header accepted (the reference implementation's limit).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct TensorInfo {
  std::string name;
  std::string dtype;           // safetensors dtype string, e.g. "BF16"
  std::vector<int64_t> shape;  // [] for a scalar
  uint64_t begin = 0;          // offsets relative to the start of the data area
  uint64_t end = 0;
  int bits = 0;  // bits per element

  uint64_t nbytes() const { return end - begin; }
  int64_t numel() const;
  // Bytes of one row along dim 0 (the whole tensor for scalars).
  uint64_t rowBytes() const;
  int64_t rows() const { return shape.empty() ? 1 : shape[0]; }
};

class SafetensorsFile {
 public:
  // Opens and validates; throws pardit::Error with "<path>: ..." on any problem.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t fileSize() const { return fileSize_; }
  uint64_t dataOffset() const { return dataOffset_; }  // 8 + header length
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // All tensors in data-offset order.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const TensorInfo* find(const std::string& name) const;
  // Throws "<path>: tensor 'name' not found".
  const TensorInfo& info(const std::string& name) const;

  // Reads a whole tensor into a new contiguous CPU tensor of its stored dtype.
  at::Tensor read(const std::string& name) const;
  // Reads rows [rowBegin, rowEnd) along dim 0 (a contiguous byte range).
  at::Tensor readRows(const std::string& name, int64_t rowBegin, int64_t rowEnd) const;
  // Reads `nbytes` bytes starting `offset` bytes into tensor `info` into `dst`.
  void readBytes(const TensorInfo& info, uint64_t offset, uint64_t nbytes, void* dst) const;

  // Bytes of tensor data read through this handle so far (atomic: a prefetch thread may be reading).
  uint64_t bytesRead() const { return bytesRead_->load(std::memory_order_relaxed); }
  // FNV-1a hash of the header bytes, and the file size: what ranks compare to know they read the same file.
  uint64_t headerHash() const { return headerHash_; }
  // FNV-1a hash of three 4 KiB windows of the tensor data (its start, middle and end): cheap, and different
  // for two files with the same layout but other weights (a fine-tune, another seed). Not counted as read.
  uint64_t sampleHash() const;

 private:
  SafetensorsFile() = default;
  void parseHeader(const std::string& header);

  std::string path_;
  int fd_ = -1;
  uint64_t fileSize_ = 0;
  uint64_t dataOffset_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
  uint64_t headerHash_ = 0;
  std::shared_ptr<std::atomic<uint64_t>> bytesRead_ = std::make_shared<std::atomic<uint64_t>>(0);
};

// Writes a safetensors file. Tensors are produced one at a time (a producer callback per tensor), so
// writing a multi-gigabyte checkpoint needs memory for one tensor only. The file is written to
// "<path>.tmp" and renamed on success, so a failed write never leaves a half-written file under the
// final name.
class SafetensorsWriter {
 public:
  using Producer = std::function<at::Tensor()>;

  void addMetadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  // Adds a tensor that is already in memory.
  void add(const std::string& name, const at::Tensor& tensor);
  // Adds a tensor whose data is produced when the file is written; the produced tensor must match
  // dtype and shape. A null producer writes zeros without touching the disk (sparse file).
  void addLazy(const std::string& name, c10::ScalarType dtype, std::vector<int64_t> shape, Producer producer);
  size_t size() const { return entries_.size(); }
  uint64_t totalBytes() const;
  void write(const std::string& path) const;

 private:
  struct Entry {
    std::string name;
    c10::ScalarType dtype;
    std::vector<int64_t> shape;
    Producer producer;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Convenience: write a map of in-memory tensors.
void writeSafetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Checks, before any work, that `path` can be written as an output of `flag`: its directory exists, and
// the path is not a directory or any other non-regular file. Throws naming the flag.
void checkOutputPath(const std::string& path, const std::string& flag);

}  // namespace pardit::io
