#pragma once
// Safe outputs. Every file pardit writes goes to a hidden temporary beside the target (unique per process
// and call) and is renamed over the target only when complete, so a target is either untouched or whole.
// A temporary is removed when its writer fails or is destroyed, and when the process gets SIGINT, SIGTERM
// or SIGHUP (a job cancelled by Slurm or mpirun); SIGKILL leaves it, named `.<target>.<pid>.<n>.tmp`.
// The files a run reads are registered as inputs, and no output may replace one.
#include <string>

namespace pardit {

// A hidden temporary path in the target's folder: <dir>/.<name>.<pid>.<counter>.tmp
std::string temporaryPathFor(const std::string& target);

// Owns one temporary file path: removed on destruction unless committed, and on SIGINT/SIGTERM/SIGHUP.
class TemporaryFile {
 public:
  explicit TemporaryFile(const std::string& target);
  ~TemporaryFile();
  TemporaryFile(const TemporaryFile&) = delete;
  TemporaryFile& operator=(const TemporaryFile&) = delete;
  const std::string& path() const { return path_; }
  // Renames the temporary over the target (refusing a target that is an input of this run or exists and
  // is not a regular file); `flag` names the option in errors.
  void commit(const std::string& flag);

 private:
  std::string target_, path_;
  int slot_ = -1;
  bool committed_ = false;
};

// Graceful stop, for a process between units of work (a queue of images): after enableGracefulStop(), the
// first SIGINT, SIGTERM or SIGUSR1 (Slurm's --signal=USR1@T before a time limit or preemption) is only
// recorded, so the work in flight can finish and the process can exit on its own; temporaries are kept
// for their writers. A second SIGINT or SIGTERM ends the process as without it (temporaries removed).
void enableGracefulStop();
void disableGracefulStop();
// The signal recorded since enableGracefulStop(), or 0.
int stopSignal();

// Records a file this process reads (by device and inode, so other names of it count too).
void registerInputFile(const std::string& path);
// True when `path` exists and is one of the registered input files.
bool isInputFile(const std::string& path);
// Throws (naming `flag`) when an output at `path` would replace an input of this run, or an existing path
// that is not a regular file (a device node, a directory, a socket).
void checkReplaceable(const std::string& path, const std::string& flag);

}  // namespace pardit
