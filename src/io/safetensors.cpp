#include "pardit/io/safetensors.h"

#include <filesystem>

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "pardit/core/dtype.h"
#include "pardit/core/error.h"
#include "pardit/core/files.h"
#include "pardit/core/format.h"

namespace pardit::io {

namespace {
constexpr uint64_t kMaxDim = uint64_t{1} << 48;  // integers in shape/offsets fit in 48 bits

std::string errnoText() { return std::strerror(errno); }

// pread() the whole range or throw.
void preadAll(int fd, void* dst, uint64_t nbytes, uint64_t offset, const std::string& what) {
  auto* p = static_cast<char*>(dst);
  while (nbytes > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(nbytes, uint64_t{1} << 30));
    ssize_t got = ::pread(fd, p, chunk, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      PARDIT_THROW(what, ": read failed: ", errnoText());
    }
    PARDIT_CHECK(got != 0, what, ": unexpected end of file at byte ", offset, " (file truncated?)");
    p += got;
    offset += static_cast<uint64_t>(got);
    nbytes -= static_cast<uint64_t>(got);
  }
}

void writeAll(int fd, const void* src, uint64_t nbytes, const std::string& path) {
  const auto* p = static_cast<const char*>(src);
  while (nbytes > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(nbytes, uint64_t{1} << 30));
    ssize_t put = ::write(fd, p, chunk);
    if (put < 0) {
      if (errno == EINTR) continue;
      PARDIT_THROW(path, ": write failed: ", errnoText());
    }
    p += put;
    nbytes -= static_cast<uint64_t>(put);
  }
}
}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

uint64_t TensorInfo::rowBytes() const {
  if (shape.empty() || shape[0] == 0) return nbytes();
  return nbytes() / static_cast<uint64_t>(shape[0]);
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  PARDIT_CHECK(file->fd_ >= 0, path, ": cannot open: ", errnoText());
  struct stat st {};
  PARDIT_CHECK(::fstat(file->fd_, &st) == 0, path, ": cannot stat: ", errnoText());
  PARDIT_CHECK(S_ISREG(st.st_mode), path, ": not a regular file");
  registerInputFile(path);  // no output of this run may replace it
  file->fileSize_ = static_cast<uint64_t>(st.st_size);
  PARDIT_CHECK(file->fileSize_ >= 8, path, ": not a safetensors file (", file->fileSize_,
               " bytes, shorter than the 8-byte header length)");
  unsigned char lenBytes[8];
  preadAll(file->fd_, lenBytes, 8, 0, path);
  uint64_t headerLen = 0;
  for (int i = 7; i >= 0; --i) headerLen = (headerLen << 8) | lenBytes[i];
  PARDIT_CHECK(headerLen <= kMaxHeaderBytes, path, ": header length ", headerLen, " exceeds the maximum of ",
               kMaxHeaderBytes, " bytes (corrupt or not a safetensors file)");
  PARDIT_CHECK(headerLen <= file->fileSize_ - 8, path, ": header length ", headerLen, " exceeds the file size ",
               file->fileSize_, " (truncated or corrupt file)");
  PARDIT_CHECK(headerLen >= 2, path, ": header length ", headerLen, " is too small for a JSON object");
  std::string header(headerLen, '\0');
  preadAll(file->fd_, header.data(), headerLen, 8, path);
  file->headerHash_ = fnv1a(header.data(), header.size());
  file->dataOffset_ = 8 + headerLen;
  file->parseHeader(header);
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) ::close(fd_);
}

uint64_t SafetensorsFile::sampleHash() const {
  const uint64_t data = fileSize_ - dataOffset_, window = std::min<uint64_t>(4096, data);
  uint64_t h = kFnvOffset;
  std::string buf(window, '\0');
  for (uint64_t start : {uint64_t{0}, (data - window) / 2, data - window}) {
    preadAll(fd_, buf.data(), window, dataOffset_ + start, path_);
    h = fnv1a(buf.data(), buf.size(), h);
  }
  return h;
}

