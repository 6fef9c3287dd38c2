#pragma once
// The parallel topology: world = cfg x pipefusion x ring x ulysses, with rank order (fastest first)
//   rank = u + U * (r + R * (p + P * c)).
// Ulysses (an all-to-all per attention layer, the heaviest traffic) is innermost so its groups are
// neighbouring ranks; PipeFusion (small point-to-point) and CFG (one all-gather per step) can cross
// nodes. A value type with pure getters.

#include <string>
#include <vector>

namespace pardit::dist {

struct ParallelDegrees {
  int cfg = 1;
  int pipefusion = 1;
  int ring = 1;
  int ulysses = 1;

  int worldSize() const { return cfg * pipefusion * ring * ulysses; }
  int spDegree() const { return ring * ulysses; }
  std::string describe() const;  // "cfg 2 x pipefusion 1 x ring 1 x ulysses 2"
};

enum class GroupKind { kUlysses, kRing, kSequence, kPipeFusion, kCfg };

class Topology {
 public:
  // Throws pardit::Error naming the flags when the degrees are invalid or do not multiply to worldSize.
  static void validate(const ParallelDegrees& degrees, int worldSize);

  Topology() = default;
  Topology(const ParallelDegrees& degrees, int rank);

  const ParallelDegrees& degrees() const { return degrees_; }
  int rank() const { return rank_; }
  int worldSize() const { return degrees_.worldSize(); }
  int ulyssesRank() const { return u_; }
  int ringRank() const { return r_; }
  int pipefusionRank() const { return p_; }
  int cfgRank() const { return c_; }
  // Rank inside the sequence-parallel (Ulysses x Ring) group: ringRank * U + ulyssesRank. The image
  // sequence is chunked in this order.
  int spRank() const { return r_ * degrees_.ulysses + u_; }
  int spDegree() const { return degrees_.spDegree(); }

  int rankOf(int cfg, int pipefusion, int ring, int ulysses) const;
  // World ranks of this rank's group of the given kind, ordered by the rank inside the group.
  std::vector<int> group(GroupKind kind) const;
  // Rank of this process inside its group of the given kind, and a colour unique to the group
  // (for MPI_Comm_split).
  int rankInGroup(GroupKind kind) const;
  int groupColor(GroupKind kind) const;

 private:
  ParallelDegrees degrees_;
  int rank_ = 0;
  int u_ = 0, r_ = 0, p_ = 0, c_ = 0;
};

const char* groupName(GroupKind kind);

}  // namespace pardit::dist
