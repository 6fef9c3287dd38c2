#include "pardit/metrics/metrics.h"

#include <ATen/ATen.h>
#include <hdf5.h>
#include <mpi.h>
#include <torch/version.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <random>
#include <sstream>
#include <thread>

#include "pardit/core/error.h"
#include "pardit/core/files.h"
#include "pardit/core/format.h"
#include "pardit/core/log.h"
#include "pardit/core/timer.h"
#include "pardit/io/safetensors.h"
#include "pardit/version.h"

#if defined(PARDIT_WITH_NCCL)
#include <nccl.h>
#endif

namespace fs = std::filesystem;

namespace pardit::metrics {

constexpr double kMetricsLockWaitSeconds = 600;

const std::vector<std::string>& collectiveKinds() {
  static const std::vector<std::string> kinds = {"all_to_all", "all_gather", "broadcast", "all_reduce", "send_recv"};
  return kinds;
}

std::string libtorchVersion() { return TORCH_VERSION; }

void checkMetricsFile(const std::string& path) {
  io::checkOutputPath(path, "--metrics");
  if (!fs::exists(path)) return;
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  PARDIT_CHECK(H5Fis_hdf5(path.c_str()) > 0, "--metrics ", path,
               ": exists and is not an HDF5 file; refusing to append to it");
}

std::string mpiVersion() {
  char buf[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(buf, &len);
  std::string s(buf, len);
  return s.substr(0, s.find_first_of(",\n"));
}

std::string ncclVersion() {
#if defined(PARDIT_WITH_NCCL)
  int v = 0;
  if (ncclGetVersion(&v) == ncclSuccess) {
    std::ostringstream os;
    os << v / 10000 << "." << (v / 100) % 100 << "." << v % 100;
    return os.str();
  }
#endif
  return "none";
}

std::string hdf5Version() {
  unsigned maj = 0, min = 0, rel = 0;
  H5get_libversion(&maj, &min, &rel);
  return std::to_string(maj) + "." + std::to_string(min) + "." + std::to_string(rel);
}

namespace {
double nowSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

void MetricsRecorder::beginStep() {
  before_ = rt_.collectiveTotals();
  stepStart_ = nowSeconds();
}

void MetricsRecorder::endStep() {
  stepSeconds_.push_back(nowSeconds() - stepStart_);
  const auto after = rt_.collectiveTotals();
  std::vector<double> secs;
  std::vector<uint64_t> bytes;
  for (const auto& k : collectiveKinds()) {
    const auto a = after.count(k) ? after.at(k) : dist::CollectiveStats{};
    const auto b = before_.count(k) ? before_.at(k) : dist::CollectiveStats{};
    secs.push_back(a.seconds - b.seconds);
    bytes.push_back(a.bytes - b.bytes);
  }
  commSeconds_.push_back(secs);
  commBytes_.push_back(bytes);
}

void MetricsRecorder::addStep(double seconds) {
  stepSeconds_.push_back(seconds);
  commSeconds_.emplace_back(collectiveKinds().size(), 0.0);
  commBytes_.emplace_back(collectiveKinds().size(), 0);
}

void MetricsRecorder::setLoad(double seconds, uint64_t bytesRead) {
  loadSeconds_ = seconds;
  bytesRead_ = bytesRead;
}

void MetricsRecorder::addStage(const std::string& name, double seconds, uint64_t bytes) {
  stageNames_.push_back(name);
  stageSeconds_.push_back(seconds);
  stageBytes_.push_back(static_cast<int64_t>(bytes));
}

void MetricsRecorder::setPeaks(uint64_t deviceBytes, uint64_t hostRssBytes) {
  peakDevice_ = deviceBytes;
  peakRss_ = hostRssBytes;
}

namespace {

// RAII for HDF5 identifiers; never throws from the destructor.
struct H5Id {
  hid_t id;
  herr_t (*close)(hid_t);
  H5Id(hid_t i, herr_t (*c)(hid_t), const std::string& what) : id(i), close(c) {
    PARDIT_CHECK(id >= 0, "HDF5: ", what, " failed");
  }
  ~H5Id() {
    if (id >= 0) close(id);
  }
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
};

void attrString(hid_t obj, const std::string& name, const std::string& value) {
  H5Id type(H5Tcopy(H5T_C_S1), H5Tclose, "string type");
  H5Tset_size(type.id, H5T_VARIABLE);
  H5Tset_cset(type.id, H5T_CSET_UTF8);
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose, "scalar space");
  H5Id attr(H5Acreate2(obj, name.c_str(), type.id, space.id, H5P_DEFAULT, H5P_DEFAULT), H5Aclose, "attribute " + name);
  const char* p = value.c_str();
  PARDIT_CHECK(H5Awrite(attr.id, type.id, &p) >= 0, "HDF5: writing attribute ", name);
}

template <typename T>
void attrScalar(hid_t obj, const std::string& name, T value, hid_t type) {
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose, "scalar space");
  H5Id attr(H5Acreate2(obj, name.c_str(), type, space.id, H5P_DEFAULT, H5P_DEFAULT), H5Aclose, "attribute " + name);
  PARDIT_CHECK(H5Awrite(attr.id, type, &value) >= 0, "HDF5: writing attribute ", name);
}

template <typename T>
void dataset(hid_t loc, const std::string& name, const std::vector<hsize_t>& dims, const std::vector<T>& data,
             hid_t type, const std::string& units) {
  H5Id space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose, "space");
  H5Id ds(H5Dcreate2(loc, name.c_str(), type, space.id, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose,
          "dataset " + name);
  if (!data.empty())
    PARDIT_CHECK(H5Dwrite(ds.id, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data()) >= 0, "HDF5: writing ", name);
  attrString(ds.id, "units", units);
}

hid_t openOrCreateGroup(hid_t loc, const char* name) {
  if (H5Lexists(loc, name, H5P_DEFAULT) > 0) return H5Gopen2(loc, name, H5P_DEFAULT);
  return H5Gcreate2(loc, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
}

std::string utcNow(const char* fmt) {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[64];
  std::strftime(buf, sizeof(buf), fmt, &tm);
  return buf;
}

}  // namespace

namespace {

// Every rank's record, gathered: one tensor per quantity with the rank as dim 0.
struct Gathered {
  at::Tensor stepSeconds;                     // [R, S] double
  at::Tensor commSeconds;                     // [R, S, K] double
  at::Tensor commBytes;                       // [R, S, K] int64
  at::Tensor loadSeconds, totalSeconds;       // [R] double
  at::Tensor bytesRead, peakDevice, peakRss;  // [R] int64
  std::vector<std::string> hosts, devices;
  std::vector<std::string> stages;  // stage names; times [R, stages] and bytes [R, stages]
  at::Tensor stageSeconds, stageBytes;
};

std::vector<std::string> gatherStrings(dist::Communicator& world, const std::string& mine, size_t width) {
  at::Tensor slot = at::zeros({static_cast<int64_t>(width)}, at::kByte);
  std::memcpy(slot.data_ptr(), mine.data(), std::min(width - 1, mine.size()));
  at::Tensor all = dist::allGather(world, slot);
  std::vector<std::string> out;
  for (int64_t r = 0; r < all.size(0); ++r) out.emplace_back(reinterpret_cast<const char*>(all[r].data_ptr()));
  return out;
}

template <typename T>
std::vector<T> values(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return std::vector<T>(c.data_ptr<T>(), c.data_ptr<T>() + c.numel());
}

std::vector<hsize_t> dimsOf(const at::Tensor& t) {
  std::vector<hsize_t> d;
  for (auto s : t.sizes()) d.push_back(static_cast<hsize_t>(s));
  return d;
}

void doubles(hid_t loc, const std::string& name, const at::Tensor& t, const std::string& units) {
  dataset(loc, name, dimsOf(t), values<double>(t.to(at::kDouble)), H5T_NATIVE_DOUBLE, units);
}

void counts(hid_t loc, const std::string& name, const at::Tensor& t, const std::string& units) {
  std::vector<uint64_t> v;
  for (int64_t x : values<int64_t>(t.to(at::kLong))) v.push_back(static_cast<uint64_t>(x));
  dataset(loc, name, dimsOf(t), v, H5T_NATIVE_UINT64, units);
}

std::string joined(const std::vector<std::string>& items) {
  std::string s;
  for (size_t i = 0; i < items.size(); ++i) s += (i ? "," : "") + items[i];
  return s;
}

void writeProvenance(hid_t run, const RunInfo& info, const Gathered& g, const dist::Topology& topo) {
  std::ostringstream cfg;
  for (const auto& [k, v] : info.config) cfg << k << " = " << v << "\n";
  attrString(run, "command", info.command);
  attrString(run, "pardit_version", PARDIT_VERSION);
  attrString(run, "git_commit", PARDIT_GIT_COMMIT);
  attrString(run, "date", utcNow("%Y-%m-%dT%H:%M:%SZ"));
  attrString(run, "hosts", joined(g.hosts));
  attrString(run, "devices", joined(g.devices));
  attrString(run, "libtorch_version", libtorchVersion());
  attrString(run, "mpi_version", mpiVersion());
  attrString(run, "nccl_version", ncclVersion());
  attrString(run, "hdf5_version", hdf5Version());
  attrString(run, "config", cfg.str());
  attrString(run, "model", info.model);
  attrString(run, "dtype", info.dtype);
  attrString(run, "device", info.device);
  attrScalar<int64_t>(run, "height", info.height, H5T_NATIVE_INT64);
  attrScalar<int64_t>(run, "width", info.width, H5T_NATIVE_INT64);
  attrScalar<int32_t>(run, "steps", info.steps, H5T_NATIVE_INT32);
  attrScalar<int64_t>(run, "images", info.images, H5T_NATIVE_INT64);
  attrScalar<int32_t>(run, "world_size", static_cast<int32_t>(g.hosts.size()), H5T_NATIVE_INT32);
  const auto& d = topo.degrees();
  attrScalar<int32_t>(run, "cfg_degree", d.cfg, H5T_NATIVE_INT32);
  attrScalar<int32_t>(run, "pipefusion_degree", d.pipefusion, H5T_NATIVE_INT32);
  attrScalar<int32_t>(run, "ring_degree", d.ring, H5T_NATIVE_INT32);
  attrScalar<int32_t>(run, "ulysses_degree", d.ulysses, H5T_NATIVE_INT32);
  if (!info.queue.empty()) {
    H5Id q(H5Gcreate2(run, "queue", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose, "group queue");
    for (const auto& [name, value] : info.queue) attrScalar<double>(q.id, name, value, H5T_NATIVE_DOUBLE);
  }
}

void writeStepData(hid_t run, const Gathered& g) {
  doubles(run, "step_time", g.stepSeconds, "s");
  doubles(run, "compute_time", at::clamp_min(g.stepSeconds - g.commSeconds.sum(2), 0.0), "s");
  H5Id ct(H5Gcreate2(run, "comm_time", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose, "group comm_time");
  H5Id cb(H5Gcreate2(run, "comm_bytes", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose, "group comm_bytes");
  for (size_t k = 0; k < collectiveKinds().size(); ++k) {
    const auto kind = static_cast<int64_t>(k);
    doubles(ct.id, collectiveKinds()[k], g.commSeconds.select(2, kind), "s");
    counts(cb.id, collectiveKinds()[k], g.commBytes.select(2, kind), "bytes sent to other ranks");
  }
}

void writeRankData(hid_t run, const Gathered& g) {
  if (!g.stages.empty()) {
    H5Id st(H5Gcreate2(run, "stages", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose, "group stages");
    for (size_t i = 0; i < g.stages.size(); ++i) {
      const auto k = static_cast<int64_t>(i);
      doubles(st.id, g.stages[i] + "_time", g.stageSeconds.select(1, k), "s");
      counts(st.id, g.stages[i] + "_bytes", g.stageBytes.select(1, k), "bytes");
    }
  }
  doubles(run, "load_time", g.loadSeconds, "s");
  counts(run, "bytes_read", g.bytesRead, "bytes");
  counts(run, "peak_device_memory", g.peakDevice, "bytes (0 on CPU)");
  counts(run, "peak_host_rss", g.peakRss, "bytes");
}

// The slowest rank defines each step.
void writeSummary(hid_t run, const RunInfo& info, const Gathered& g) {
  const at::Tensor worst = std::get<0>(g.stepSeconds.max(0));  // [S]
  const int64_t S = worst.numel();
  const double latency = worst.sum().item<double>();
  const int64_t counted = std::max<int64_t>(0, S - info.warmupSteps);
  const double meanAfter = counted > 0 ? worst.narrow(0, S - counted, counted).mean().item<double>() : 0.0;
  double total = g.totalSeconds.numel() ? g.totalSeconds.max().item<double>() : 0.0;
  if (total <= 0) total = latency;
  H5Id sum(H5Gcreate2(run, "summary", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose, "group summary");
  attrScalar<double>(sum.id, "total_latency_s", total, H5T_NATIVE_DOUBLE);
  attrScalar<double>(sum.id, "mean_step_time_s", meanAfter, H5T_NATIVE_DOUBLE);
  attrScalar<double>(sum.id, "images_per_second", total > 0 ? info.images / total : 0.0, H5T_NATIVE_DOUBLE);
  attrScalar<int32_t>(sum.id, "warmup_steps", info.warmupSteps, H5T_NATIVE_INT32);
  attrScalar<int32_t>(sum.id, "steps", static_cast<int32_t>(S), H5T_NATIVE_INT32);
}

// ---- /run_index: one row per run, for tables (pandas, CSV) -----------------------------------------------

// Attributes of earlier runs may be missing (files from older versions): the fallback then.
std::string readString(hid_t obj, const char* name, const std::string& fallback = "") {
  if (H5Aexists(obj, name) <= 0) return fallback;
  H5Id a(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose, std::string("attribute ") + name);
  H5Id t(H5Tcopy(H5T_C_S1), H5Tclose, "string type");
  H5Tset_size(t.id, H5T_VARIABLE);
  H5Tset_cset(t.id, H5T_CSET_UTF8);
  char* v = nullptr;
  if (H5Aread(a.id, t.id, &v) < 0 || v == nullptr) return fallback;
  std::string out(v);
  H5free_memory(v);
  return out;
}

template <typename T>
T readNumber(hid_t obj, const char* name, hid_t type, T fallback) {
  if (H5Aexists(obj, name) <= 0) return fallback;
  H5Id a(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose, std::string("attribute ") + name);
  T v = fallback;
  return H5Aread(a.id, type, &v) >= 0 ? v : fallback;
}

uint64_t datasetMax(hid_t run, const char* name) {
  if (H5Lexists(run, name, H5P_DEFAULT) <= 0) return 0;
  H5Id ds(H5Dopen2(run, name, H5P_DEFAULT), H5Dclose, std::string("dataset ") + name);
  H5Id sp(H5Dget_space(ds.id), H5Sclose, "space");
  std::vector<uint64_t> v(static_cast<size_t>(std::max<hssize_t>(0, H5Sget_simple_extent_npoints(sp.id))));
  if (v.empty() || H5Dread(ds.id, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()) < 0) return 0;
  return *std::max_element(v.begin(), v.end());
}

struct IndexRow {
  const char *id, *date, *command, *model, *dtype, *device;
  int64_t height, width, images;
  int32_t steps, worldSize, cfg, pipefusion, ring, ulysses;
  double totalLatency, meanStepTime, imagesPerSecond;
  uint64_t peakHostRss, peakDeviceMemory;
};

// A row's strings live here while the row is written.
struct IndexStrings {
  std::string id, date, command, model, dtype, device;
};

IndexRow indexRow(hid_t runs, const std::string& id, IndexStrings& keep) {
  H5Id run(H5Gopen2(runs, id.c_str(), H5P_DEFAULT), H5Gclose, "group /runs/" + id);
  keep = {id,
          readString(run.id, "date"),
          readString(run.id, "command"),
          readString(run.id, "model"),
          readString(run.id, "dtype"),
          readString(run.id, "device")};
  IndexRow r{};
  r.id = keep.id.c_str();
  r.date = keep.date.c_str();
  r.command = keep.command.c_str();
  r.model = keep.model.c_str();
  r.dtype = keep.dtype.c_str();
  r.device = keep.device.c_str();
  r.height = readNumber<int64_t>(run.id, "height", H5T_NATIVE_INT64, -1);
  r.width = readNumber<int64_t>(run.id, "width", H5T_NATIVE_INT64, -1);
  r.images = readNumber<int64_t>(run.id, "images", H5T_NATIVE_INT64, -1);
  r.steps = readNumber<int32_t>(run.id, "steps", H5T_NATIVE_INT32, -1);
  r.worldSize = readNumber<int32_t>(run.id, "world_size", H5T_NATIVE_INT32, -1);
  r.cfg = readNumber<int32_t>(run.id, "cfg_degree", H5T_NATIVE_INT32, -1);
  r.pipefusion = readNumber<int32_t>(run.id, "pipefusion_degree", H5T_NATIVE_INT32, -1);
  r.ring = readNumber<int32_t>(run.id, "ring_degree", H5T_NATIVE_INT32, -1);
  r.ulysses = readNumber<int32_t>(run.id, "ulysses_degree", H5T_NATIVE_INT32, -1);
  if (H5Lexists(run.id, "summary", H5P_DEFAULT) > 0) {
    H5Id sum(H5Gopen2(run.id, "summary", H5P_DEFAULT), H5Gclose, "group summary");
    r.totalLatency = readNumber<double>(sum.id, "total_latency_s", H5T_NATIVE_DOUBLE, 0.0);
    r.meanStepTime = readNumber<double>(sum.id, "mean_step_time_s", H5T_NATIVE_DOUBLE, 0.0);
    r.imagesPerSecond = readNumber<double>(sum.id, "images_per_second", H5T_NATIVE_DOUBLE, 0.0);
  }
  r.peakHostRss = datasetMax(run.id, "peak_host_rss");
  r.peakDeviceMemory = datasetMax(run.id, "peak_device_memory");
  return r;
}

hid_t indexType() {
  const hid_t t = H5Tcreate(H5T_COMPOUND, sizeof(IndexRow));
  const hid_t str = H5Tcopy(H5T_C_S1);
  H5Tset_size(str, H5T_VARIABLE);
  H5Tset_cset(str, H5T_CSET_UTF8);
  H5Tinsert(t, "id", HOFFSET(IndexRow, id), str);
  H5Tinsert(t, "date", HOFFSET(IndexRow, date), str);
  H5Tinsert(t, "command", HOFFSET(IndexRow, command), str);
  H5Tinsert(t, "model", HOFFSET(IndexRow, model), str);
  H5Tinsert(t, "dtype", HOFFSET(IndexRow, dtype), str);
  H5Tinsert(t, "device", HOFFSET(IndexRow, device), str);
  H5Tinsert(t, "height", HOFFSET(IndexRow, height), H5T_NATIVE_INT64);
  H5Tinsert(t, "width", HOFFSET(IndexRow, width), H5T_NATIVE_INT64);
  H5Tinsert(t, "images", HOFFSET(IndexRow, images), H5T_NATIVE_INT64);
  H5Tinsert(t, "steps", HOFFSET(IndexRow, steps), H5T_NATIVE_INT32);
  H5Tinsert(t, "world_size", HOFFSET(IndexRow, worldSize), H5T_NATIVE_INT32);
  H5Tinsert(t, "cfg_degree", HOFFSET(IndexRow, cfg), H5T_NATIVE_INT32);
  H5Tinsert(t, "pipefusion_degree", HOFFSET(IndexRow, pipefusion), H5T_NATIVE_INT32);
  H5Tinsert(t, "ring_degree", HOFFSET(IndexRow, ring), H5T_NATIVE_INT32);
  H5Tinsert(t, "ulysses_degree", HOFFSET(IndexRow, ulysses), H5T_NATIVE_INT32);
  H5Tinsert(t, "total_latency_s", HOFFSET(IndexRow, totalLatency), H5T_NATIVE_DOUBLE);
  H5Tinsert(t, "mean_step_time_s", HOFFSET(IndexRow, meanStepTime), H5T_NATIVE_DOUBLE);
  H5Tinsert(t, "images_per_second", HOFFSET(IndexRow, imagesPerSecond), H5T_NATIVE_DOUBLE);
  H5Tinsert(t, "peak_host_rss_max", HOFFSET(IndexRow, peakHostRss), H5T_NATIVE_UINT64);
  H5Tinsert(t, "peak_device_memory_max", HOFFSET(IndexRow, peakDeviceMemory), H5T_NATIVE_UINT64);
  H5Tclose(str);
  return t;
}

// Appends run `id` to /run_index, creating the index from every run when the file has none (files
// written before it existed).
void appendIndexRow(hid_t file, hid_t runs, const std::string& id) {
  H5Id type(indexType(), H5Tclose, "index type");
  if (H5Lexists(file, "run_index", H5P_DEFAULT) <= 0) {
    std::vector<std::string> ids;
    H5G_info_t gi;
    PARDIT_CHECK(H5Gget_info(runs, &gi) >= 0, "HDF5: listing /runs");
    for (hsize_t i = 0; i < gi.nlinks; ++i) {
      const ssize_t n = H5Lget_name_by_idx(runs, ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
      std::string name(static_cast<size_t>(std::max<ssize_t>(0, n)), '\0');
      H5Lget_name_by_idx(runs, ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size() + 1, H5P_DEFAULT);
      ids.push_back(name);
    }
    std::vector<IndexStrings> keep(ids.size());
    std::vector<IndexRow> rows;
    for (size_t i = 0; i < ids.size(); ++i) rows.push_back(indexRow(runs, ids[i], keep[i]));
    const hsize_t dims = rows.size(), maxDims = H5S_UNLIMITED, chunk = 64;
    H5Id space(H5Screate_simple(1, &dims, &maxDims), H5Sclose, "index space");
    H5Id props(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, "index properties");
    H5Pset_chunk(props.id, 1, &chunk);
    H5Id ds(H5Dcreate2(file, "run_index", type.id, space.id, H5P_DEFAULT, props.id, H5P_DEFAULT), H5Dclose,
            "dataset /run_index");
    PARDIT_CHECK(H5Dwrite(ds.id, type.id, H5S_ALL, H5S_ALL, H5P_DEFAULT, rows.data()) >= 0, "HDF5: writing /run_index");
    attrString(ds.id, "units", "one row per run of /runs, in id (time) order; seconds, bytes");
    return;
  }
  H5Id ds(H5Dopen2(file, "run_index", H5P_DEFAULT), H5Dclose, "dataset /run_index");
  hsize_t n = 0;
  {
    H5Id sp(H5Dget_space(ds.id), H5Sclose, "index space");
    H5Sget_simple_extent_dims(sp.id, &n, nullptr);
  }
  const hsize_t grown = n + 1, one = 1;
  PARDIT_CHECK(H5Dset_extent(ds.id, &grown) >= 0, "HDF5: growing /run_index");
  H5Id fileSpace(H5Dget_space(ds.id), H5Sclose, "index space");
  H5Sselect_hyperslab(fileSpace.id, H5S_SELECT_SET, &n, nullptr, &one, nullptr);
  H5Id memSpace(H5Screate_simple(1, &one, nullptr), H5Sclose, "row space");
  IndexStrings keep;
  const IndexRow row = indexRow(runs, id, keep);
  PARDIT_CHECK(H5Dwrite(ds.id, type.id, memSpace.id, fileSpace.id, H5P_DEFAULT, &row) >= 0,
               "HDF5: appending to /run_index");
}

// An advisory lock (flock) on `<target>.lock`, so that jobs appending to one metrics file, on this node or
// on others sharing the file system, take turns: each copies the file as it is under the lock, so no run
// is lost. Waits up to kMetricsLockWaitSeconds for another job's append, then fails naming the lock.
class AppendLock {
 public:
  explicit AppendLock(const std::string& target) : name_(target + ".lock") {
    fd_ = ::open(name_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    PARDIT_CHECK(fd_ >= 0, "--metrics ", target, ": cannot open the lock file ", name_, ": ", std::strerror(errno));
    Timer waited;
    bool told = false;
    while (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      const int e = errno;
      if (e != EWOULDBLOCK && e != EINTR) {
        ::close(fd_);
        PARDIT_THROW("--metrics ", target, ": cannot lock ", name_, ": ", std::strerror(e));
      }
      if (!told && waited.seconds() > 5) {
        logWarn("metrics: waiting for another job appending to ", target, " (lock ", name_, ")");
        told = true;
      }
      if (waited.seconds() > kMetricsLockWaitSeconds) {
        ::close(fd_);
        PARDIT_THROW("--metrics ", target, ": another job has held ", name_, " for ",
                     formatSeconds(kMetricsLockWaitSeconds), "; this run was not appended");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  ~AppendLock() {
    ::flock(fd_, LOCK_UN);
    ::close(fd_);
  }
  AppendLock(const AppendLock&) = delete;
  AppendLock& operator=(const AppendLock&) = delete;

 private:
  std::string name_;
  int fd_ = -1;
};

// Number of runs in an existing metrics file (0 when it has none).
hsize_t runCount(hid_t file) {
  if (H5Lexists(file, "runs", H5P_DEFAULT) <= 0) return 0;
  H5Id runs(H5Gopen2(file, "runs", H5P_DEFAULT), H5Gclose, "group /runs");
  H5G_info_t gi{};
  PARDIT_CHECK(H5Gget_info(runs.id, &gi) >= 0, "HDF5: reading /runs");
  return gi.nlinks;
}

// Appends /runs/<id> to `path`: under the file's lock, a private temporary copy gets the run and is
// renamed over the file, so an interrupted write never damages earlier runs and concurrent jobs never
// drop each other's.
void appendRun(const std::string& path, const std::string& id, const RunInfo& info, const Gathered& g,
               const dist::Topology& topo) {
  checkReplaceable(path, "--metrics");
  AppendLock lock(path);
  TemporaryFile tmp(path);
  const bool existing = fs::exists(path);
  if (existing) fs::copy_file(path, tmp.path(), fs::copy_options::overwrite_existing);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // errors become pardit::Error below
  {
    H5Id file(existing ? H5Fopen(tmp.path().c_str(), H5F_ACC_RDWR, H5P_DEFAULT)
                       : H5Fcreate(tmp.path().c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT),
              H5Fclose,
              existing ? path + ": not an HDF5 file (--metrics)" : tmp.path() + ": cannot create (--metrics)");
    if (!existing) {
      attrString(file.id, "schema", "pardit-metrics");
      attrScalar<int32_t>(file.id, "schema_version", 1, H5T_NATIVE_INT32);
    }
    const hsize_t before = runCount(file.id);
    H5Id runs(openOrCreateGroup(file.id, "runs"), H5Gclose, "group /runs");
    H5Id run(H5Gcreate2(runs.id, id.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose, "group /runs/" + id);
    writeProvenance(run.id, info, g, topo);
    writeStepData(run.id, g);
    writeRankData(run.id, g);
    writeSummary(run.id, info, g);
    appendIndexRow(file.id, runs.id, id);
    PARDIT_CHECK(H5Fflush(file.id, H5F_SCOPE_GLOBAL) >= 0, tmp.path(), ": flush failed");
    PARDIT_CHECK(runCount(file.id) == before + 1, path, ": the run set did not grow by one run (--metrics)");
  }
  tmp.commit("--metrics");  // on any error above the temporary is removed and the file is untouched
}

}  // namespace

std::string MetricsRecorder::write(const std::string& path, const RunInfo& info) {
  auto& world = rt_.world();
  // Every rank has the same number of steps.
  at::Tensor n = at::full({1}, static_cast<int64_t>(stepSeconds_.size()), at::kLong), nmax = n.clone();
  world.allReduce(n, dist::ReduceOp::kMin);
  world.allReduce(nmax, dist::ReduceOp::kMax);
  PARDIT_CHECK(n.item<int64_t>() == nmax.item<int64_t>(), "metrics: ranks recorded different step counts");
  const int64_t S = n.item<int64_t>(), K = static_cast<int64_t>(collectiveKinds().size());
  std::vector<double> commSeconds;
  std::vector<int64_t> commBytes;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t k = 0; k < K; ++k) {
      commSeconds.push_back(commSeconds_[s][k]);
      commBytes.push_back(static_cast<int64_t>(commBytes_[s][k]));
    }
  auto gather = [&](at::Tensor t) { return dist::allGather(world, t.contiguous()); };
  Gathered g;
  g.stepSeconds = gather(at::tensor(stepSeconds_, at::kDouble).reshape({S}));
  g.commSeconds = gather(at::tensor(commSeconds, at::kDouble).reshape({S, K}));
  g.commBytes = gather(at::tensor(commBytes, at::kLong).reshape({S, K}));
  g.loadSeconds = gather(at::tensor({loadSeconds_}, at::kDouble)).reshape({-1});
  g.totalSeconds = gather(at::tensor({totalSeconds_}, at::kDouble)).reshape({-1});
  g.bytesRead = gather(at::tensor({static_cast<int64_t>(bytesRead_)}, at::kLong)).reshape({-1});
  g.peakDevice = gather(at::tensor({static_cast<int64_t>(peakDevice_)}, at::kLong)).reshape({-1});
  g.peakRss = gather(at::tensor({static_cast<int64_t>(peakRss_)}, at::kLong)).reshape({-1});
  at::Tensor nStages = at::full({1}, static_cast<int64_t>(stageNames_.size()), at::kLong), mostStages = nStages.clone();
  world.allReduce(nStages, dist::ReduceOp::kMin);
  world.allReduce(mostStages, dist::ReduceOp::kMax);
  PARDIT_CHECK(nStages.item<int64_t>() == mostStages.item<int64_t>(), "metrics: ranks recorded different stages");
  g.stages = stageNames_;
  const auto nst = static_cast<int64_t>(stageNames_.size());
  g.stageSeconds = gather(at::tensor(stageSeconds_, at::kDouble).reshape({nst}));
  g.stageBytes = gather(at::tensor(stageBytes_, at::kLong).reshape({nst}));
  g.hosts = gatherStrings(world, rt_.hostName(), 64);
  g.devices = gatherStrings(world, info.device, 32);

  // A run id every rank agrees on (rank 0's).
  at::Tensor rnd = at::full({1}, static_cast<int64_t>(std::random_device{}() & 0xffffff), at::kLong);
  world.broadcast(rnd, 0);
  char idbuf[64];
  std::snprintf(idbuf, sizeof(idbuf), "%s-%06llx", utcNow("%Y%m%dT%H%M%SZ").c_str(),
                static_cast<unsigned long long>(rnd.item<int64_t>()));
  const std::string id = idbuf;
  rt_.agree([&] {
    if (rt_.worldRank() == 0) appendRun(path, id, info, g, rt_.topology());
  });
  return id;
}

}  // namespace pardit::metrics
