#include "pardit/metrics/metrics.h"

#include <ATen/ATen.h>
#include <hdf5.h>
#include <mpi.h>
#include <torch/version.h>

#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
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

std::string MetricsRecorder::write(const std::string& path, const RunInfo& info) {
  const int R = rt_.worldSize(), K = static_cast<int>(collectiveKinds().size());
  // Every rank has the same number of steps.
  at::Tensor n = at::full({1}, static_cast<int64_t>(stepSeconds_.size()), at::kLong), nmax = n.clone();
  rt_.world().allReduce(n, dist::ReduceOp::kMin);
  rt_.world().allReduce(nmax, dist::ReduceOp::kMax);
  PARDIT_CHECK(n.item<int64_t>() == nmax.item<int64_t>(), "metrics: ranks recorded different step counts");
  const int64_t S = n.item<int64_t>();
  // Per rank: [step, comm seconds (S*K), load, total, then as doubles bytes...]; bytes go separately as int64.
  std::vector<double> mineD;
  for (int64_t s = 0; s < S; ++s) mineD.push_back(stepSeconds_[s]);
  for (int64_t s = 0; s < S; ++s)
    for (int k = 0; k < K; ++k) mineD.push_back(commSeconds_[s][k]);
  mineD.push_back(loadSeconds_);
  mineD.push_back(totalSeconds_);
  std::vector<int64_t> mineI;
  for (int64_t s = 0; s < S; ++s)
    for (int k = 0; k < K; ++k) mineI.push_back(static_cast<int64_t>(commBytes_[s][k]));
  mineI.push_back(static_cast<int64_t>(bytesRead_));
  mineI.push_back(static_cast<int64_t>(peakDevice_));
  mineI.push_back(static_cast<int64_t>(peakRss_));
  at::Tensor allD = dist::allGather(rt_.world(), at::tensor(mineD, at::kDouble));
  at::Tensor allI = dist::allGather(rt_.world(), at::tensor(mineI, at::kLong));
  // Host names: fixed 64-byte slots.
  at::Tensor host = at::zeros({64}, at::kByte);
  std::memcpy(host.data_ptr(), rt_.hostName().data(), std::min<size_t>(63, rt_.hostName().size()));
  at::Tensor hosts = dist::allGather(rt_.world(), host);
  at::Tensor dev = at::zeros({32}, at::kByte);
  std::memcpy(dev.data_ptr(), info.device.data(), std::min<size_t>(31, info.device.size()));
  at::Tensor devices = dist::allGather(rt_.world(), dev);

  // A run id every rank agrees on (rank 0's).
  at::Tensor rnd = at::full({1}, static_cast<int64_t>(std::random_device{}() & 0xffffff), at::kLong);
  rt_.world().broadcast(rnd, 0);
  char idbuf[64];
  std::snprintf(idbuf, sizeof(idbuf), "%s-%06llx", utcNow("%Y%m%dT%H%M%SZ").c_str(),
                static_cast<unsigned long long>(rnd.item<int64_t>()));
  const std::string id = idbuf;

  rt_.agree([&] {
    if (rt_.worldRank() != 0) return;
    const std::string tmp = path + ".tmp";
    if (fs::exists(path)) {
      fs::copy_file(path, tmp, fs::copy_options::overwrite_existing);
    } else {
      fs::remove(tmp);
    }
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // errors become pardit::Error below
    try {
      const bool existing = fs::exists(tmp);
      H5Id file(existing ? H5Fopen(tmp.c_str(), H5F_ACC_RDWR, H5P_DEFAULT)
                         : H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT),
                H5Fclose, existing ? path + ": not an HDF5 file (--metrics)" : tmp + ": cannot create (--metrics)");
      if (!existing) {
        attrString(file.id, "schema", "pardit-metrics");
        attrScalar<int32_t>(file.id, "schema_version", 1, H5T_NATIVE_INT32);
      }
      H5Id runs(openOrCreateGroup(file.id, "runs"), H5Gclose, "group /runs");
      H5Id run(H5Gcreate2(runs.id, id.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose, "group /runs/" + id);
      // Provenance.
      std::ostringstream cfg, hostList, devList;
      for (const auto& [k, v] : info.config) cfg << k << " = " << v << "\n";
      for (int r = 0; r < R; ++r) {
        hostList << (r ? "," : "") << reinterpret_cast<const char*>(hosts[r].data_ptr());
        devList << (r ? "," : "") << reinterpret_cast<const char*>(devices[r].data_ptr());
      }
      attrString(run.id, "command", info.command);
      attrString(run.id, "pardit_version", PARDIT_VERSION);
      attrString(run.id, "git_commit", PARDIT_GIT_COMMIT);
      attrString(run.id, "date", utcNow("%Y-%m-%dT%H:%M:%SZ"));
      attrString(run.id, "hosts", hostList.str());
      attrString(run.id, "devices", devList.str());
      attrString(run.id, "libtorch_version", libtorchVersion());
      attrString(run.id, "mpi_version", mpiVersion());
      attrString(run.id, "nccl_version", ncclVersion());
      attrString(run.id, "hdf5_version", hdf5Version());
      attrString(run.id, "config", cfg.str());
      attrString(run.id, "model", info.model);
      attrScalar<int32_t>(run.id, "world_size", R, H5T_NATIVE_INT32);
      const auto& d = rt_.topology().degrees();
      attrScalar<int32_t>(run.id, "cfg_degree", d.cfg, H5T_NATIVE_INT32);
      attrScalar<int32_t>(run.id, "pipefusion_degree", d.pipefusion, H5T_NATIVE_INT32);
      attrScalar<int32_t>(run.id, "ring_degree", d.ring, H5T_NATIVE_INT32);
      attrScalar<int32_t>(run.id, "ulysses_degree", d.ulysses, H5T_NATIVE_INT32);
      // Per [rank, step].
      const int64_t stride = S + S * K + 2, strideI = S * K + 3;
      const auto* D = allD.data_ptr<double>();
      const auto* I = allI.data_ptr<int64_t>();
      std::vector<double> stepTime, computeTime;
      for (int r = 0; r < R; ++r)
        for (int64_t s = 0; s < S; ++s) {
          double comm = 0;
          for (int k = 0; k < K; ++k) comm += D[r * stride + S + s * K + k];
          stepTime.push_back(D[r * stride + s]);
          computeTime.push_back(std::max(0.0, D[r * stride + s] - comm));
        }
      const std::vector<hsize_t> rs{static_cast<hsize_t>(R), static_cast<hsize_t>(S)};
      dataset(run.id, "step_time", rs, stepTime, H5T_NATIVE_DOUBLE, "s");
      dataset(run.id, "compute_time", rs, computeTime, H5T_NATIVE_DOUBLE, "s");
      H5Id ct(H5Gcreate2(run.id, "comm_time", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose, "group comm_time");
      H5Id cb(H5Gcreate2(run.id, "comm_bytes", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose, "group comm_bytes");
      for (int k = 0; k < K; ++k) {
        std::vector<double> t;
        std::vector<uint64_t> b;
        for (int r = 0; r < R; ++r)
          for (int64_t s = 0; s < S; ++s) {
            t.push_back(D[r * stride + S + s * K + k]);
            b.push_back(static_cast<uint64_t>(I[r * strideI + s * K + k]));
          }
        dataset(ct.id, collectiveKinds()[k], rs, t, H5T_NATIVE_DOUBLE, "s");
        dataset(cb.id, collectiveKinds()[k], rs, b, H5T_NATIVE_UINT64, "bytes sent to other ranks");
      }
      // Per rank.
      std::vector<double> load, total;
      std::vector<uint64_t> bytesRead, peakDev, peakRss;
      for (int r = 0; r < R; ++r) {
        load.push_back(D[r * stride + S + S * K]);
        total.push_back(D[r * stride + S + S * K + 1]);
        bytesRead.push_back(static_cast<uint64_t>(I[r * strideI + S * K]));
        peakDev.push_back(static_cast<uint64_t>(I[r * strideI + S * K + 1]));
        peakRss.push_back(static_cast<uint64_t>(I[r * strideI + S * K + 2]));
      }
      const std::vector<hsize_t> rdim{static_cast<hsize_t>(R)};
      dataset(run.id, "load_time", rdim, load, H5T_NATIVE_DOUBLE, "s");
      dataset(run.id, "bytes_read", rdim, bytesRead, H5T_NATIVE_UINT64, "bytes");
      dataset(run.id, "peak_device_memory", rdim, peakDev, H5T_NATIVE_UINT64, "bytes (0 on CPU)");
      dataset(run.id, "peak_host_rss", rdim, peakRss, H5T_NATIVE_UINT64, "bytes");
      // Summary: the slowest rank defines each step.
      double latency = 0, meanAfter = 0;
      int counted = 0;
      for (int64_t s = 0; s < S; ++s) {
        double worst = 0;
        for (int r = 0; r < R; ++r) worst = std::max(worst, stepTime[r * S + s]);
        latency += worst;
        if (s >= info.warmupSteps) {
          meanAfter += worst;
          ++counted;
        }
      }
      double totalMax = 0;
      for (double t : total) totalMax = std::max(totalMax, t);
      if (totalMax <= 0) totalMax = latency;
      H5Id sum(H5Gcreate2(run.id, "summary", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose, "group summary");
      attrScalar<double>(sum.id, "total_latency_s", totalMax, H5T_NATIVE_DOUBLE);
      attrScalar<double>(sum.id, "mean_step_time_s", counted ? meanAfter / counted : 0.0, H5T_NATIVE_DOUBLE);
      attrScalar<double>(sum.id, "images_per_second", totalMax > 0 ? info.images / totalMax : 0.0, H5T_NATIVE_DOUBLE);
      attrScalar<int32_t>(sum.id, "warmup_steps", info.warmupSteps, H5T_NATIVE_INT32);
      attrScalar<int32_t>(sum.id, "steps", static_cast<int32_t>(S), H5T_NATIVE_INT32);
      PARDIT_CHECK(H5Fflush(file.id, H5F_SCOPE_GLOBAL) >= 0, tmp, ": flush failed");
    } catch (...) {
      std::error_code ec;
      fs::remove(tmp, ec);  // the original file is untouched
      throw;
    }
    fs::rename(tmp, path);
  });
  return id;
}

}  // namespace pardit::metrics
