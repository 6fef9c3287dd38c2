#pragma once
// The commands of the `pardit` executable: each parses nothing (main did), calls the library and prints.
// Each returns the process exit code; errors are thrown as pardit::Error.
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "config/config.h"
#include "pardit/dist/runtime.h"

namespace pardit::app {

int runForward(const config::EngineConfig& c, dist::Runtime& rt);
int runGenerate(const config::EngineConfig& c, dist::Runtime& rt);
int runEncode(const config::EngineConfig& c, dist::Runtime& rt);
int runBench(const config::EngineConfig& c, dist::Runtime& rt);
int runSynth(const config::EngineConfig& c);
int runPlan(const config::EngineConfig& c);
int runQuantize(const config::EngineConfig& c);

// Rank 0 writes a JSON report (a failure to write ends every rank).
void writeJsonReport(dist::Runtime& rt, const std::string& path, const nlohmann::ordered_json& report);

}  // namespace pardit::app
