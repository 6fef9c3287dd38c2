#include "pardit/dist/topology.h"

#include <sstream>

#include "pardit/core/error.h"

namespace pardit::dist {

std::string ParallelDegrees::describe() const {
  std::ostringstream os;
  os << "cfg " << cfg << " x pipefusion " << pipefusion << " x ring " << ring << " x ulysses " << ulysses;
  return os.str();
}

const char* groupName(GroupKind kind) {
  switch (kind) {
    case GroupKind::kUlysses: return "ulysses";
    case GroupKind::kRing: return "ring";
    case GroupKind::kSequence: return "sequence";
    case GroupKind::kPipeFusion: return "pipefusion";
    case GroupKind::kCfg: return "cfg";
  }
  return "?";
}

void Topology::validate(const ParallelDegrees& d, int worldSize) {
  PARDIT_CHECK(d.ulysses >= 1, "--ulysses-degree must be >= 1, got ", d.ulysses);
  PARDIT_CHECK(d.ring >= 1, "--ring-degree must be >= 1, got ", d.ring);
  PARDIT_CHECK(d.pipefusion >= 1, "--pipefusion-degree must be >= 1, got ", d.pipefusion);
  PARDIT_CHECK(d.cfg == 1 || d.cfg == 2, "--cfg-degree must be 1 or 2, got ", d.cfg);
  PARDIT_CHECK(d.worldSize() == worldSize, "--cfg-degree ", d.cfg, " x --pipefusion-degree ", d.pipefusion,
               " x --ring-degree ", d.ring, " x --ulysses-degree ", d.ulysses, " = ", d.worldSize(),
               " but the job has ", worldSize, " rank(s)");
}

Topology::Topology(const ParallelDegrees& d, int rank) : degrees_(d), rank_(rank) {
  PARDIT_CHECK(rank >= 0 && rank < d.worldSize(), "rank ", rank, " outside a world of ", d.worldSize());
  int x = rank;
  u_ = x % d.ulysses;
  x /= d.ulysses;
  r_ = x % d.ring;
  x /= d.ring;
  p_ = x % d.pipefusion;
  c_ = x / d.pipefusion;
}

int Topology::rankOf(int c, int p, int r, int u) const {
  const auto& d = degrees_;
  return u + d.ulysses * (r + d.ring * (p + d.pipefusion * c));
}

std::vector<int> Topology::group(GroupKind kind) const {
  const auto& d = degrees_;
  std::vector<int> g;
  switch (kind) {
    case GroupKind::kUlysses:
      for (int u = 0; u < d.ulysses; ++u) g.push_back(rankOf(c_, p_, r_, u));
      break;
    case GroupKind::kRing:
      for (int r = 0; r < d.ring; ++r) g.push_back(rankOf(c_, p_, r, u_));
      break;
    case GroupKind::kSequence:
      for (int r = 0; r < d.ring; ++r)
        for (int u = 0; u < d.ulysses; ++u) g.push_back(rankOf(c_, p_, r, u));
      break;
    case GroupKind::kPipeFusion:
      for (int p = 0; p < d.pipefusion; ++p) g.push_back(rankOf(c_, p, r_, u_));
      break;
    case GroupKind::kCfg:
      for (int c = 0; c < d.cfg; ++c) g.push_back(rankOf(c, p_, r_, u_));
      break;
  }
  return g;
}

int Topology::rankInGroup(GroupKind kind) const {
  switch (kind) {
    case GroupKind::kUlysses: return u_;
    case GroupKind::kRing: return r_;
    case GroupKind::kSequence: return spRank();
    case GroupKind::kPipeFusion: return p_;
    case GroupKind::kCfg: return c_;
  }
  return 0;
}

int Topology::groupColor(GroupKind kind) const {
  // The group's lowest world rank identifies it uniquely.
  return group(kind).front();
}

}  // namespace pardit::dist
