// The HDF5 metrics file: written by rank 0 from every rank's record, read back with the HDF5 C API.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <hdf5.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "mpi_env.h"
#include "pardit/core/error.h"
#include "pardit/metrics/metrics.h"

using namespace pardit;

namespace {
std::vector<hsize_t> dims(hid_t file, const std::string& path) {
  hid_t ds = H5Dopen2(file, path.c_str(), H5P_DEFAULT);
  EXPECT_GE(ds, 0) << path;
  if (ds < 0) return {};
  hid_t sp = H5Dget_space(ds);
  std::vector<hsize_t> d(H5Sget_simple_extent_ndims(sp));
  H5Sget_simple_extent_dims(sp, d.data(), nullptr);
  H5Sclose(sp);
  H5Dclose(ds);
  return d;
}

std::vector<double> readDoubles(hid_t file, const std::string& path) {
  auto d = dims(file, path);
  size_t n = 1;
  for (auto x : d) n *= x;
  std::vector<double> v(n);
  hid_t ds = H5Dopen2(file, path.c_str(), H5P_DEFAULT);
  H5Dread(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
  H5Dclose(ds);
  return v;
}

std::string readStringAttr(hid_t obj, const char* name) {
  hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
  EXPECT_GE(a, 0) << name;
  if (a < 0) return "";
  hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, H5T_VARIABLE);
  H5Tset_cset(t, H5T_CSET_UTF8);
  char* s = nullptr;
  H5Aread(a, t, &s);
  std::string out = s ? s : "";
  H5free_memory(s);
  H5Tclose(t);
  H5Aclose(a);
  return out;
}

std::vector<std::string> runIds(hid_t file) {
  std::vector<std::string> ids;
  hid_t g = H5Gopen2(file, "runs", H5P_DEFAULT);
  H5G_info_t info;
  H5Gget_info(g, &info);
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    char name[128];
    H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof(name), H5P_DEFAULT);
    ids.push_back(name);
  }
  H5Gclose(g);
  return ids;
}
// The fields of /run_index a test looks at (HDF5 converts the compound by field name).
struct IndexRow {
  std::string id, model, dtype;
  int64_t height = 0, width = 0;
  int32_t steps = 0, worldSize = 0, ulysses = 0;
  double totalLatency = 0;
  uint64_t peakHostRss = 0;
};

std::vector<IndexRow> readIndex(hid_t file) {
  struct Raw {
    char *id, *model, *dtype;
    int64_t height, width;
    int32_t steps, worldSize, ulysses;
    double totalLatency;
    uint64_t peakHostRss;
  };
  hid_t str = H5Tcopy(H5T_C_S1);
  H5Tset_size(str, H5T_VARIABLE);
  H5Tset_cset(str, H5T_CSET_UTF8);
  hid_t t = H5Tcreate(H5T_COMPOUND, sizeof(Raw));
  H5Tinsert(t, "id", HOFFSET(Raw, id), str);
  H5Tinsert(t, "model", HOFFSET(Raw, model), str);
  H5Tinsert(t, "dtype", HOFFSET(Raw, dtype), str);
  H5Tinsert(t, "height", HOFFSET(Raw, height), H5T_NATIVE_INT64);
  H5Tinsert(t, "width", HOFFSET(Raw, width), H5T_NATIVE_INT64);
  H5Tinsert(t, "steps", HOFFSET(Raw, steps), H5T_NATIVE_INT32);
  H5Tinsert(t, "world_size", HOFFSET(Raw, worldSize), H5T_NATIVE_INT32);
  H5Tinsert(t, "ulysses_degree", HOFFSET(Raw, ulysses), H5T_NATIVE_INT32);
  H5Tinsert(t, "total_latency_s", HOFFSET(Raw, totalLatency), H5T_NATIVE_DOUBLE);
  H5Tinsert(t, "peak_host_rss_max", HOFFSET(Raw, peakHostRss), H5T_NATIVE_UINT64);
  std::vector<IndexRow> rows;
  auto d = dims(file, "run_index");
  if (d.size() == 1) {
    std::vector<Raw> raw(d[0]);
    hid_t ds = H5Dopen2(file, "run_index", H5P_DEFAULT);
    EXPECT_GE(H5Dread(ds, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, raw.data()), 0);
    for (auto& r : raw) {
      rows.push_back(
          {r.id, r.model, r.dtype, r.height, r.width, r.steps, r.worldSize, r.ulysses, r.totalLatency, r.peakHostRss});
      H5free_memory(r.id);
      H5free_memory(r.model);
      H5free_memory(r.dtype);
    }
    H5Dclose(ds);
  }
  H5Tclose(t);
  H5Tclose(str);
  return rows;
}
}  // namespace

