// The INI --config file from the input, parsed for each command with a few flags; and the input's first
// line as one argument value. Errors must be pardit::Error.
#include "config/config.h"
#include "fuzz_common.h"
#include "pardit/core/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string ini = pardit::fuzz::writeFile("config.ini", data, size);
  const std::string text(reinterpret_cast<const char*>(data), size);
  const std::string line = text.substr(0, text.find('\n'));
  for (const char* command : {"generate", "plan", "bench", "synth"}) {
    try {
      (void)pardit::config::parseCommandLine(command, {"--config", ini, "--model", "m"});
    } catch (const pardit::Error&) {
    }
  }
  for (const char* flag : {"--device-memory-budget", "--pp-partition", "--height", "--guidance-scale", "--seed"}) {
    try {
      (void)pardit::config::parseCommandLine("generate", {flag, line});
    } catch (const pardit::Error&) {
    }
  }
  try {
    (void)pardit::config::parseSize(line, "--fuzz");
  } catch (const pardit::Error&) {
  }
  return 0;
}
