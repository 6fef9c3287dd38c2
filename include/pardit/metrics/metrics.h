#pragma once
// Run metrics: every rank records its step timings, communication per collective kind, load time,
// bytes read and memory peaks; rank 0 gathers them and appends one run group to an HDF5 file.
// The schema is documented in docs/metrics.md.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "pardit/dist/runtime.h"

namespace pardit::metrics {

// The collective kinds recorded per step, in dataset order.
const std::vector<std::string>& collectiveKinds();

struct RunInfo {
  std::string command;                        // generate | forward | bench
  std::map<std::string, std::string> config;  // the resolved options
  std::string model;
  std::string device;             // "cpu" or "cuda:N" (this rank's device kind)
  int warmupSteps = 0;            // steps excluded from the mean step time
  int64_t images = 1;             // images produced per run (for images per second)
  int64_t height = 0, width = 0;  // pixels (0: not an image run)
  int steps = 0;                  // denoising steps (bench: timed iterations)
  std::string dtype;              // compute dtype: "bf16", "fp32", ...
  // A request of a queue (index, replica_group, queue_wait_s) or a queue job's totals (command "queue"):
  // written as the attributes of the run's group "queue".
  std::map<std::string, double> queue;
};

class MetricsRecorder {
 public:
  explicit MetricsRecorder(dist::Runtime& rt) : rt_(rt) {}
  void beginStep();
  void endStep();  // step time, and each collective kind's time and bytes during the step
  // A step that was timed elsewhere (e.g. by a loop that reports per-step seconds).
  void addStep(double seconds);
  void setLoad(double seconds, uint64_t bytesRead);
  void setPeaks(uint64_t deviceBytes, uint64_t hostRssBytes);
  void setTotalSeconds(double seconds) { totalSeconds_ = seconds; }
  // A stage of the run outside the denoising steps (encode, decode, write): its time and bytes on this
  // rank. Every rank records the same stages, in the same order.
  void addStage(const std::string& name, double seconds, uint64_t bytes = 0);
  size_t steps() const { return stepSeconds_.size(); }

  // Collective over the world: gathers every rank's record; rank 0 appends /runs/<id> to `path`
  // (written to a temporary copy and renamed, so an interrupted write never damages earlier runs).
  // Returns the run id.
  std::string write(const std::string& path, const RunInfo& info);

 private:
  dist::Runtime& rt_;
  std::vector<double> stepSeconds_;
  std::vector<std::vector<double>> commSeconds_;  // [step][kind]
  std::vector<std::vector<uint64_t>> commBytes_;  // [step][kind]
  std::map<std::string, dist::CollectiveStats> before_;
  double stepStart_ = 0.0;
  double loadSeconds_ = 0.0, totalSeconds_ = 0.0;
  uint64_t bytesRead_ = 0, peakDevice_ = 0, peakRss_ = 0;
  std::vector<std::string> stageNames_;
  std::vector<double> stageSeconds_;
  std::vector<int64_t> stageBytes_;
};

// Versions for provenance.
std::string libtorchVersion();
// Checks a --metrics destination before a run: its folder exists, it is not an input or a non-regular file,
// and an existing file is an HDF5 file (a run must not be lost at the end to a file it cannot append to).
void checkMetricsFile(const std::string& path);
std::string mpiVersion();
std::string ncclVersion();
std::string hdf5Version();

}  // namespace pardit::metrics
