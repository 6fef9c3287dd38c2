#include "pardit/core/files.h"

#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <set>
#include <utility>

#include "pardit/core/error.h"

namespace fs = std::filesystem;

namespace pardit {
namespace {

// The temporaries being written, in a fixed table the signal handler can walk without allocating.
constexpr int kSlots = 64;
constexpr size_t kPathMax = 4096;
struct Slot {
  std::atomic<bool> claimed{false};  // owned by a TemporaryFile
  std::atomic<bool> ready{false};    // path filled in: the handler may remove it
  char path[kPathMax] = {};
};
std::array<Slot, kSlots> g_slots;
std::once_flag g_handlersOnce;
struct sigaction g_previous[3];
constexpr int kSignals[3] = {SIGINT, SIGTERM, SIGHUP};
// Graceful stop (a queue between images): the first SIGINT, SIGTERM or SIGUSR1 is recorded here instead.
volatile std::sig_atomic_t g_graceful = 0;
volatile std::sig_atomic_t g_stopSignal = 0;
struct sigaction g_previousUsr1;

void removeTemporariesAndRaise(int sig) {
  if (g_graceful && g_stopSignal == 0 && sig != SIGHUP) {
    g_stopSignal = sig;
    return;
  }
  for (auto& s : g_slots)
    if (s.ready.load(std::memory_order_acquire)) ::unlink(s.path);
  for (int i = 0; i < 3; ++i)
    if (kSignals[i] == sig) ::sigaction(sig, &g_previous[i], nullptr);  // then the previous action runs
  ::raise(sig);
}

void installHandlers() {
  std::call_once(g_handlersOnce, [] {
    for (int i = 0; i < 3; ++i) {
      struct sigaction now {};
      ::sigaction(kSignals[i], nullptr, &g_previous[i]);
      if (g_previous[i].sa_handler == SIG_IGN) continue;  // e.g. SIGHUP under nohup: leave it ignored
      now.sa_handler = removeTemporariesAndRaise;
      sigemptyset(&now.sa_mask);
      ::sigaction(kSignals[i], &now, nullptr);
    }
  });
}

void recordUsr1(int sig) {
  if (g_graceful) g_stopSignal = sig;
}

std::mutex g_inputsMutex;
std::set<std::pair<dev_t, ino_t>> g_inputs;

bool identity(const std::string& path, std::pair<dev_t, ino_t>* id) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return false;
  *id = {st.st_dev, st.st_ino};
  return true;
}

}  // namespace

std::string temporaryPathFor(const std::string& target) {
  static std::atomic<unsigned> counter{0};
  const fs::path p(target);
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  return (dir / ("." + p.filename().string() + "." + std::to_string(::getpid()) + "." +
                 std::to_string(counter.fetch_add(1)) + ".tmp"))
      .string();
}

TemporaryFile::TemporaryFile(const std::string& target) : target_(target), path_(temporaryPathFor(target)) {
  installHandlers();
  if (path_.size() >= kPathMax) return;  // too long to register: still removed by the destructor
  for (int i = 0; i < kSlots; ++i) {
    bool expected = false;
    if (!g_slots[i].claimed.compare_exchange_strong(expected, true)) continue;
    std::memcpy(g_slots[i].path, path_.c_str(), path_.size() + 1);
    g_slots[i].ready.store(true, std::memory_order_release);
    slot_ = i;
    break;
  }
}

TemporaryFile::~TemporaryFile() {
  if (!committed_) ::unlink(path_.c_str());
  if (slot_ >= 0) {
    g_slots[slot_].ready.store(false, std::memory_order_release);
    g_slots[slot_].claimed.store(false, std::memory_order_release);
  }
}

void TemporaryFile::commit(const std::string& flag) {
  checkReplaceable(target_, flag);
  if (::rename(path_.c_str(), target_.c_str()) != 0) {
    const int e = errno;
    PARDIT_THROW(flag, " ", target_, ": cannot rename the finished file into place: ", std::strerror(e));
  }
  committed_ = true;
}

void enableGracefulStop() {
  installHandlers();
  g_stopSignal = 0;
  g_graceful = 1;
  static std::once_flag usr1Once;
  std::call_once(usr1Once, [] {
    struct sigaction now {};
    now.sa_handler = recordUsr1;
    sigemptyset(&now.sa_mask);
    ::sigaction(SIGUSR1, &now, &g_previousUsr1);
  });
}

void disableGracefulStop() {
  g_graceful = 0;
  g_stopSignal = 0;
}

int stopSignal() { return g_stopSignal; }

void registerInputFile(const std::string& path) {
  std::pair<dev_t, ino_t> id;
  if (!identity(path, &id)) return;
  std::lock_guard<std::mutex> lock(g_inputsMutex);
  g_inputs.insert(id);
}

bool isInputFile(const std::string& path) {
  std::pair<dev_t, ino_t> id;
  if (!identity(path, &id)) return false;
  std::lock_guard<std::mutex> lock(g_inputsMutex);
  return g_inputs.count(id) > 0;
}

void checkReplaceable(const std::string& path, const std::string& flag) {
  std::error_code ec;
  const auto status = fs::symlink_status(path, ec);
  if (!fs::exists(status)) return;
  const auto target = fs::status(path, ec);
  PARDIT_CHECK(fs::is_regular_file(target), flag, " ", path,
               ": exists and is not a regular file; refusing to replace it");
  PARDIT_CHECK(!isInputFile(path), flag, " ", path, ": is an input of this run; refusing to overwrite it");
}

}  // namespace pardit