void SafetensorsFile::parseHeader(const std::string& header) {
  PARDIT_CHECK(header[0] == '{', path_, ": header does not start with '{' (not a safetensors file)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(header);
  } catch (const nlohmann::json::exception& e) {
    PARDIT_THROW(path_, ": header is not valid JSON: ", e.what());
  }
  PARDIT_CHECK(j.is_object(), path_, ": header is not a JSON object");
  const uint64_t dataSize = fileSize_ - dataOffset_;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      PARDIT_CHECK(v.is_object(), path_, ": __metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        PARDIT_CHECK(m.value().is_string(), path_, ": __metadata__ value '", m.key(), "' is not a string");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = path_ + ": tensor '" + name + "'";
    PARDIT_CHECK(v.is_object(), where, ": entry is not an object");
    PARDIT_CHECK(v.contains("dtype") && v["dtype"].is_string(), where, ": missing dtype");
    PARDIT_CHECK(v.contains("shape") && v["shape"].is_array(), where, ": missing shape");
    PARDIT_CHECK(v.contains("data_offsets") && v["data_offsets"].is_array() && v["data_offsets"].size() == 2, where,
                 ": missing or malformed data_offsets");
    TensorInfo t;
    t.name = name;
    t.dtype = v["dtype"].get<std::string>();
    PARDIT_CHECK(safetensorsDtypeBits(t.dtype, &t.bits), where, ": unknown dtype '", t.dtype, "'");
    unsigned __int128 numel = 1;
    for (const auto& d : v["shape"]) {
      PARDIT_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0), where,
                   ": shape entries must be non-negative integers");
      const uint64_t dim = d.get<uint64_t>();
      PARDIT_CHECK(dim < kMaxDim, where, ": shape entry ", dim, " is too large");
      t.shape.push_back(static_cast<int64_t>(dim));
      numel *= dim;
      PARDIT_CHECK(numel < (static_cast<unsigned __int128>(1) << 64), where, ": shape is too large");
    }
    for (const auto& o : v["data_offsets"]) {
      PARDIT_CHECK(o.is_number_unsigned() || (o.is_number_integer() && o.get<int64_t>() >= 0), where,
                   ": data_offsets must be non-negative integers");
    }
    t.begin = v["data_offsets"][0].get<uint64_t>();
    t.end = v["data_offsets"][1].get<uint64_t>();
    PARDIT_CHECK(t.begin <= t.end, where, ": data_offsets [", t.begin, ", ", t.end, "] are reversed");
    const unsigned __int128 expect = (numel * static_cast<unsigned>(t.bits) + 7) / 8;
    PARDIT_CHECK(expect == t.end - t.begin, where, ": shape x dtype size is ", static_cast<uint64_t>(expect),
                 " bytes but data_offsets span ", t.end - t.begin, " bytes");
    PARDIT_CHECK(t.end <= dataSize, where, ": data_offsets end ", t.end, " lies beyond the data area of ", dataSize,
                 " bytes (truncated file?)");
    index_[name] = 0;
    tensors_.push_back(std::move(t));
  }
  std::stable_sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t cursor = 0;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const TensorInfo& t = tensors_[i];
    PARDIT_CHECK(t.begin >= cursor, path_, ": tensor '", t.name, "' overlaps tensor '", tensors_[i - 1].name, "'");
    PARDIT_CHECK(t.begin == cursor, path_, ": gap of ", t.begin - cursor, " bytes before tensor '", t.name,
                 "' in the data area");
    cursor = t.end;
    index_[t.name] = i;
  }
  PARDIT_CHECK(cursor == dataSize, path_, ": data area has ", dataSize, " bytes but tensors cover ", cursor,
               " (truncated file or trailing garbage)");
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  const TensorInfo* t = find(name);
  PARDIT_CHECK(t != nullptr, path_, ": tensor '", name, "' not found");
  return *t;
}

void SafetensorsFile::readBytes(const TensorInfo& t, uint64_t offset, uint64_t nbytes, void* dst) const {
  PARDIT_CHECK(offset + nbytes <= t.nbytes(), path_, ": tensor '", t.name, "': read of ", nbytes, " bytes at offset ",
               offset, " is outside the tensor");
  preadAll(fd_, dst, nbytes, dataOffset_ + t.begin + offset, path_ + ": tensor '" + t.name + "'");
  bytesRead_->fetch_add(nbytes, std::memory_order_relaxed);
}

at::Tensor SafetensorsFile::read(const std::string& name) const {
  const TensorInfo& t = info(name);
  return readRows(name, 0, t.rows());
}

at::Tensor SafetensorsFile::readRows(const std::string& name, int64_t rowBegin, int64_t rowEnd) const {
  const TensorInfo& t = info(name);
  c10::ScalarType type;
  try {
    type = safetensorsToScalarType(t.dtype);
  } catch (const Error& e) {
    PARDIT_THROW(path_, ": tensor '", name, "': ", e.message());
  }
  PARDIT_CHECK(0 <= rowBegin && rowBegin <= rowEnd && rowEnd <= t.rows(), path_, ": tensor '", name, "': rows [",
               rowBegin, ", ", rowEnd, ") out of range (", t.rows(), " rows)");
  std::vector<int64_t> shape = t.shape;
  if (!shape.empty()) shape[0] = rowEnd - rowBegin;
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(type));
  const uint64_t nbytes = static_cast<uint64_t>(rowEnd - rowBegin) * t.rowBytes();
  if (nbytes > 0) readBytes(t, static_cast<uint64_t>(rowBegin) * t.rowBytes(), nbytes, out.data_ptr());
  return out;
}

