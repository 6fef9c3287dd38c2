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
    case GroupKind::kUlysses:
      return "ulysses";
    case GroupKind::kRing:
      return "ring";
    case GroupKind::kSequence:
      return "sequence";
    case GroupKind::kPipeFusion:
      return "pipefusion";
    case GroupKind::kCfg:
      return "cfg";
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
  // The coordinates that vary inside a group of this kind; the others are this rank's. Looping in rank
  // order (cfg outermost, Ulysses innermost) orders the group by the rank inside it.
  const bool c = kind == GroupKind::kCfg, p = kind == GroupKind::kPipeFusion;
  const bool r = kind == GroupKind::kRing || kind == GroupKind::kSequence;
  const bool u = kind == GroupKind::kUlysses || kind == GroupKind::kSequence;
  auto range = [](bool varies, int mine, int degree) {
    return varies ? std::pair{0, degree} : std::pair{mine, mine + 1};
  };
  const auto [c0, c1] = range(c, c_, degrees_.cfg);
  const auto [p0, p1] = range(p, p_, degrees_.pipefusion);
  const auto [r0, r1] = range(r, r_, degrees_.ring);
  const auto [u0, u1] = range(u, u_, degrees_.ulysses);
  std::vector<int> g;
  for (int ci = c0; ci < c1; ++ci)
    for (int pi = p0; pi < p1; ++pi)
      for (int ri = r0; ri < r1; ++ri)
        for (int ui = u0; ui < u1; ++ui) g.push_back(rankOf(ci, pi, ri, ui));
  return g;
}

int Topology::rankInGroup(GroupKind kind) const {
  switch (kind) {
    case GroupKind::kUlysses:
      return u_;
    case GroupKind::kRing:
      return r_;
    case GroupKind::kSequence:
      return spRank();
    case GroupKind::kPipeFusion:
      return p_;
    case GroupKind::kCfg:
      return c_;
  }
  return 0;
}

int Topology::groupColor(GroupKind kind) const {
  // The group's lowest world rank identifies it uniquely.
  return group(kind).front();
}

}  // namespace pardit::dist