TEST(Metrics, WriteReadBackAndAppend) {
  auto& rt = test::runtime();
  const int R = rt.worldSize();
  rt.setTopology({1, 1, 1, R}, c10::kCPU);
  // A shared path: rank 0's pid.
  at::Tensor pid = at::full({1}, static_cast<int64_t>(::getpid()), at::kLong);
  rt.world().broadcast(pid, 0);
  const std::string path =
      (std::filesystem::temp_directory_path() / ("pardit-metrics-" + std::to_string(pid.item<int64_t>()) + ".h5"))
          .string();
  std::string ids[2];
  for (int run = 0; run < 2; ++run) {
    metrics::MetricsRecorder rec(rt);
    rec.setLoad(0.5, 1000 + rt.worldRank());
    for (int s = 0; s < 3; ++s) {
      rec.beginStep();
      at::Tensor x = at::ones({R, 4});
      if (R > 1) dist::allToAll(rt.group(dist::GroupKind::kUlysses), x);
      rec.endStep();
    }
    rec.setPeaks(0, 12345);
    rec.setTotalSeconds(1.0);
    ids[run] = rec.write(path, {"bench", {{"steps", "3"}}, "model-x", "cpu", 1, 2, 64, 96 + 16 * run, 3, "fp32", {}});
  }
  if (rt.worldRank() == 0) {
    hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    const auto list = runIds(f);
    EXPECT_EQ(list.size(), 2u);
    for (const auto& id : ids) {
      const std::string base = "runs/" + id;
      EXPECT_EQ(dims(f, base + "/step_time"), (std::vector<hsize_t>{static_cast<hsize_t>(R), 3}));
      EXPECT_EQ(dims(f, base + "/compute_time"), (std::vector<hsize_t>{static_cast<hsize_t>(R), 3}));
      for (const auto& k : metrics::collectiveKinds()) {
        EXPECT_EQ(dims(f, base + "/comm_time/" + k), (std::vector<hsize_t>{static_cast<hsize_t>(R), 3}));
        EXPECT_EQ(dims(f, base + "/comm_bytes/" + k), (std::vector<hsize_t>{static_cast<hsize_t>(R), 3}));
      }
      for (const char* d : {"load_time", "bytes_read", "peak_device_memory", "peak_host_rss"})
        EXPECT_EQ(dims(f, base + "/" + d), (std::vector<hsize_t>{static_cast<hsize_t>(R)}));
      const auto steps = readDoubles(f, base + "/step_time");
      for (double s : steps) EXPECT_GE(s, 0.0);
      hid_t g = H5Gopen2(f, base.c_str(), H5P_DEFAULT);
      EXPECT_EQ(readStringAttr(g, "command"), "bench");
      EXPECT_EQ(readStringAttr(g, "model"), "model-x");
      EXPECT_NE(readStringAttr(g, "config").find("steps = 3"), std::string::npos);
      EXPECT_FALSE(readStringAttr(g, "libtorch_version").empty());
      EXPECT_FALSE(readStringAttr(g, "mpi_version").empty());
      const std::string hosts = readStringAttr(g, "hosts");
      EXPECT_EQ(std::count(hosts.begin(), hosts.end(), ',') + 1, R);
      H5Gclose(g);
      // Bytes counted for the all-to-all: (R-1)/R of the 4R floats per step.
      hid_t ds = H5Dopen2(f, (base + "/comm_bytes/all_to_all").c_str(), H5P_DEFAULT);
      std::vector<uint64_t> b(static_cast<size_t>(R) * 3);
      H5Dread(ds, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, b.data());
      H5Dclose(ds);
      for (auto v : b) EXPECT_EQ(v, static_cast<uint64_t>(4 * 4 * (R - 1)));
    }
    // /run_index: one row per run, readable as a table (h5py -> pandas in one line).
    const auto rows = readIndex(f);
    ASSERT_EQ(rows.size(), 2u);
    for (int run = 0; run < 2; ++run) {
      EXPECT_EQ(rows[run].id, ids[run]);
      EXPECT_EQ(rows[run].model, "model-x");
      EXPECT_EQ(rows[run].dtype, "fp32");
      EXPECT_EQ(rows[run].height, 64);
      EXPECT_EQ(rows[run].width, 96 + 16 * run);
      EXPECT_EQ(rows[run].steps, 3);
      EXPECT_EQ(rows[run].worldSize, R);
      EXPECT_EQ(rows[run].ulysses, R);
      EXPECT_GT(rows[run].totalLatency, 0.0);
      EXPECT_EQ(rows[run].peakHostRss, 12345u);
    }
    hid_t g = H5Gopen2(f, ("runs/" + ids[0]).c_str(), H5P_DEFAULT);
    EXPECT_EQ(readStringAttr(g, "dtype"), "fp32");
    EXPECT_EQ(readStringAttr(g, "device"), "cpu");
    H5Gclose(g);
    H5Fclose(f);
    // A file written before the index existed gets one for all its runs at its next append.
    f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(H5Ldelete(f, "run_index", H5P_DEFAULT), 0);
    H5Fclose(f);
  }
  rt.world().barrier();
  std::string added;
  {
    metrics::MetricsRecorder rec(rt);
    rec.addStep(0.1);
    added = rec.write(path, {"generate", {}, "model-y", "cpu", 0, 1, 32, 32, 1, "bf16", {}});
  }
  if (rt.worldRank() == 0) {
    hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    const auto rows = readIndex(f);
    ASSERT_EQ(rows.size(), 3u);
    // Every run, in id order, the new one included.
    EXPECT_EQ(std::set<std::string>({rows[0].id, rows[1].id, rows[2].id}),
              std::set<std::string>({ids[0], ids[1], added}));
    EXPECT_LT(rows[0].id, rows[1].id);
    EXPECT_LT(rows[1].id, rows[2].id);
    for (const auto& row : rows) {
      EXPECT_EQ(row.model, row.id == added ? "model-y" : "model-x");
      EXPECT_EQ(row.dtype, row.id == added ? "bf16" : "fp32");
    }
    H5Fclose(f);
    std::filesystem::remove(path);
    std::ofstream(path + ".txt") << "not hdf5";
  }
  rt.world().barrier();
  // A file that is not HDF5 is refused on every rank and left as it was.
  metrics::MetricsRecorder rec(rt);
  rec.addStep(0.1);
  EXPECT_THROW(rec.write(path + ".txt", {"bench", {}, "m", "cpu", 0, 1, 0, 0, 1, "fp32", {}}), dist::CollectiveFailure);
  if (rt.worldRank() == 0) {
    std::ifstream in(path + ".txt");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_EQ(text, "not hdf5");
    EXPECT_FALSE(std::filesystem::exists(path + ".txt.tmp"));
    std::filesystem::remove(path + ".txt");
  }
  rt.world().barrier();
}