// ------------------------------------------------------------------------------------------------

void SafetensorsWriter::add(const std::string& name, const at::Tensor& tensor) {
  at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
  addLazy(name, t.scalar_type(), t.sizes().vec(), [t] { return t; });
}

void SafetensorsWriter::addLazy(const std::string& name, c10::ScalarType dtype, std::vector<int64_t> shape,
                                Producer producer) {
  for (const auto& e : entries_) PARDIT_CHECK(e.name != name, "safetensors writer: duplicate tensor '", name, "'");
  PARDIT_CHECK(name != "__metadata__", "safetensors writer: reserved tensor name '__metadata__'");
  entries_.push_back({name, dtype, std::move(shape), std::move(producer)});
}

uint64_t SafetensorsWriter::totalBytes() const {
  uint64_t total = 0;
  for (const auto& e : entries_) {
    uint64_t n = c10::elementSize(e.dtype);
    for (int64_t d : e.shape) n *= static_cast<uint64_t>(d);
    total += n;
  }
  return total;
}

void SafetensorsWriter::write(const std::string& path) const {
  // Layout like the reference writer: descending alignment (element size), then name.
  std::vector<const Entry*> order;
  for (const auto& e : entries_) order.push_back(&e);
  std::stable_sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
    const size_t sa = c10::elementSize(a->dtype), sb = c10::elementSize(b->dtype);
    return sa != sb ? sa > sb : a->name < b->name;
  });
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata_) meta[k] = v;
    header["__metadata__"] = meta;
  }
  std::vector<uint64_t> sizes;
  uint64_t offset = 0;
  for (const Entry* e : order) {
    uint64_t n = c10::elementSize(e->dtype);
    for (int64_t d : e->shape) n *= static_cast<uint64_t>(d);
    nlohmann::ordered_json entry;
    entry["dtype"] = scalarTypeToSafetensors(e->dtype);
    entry["shape"] = e->shape;
    entry["data_offsets"] = {offset, offset + n};
    header[e->name] = entry;
    sizes.push_back(n);
    offset += n;
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');
  const uint64_t headerLen = text.size();
  const uint64_t total = 8 + headerLen + offset;

  TemporaryFile temp(path);
  const std::string& tmp = temp.path();
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  PARDIT_CHECK(fd >= 0, path, ": cannot create ", tmp, ": ", errnoText());
  try {
    unsigned char lenBytes[8];
    for (int i = 0; i < 8; ++i) lenBytes[i] = static_cast<unsigned char>((headerLen >> (8 * i)) & 0xff);
    writeAll(fd, lenBytes, 8, tmp);
    writeAll(fd, text.data(), text.size(), tmp);
    uint64_t pos = 8 + headerLen;
    for (size_t i = 0; i < order.size(); ++i) {
      const Entry* e = order[i];
      if (!e->producer) {  // zeros: leave a hole, the final ftruncate makes the file sparse
        pos += sizes[i];
        PARDIT_CHECK(::lseek(fd, static_cast<off_t>(pos), SEEK_SET) >= 0, tmp, ": seek failed: ", errnoText());
        continue;
      }
      at::Tensor t = e->producer().contiguous();
      PARDIT_CHECK(t.scalar_type() == e->dtype && t.sizes().vec() == e->shape, "safetensors writer: tensor '", e->name,
                   "' was produced with the wrong dtype or shape");
      if (!t.device().is_cpu()) t = t.cpu();
      writeAll(fd, t.data_ptr(), sizes[i], tmp);
      pos += sizes[i];
    }
    PARDIT_CHECK(::ftruncate(fd, static_cast<off_t>(total)) == 0, tmp, ": truncate failed: ", errnoText());
    PARDIT_CHECK(::close(fd) == 0, tmp, ": close failed: ", errnoText());
    fd = -1;
  } catch (...) {
    if (fd >= 0) ::close(fd);
    throw;  // the temporary is removed by its guard
  }
  temp.commit(path);
}

void writeSafetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  SafetensorsWriter w;
  for (const auto& [k, v] : metadata) w.addMetadata(k, v);
  for (const auto& [name, t] : tensors) w.add(name, t);
  w.write(path);
}

void checkOutputPath(const std::string& path, const std::string& flag) {
  namespace fs = std::filesystem;
  PARDIT_CHECK(!path.empty(), flag, " needs a file name");
  const fs::path p(path);
  std::error_code ec;
  const auto status = fs::status(p, ec);
  PARDIT_CHECK(!fs::is_directory(status), flag, " ", path, ": is a directory, expected a file name");
  checkReplaceable(path, flag);
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  PARDIT_CHECK(fs::is_directory(dir, ec), flag, " ", path, ": directory ", dir.string(), " does not exist");
}

}  // namespace pardit::io
