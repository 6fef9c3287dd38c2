// The pardit executable: `pardit <command> [options]`.
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "commands.h"
#include "pardit/config/config.h"
#include "pardit/core/error.h"
#include "pardit/core/log.h"
#include "pardit/version.h"

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
  try {
    const std::vector<std::string> args(argv + 2, argv + argc);
    config::ParseResult parsed = config::parseCommandLine(command, args);
    if (parsed.helpShown) return 0;
    app::applyRuntimeOptions(parsed.config);
    if (command == "forward") return app::runForward(parsed.config);
    if (command == "generate") return app::runGenerate(parsed.config);
    if (command == "synth") return app::runSynth(parsed.config);
    if (command == "bench") return app::runBench(parsed.config);
    PARDIT_THROW("unknown command '", command, "'");
  } catch (const Error& e) {
    logError(e.message());
    logDebug("raised at ", e.location());
    return 1;
  } catch (const std::exception& e) {
    logError(e.what());
    return 1;
  }
}
