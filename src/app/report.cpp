#include <fstream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "pardit/core/error.h"
#include "pardit/io/safetensors.h"

namespace pardit::app {

void writeJsonReport(dist::Runtime& rt, const std::string& path, const nlohmann::ordered_json& report) {
  if (path.empty()) return;
  rt.agree([&] {
    if (rt.worldRank() != 0) return;
    io::checkOutputPath(path, "--output");
    std::ofstream out(path);
    PARDIT_CHECK(out.good(), path, ": cannot write (--output)");
    out << report.dump(2) << "\n";
    PARDIT_CHECK(out.good(), path, ": write failed (--output)");
  });
}

}  // namespace pardit::app
