#pragma once
#include "pardit/config/config.h"
#include "pardit/dist/runtime.h"

namespace pardit::app {

// Each returns the process exit code; errors are thrown as pardit::Error.
int runForward(const config::EngineConfig& c, dist::Runtime& rt);
int runGenerate(const config::EngineConfig& c, dist::Runtime& rt);
int runSynth(const config::EngineConfig& c);
int runBench(const config::EngineConfig& c, dist::Runtime& rt);
int runCommBench(const config::EngineConfig& c, dist::Runtime& rt);
int runPlan(const config::EngineConfig& c);

// Applies --threads, --log-level and --quiet.
void applyRuntimeOptions(const config::EngineConfig& c);

}  // namespace pardit::app
