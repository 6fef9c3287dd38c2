// The pardit executable: `pardit <command> [options]`, alone or under mpirun / srun.
//
// Error policy: checks throw pardit::Error. Checks that every rank runs together (options, files,
// shapes, loading) go through Runtime::agree(), so a failure on any rank makes every rank exit
// cleanly with status 1 and the failing rank prints its one-line message. Any other error is logged
// by the rank that hit it, which then aborts the whole job (MPI_Abort) so that no rank hangs.
#include <ATen/Parallel.h>

#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "config/config.h"
#include "pardit/core/error.h"
#include "pardit/core/log.h"
#include "pardit/dist/runtime.h"
#include "pardit/model/fused.h"
#include "pardit/version.h"

namespace {

void applyRuntimeOptions(const pardit::config::EngineConfig& c) {
  using pardit::config::LogLevelOption;
  pardit::LogLevel level = pardit::LogLevel::kInfo;
  switch (c.logLevel) {
    case LogLevelOption::kDebug:
      level = pardit::LogLevel::kDebug;
      break;
    case LogLevelOption::kInfo:
      level = pardit::LogLevel::kInfo;
      break;
    case LogLevelOption::kWarn:
      level = pardit::LogLevel::kWarn;
      break;
    case LogLevelOption::kError:
      level = pardit::LogLevel::kError;
      break;
  }
  pardit::setLogLevel(c.quiet ? pardit::LogLevel::kError : level);
  pardit::model::setFusedPasses(!c.unfused);
  if (c.threads > 0) {
    at::set_num_threads(c.threads);
    at::set_num_interop_threads(1);
  }
}

int dispatch(const pardit::config::EngineConfig& c, pardit::dist::Runtime& rt) {
  using pardit::config::Command;
  int status = 0;
  switch (c.command) {
    case Command::kForward:
      return pardit::app::runForward(c, rt);
    case Command::kGenerate:
      return pardit::app::runGenerate(c, rt);
    case Command::kEncode:
      return pardit::app::runEncode(c, rt);
    case Command::kBench:
      return pardit::app::runBench(c, rt);
    case Command::kPlan:
      rt.agree([&] {
        if (rt.worldRank() == 0) status = pardit::app::runPlan(c);
      });
      return status;
    case Command::kSynth:
      rt.agree([&] {
        if (rt.worldRank() == 0) status = pardit::app::runSynth(c);
      });
      return status;
    case Command::kQuantize:
      rt.agree([&] {
        if (rt.worldRank() == 0) status = pardit::app::runQuantize(c);
      });
      return status;
  }
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace pardit;
  if (argc < 2) {
    std::fputs(config::usage().c_str(), stderr);
    return 2;
  }
  const std::string command = argv[1];
  if (command == "--help" || command == "-h" || command == "help") {
    std::fputs(config::usage().c_str(), stdout);
    return 0;
  }
  if (command == "--version" || command == "version") {
    std::printf("pardit %s (%s)\n", PARDIT_VERSION, PARDIT_GIT_COMMIT);
    return 0;
  }
  int status = 0;
  std::unique_ptr<dist::Runtime> rt;  // outlives the handlers below, so they can still abort the job
  try {
    rt = std::make_unique<dist::Runtime>(&argc, &argv);
    config::ParseResult parsed;
    rt->agree([&] {
      parsed = config::parseCommandLine(command, std::vector<std::string>(argv + 2, argv + argc));
      if (!parsed.helpShown) applyRuntimeOptions(parsed.config);
    });
    if (parsed.helpShown) {
      if (rt->worldRank() == 0) std::fputs(config::help(parsed.config.command).c_str(), stdout);
      return 0;
    }
    // Ranks started with different options are refused before anything else runs.
    rt->agree([&] { rt->checkSame(config::syncedOptions(parsed.config), "options"); });
    status = dispatch(parsed.config, *rt);
  } catch (const dist::CollectiveFailure&) {
    status = 1;  // every rank agreed on the failure; its message is already printed
  } catch (const Error& e) {
    logError(e.message());
    logDebug("raised at ", e.location());
    dist::Runtime::abortJob(1);
    status = 1;
  } catch (const std::exception& e) {
    logError(e.what());
    dist::Runtime::abortJob(1);
    status = 1;
  }
  return status;
}
