#include "pardit/metrics/metrics.h"

#include <ATen/ATen.h>
#include <hdf5.h>
#include <mpi.h>
#include <torch/version.h>

#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <unistd.h>
#include <random>
#include <sstream>

#include "pardit/core/error.h"
#include "pardit/core/timer.h"
#include "pardit/version.h"

#if defined(PARDIT_WITH_NCCL)
#include <nccl.h>
#endif

namespace fs = std::filesystem;

namespace pardit::metrics {

const std::vector<std::string>& collectiveKinds() {
  static const std::vector<std::string> kinds = {"all_to_all", "all_gather", "broadcast", "all_reduce", "send_recv"};
  return kinds;
}

std::string libtorchVersion() { return TORCH_VERSION; }

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
  if (!data.empty()) PARDIT_CHECK(H5Dwrite(ds.id, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data()) >= 0, "HDF5: writing ", name);
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
  at::Tensor stepSeconds;  // [R, S] double
  at::Tensor commSeconds;  // [R, S, K] double
  at::Tensor commBytes;    // [R, S, K] int64
  at::Tensor loadSeconds, totalSeconds;            // [R] double
  at::Tensor bytesRead, peakDevice, peakRss;       // [R] int64
  std::vector<std::string> hosts, devices;
  std::vector<std::string> stages;                 // stage names; times [R, stages] and bytes [R, stages]
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
  attrScalar<int32_t>(run, "world_size", static_cast<int32_t>(g.hosts.size()), H5T_NATIVE_INT32);
  const auto& d = topo.degrees();
  attrScalar<int32_t>(run, "cfg_degree", d.cfg, H5T_NATIVE_INT32);
  attrScalar<int32_t>(run, "pipefusion_degree", d.pipefusion, H5T_NATIVE_INT32);
  attrScalar<int32_t>(run, "ring_degree", d.ring, H5T_NATIVE_INT32);
  attrScalar<int32_t>(run, "ulysses_degree", d.ulysses, H5T_NATIVE_INT32);
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

// Appends /runs/<id> to `path` through a private temporary copy renamed over it, so an interrupted
// write never damages earlier runs.
void appendRun(const std::string& path, const std::string& id, const RunInfo& info, const Gathered& g,
               const dist::Topology& topo) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." + id;
  const bool existing = fs::exists(path);
  if (existing) fs::copy_file(path, tmp, fs::copy_options::overwrite_existing);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // errors become pardit::Error below
  try {
    H5Id file(existing ? H5Fopen(tmp.c_str(), H5F_ACC_RDWR, H5P_DEFAULT)
                       : H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT),
              H5Fclose, existing ? path + ": not an HDF5 file (--metrics)" : tmp + ": cannot create (--metrics)");
    if (!existing) {
      attrString(file.id, "schema", "pardit-metrics");
      attrScalar<int32_t>(file.id, "schema_version", 1, H5T_NATIVE_INT32);
    }
    H5Id runs(openOrCreateGroup(file.id, "runs"), H5Gclose, "group /runs");
    H5Id run(H5Gcreate2(runs.id, id.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose, "group /runs/" + id);
    writeProvenance(run.id, info, g, topo);
    writeStepData(run.id, g);
    writeRankData(run.id, g);
    writeSummary(run.id, info, g);
    PARDIT_CHECK(H5Fflush(file.id, H5F_SCOPE_GLOBAL) >= 0, tmp, ": flush failed");
  } catch (...) {
    std::error_code ec;
    fs::remove(tmp, ec);  // the original file is untouched
    throw;
  }
  fs::rename(tmp, path);
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
