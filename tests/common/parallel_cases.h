#pragma once
// Parallel results against the single-rank result, written once against dist::Runtime and run twice:
// by the MPI test binary under mpiexec (tests/mpi) and on in-process ranks (tests/unit/parallel), so the
// USP, CFG and PipeFusion scheduling is tested without mpiexec too. Each case covers every layout of the
// runtime's world size that it lists; rank 0 prints one line per layout.

#include "pardit/dist/runtime.h"

namespace pardit::test {

// USP (Ulysses, Ring, both) and CFG for one transformer call, text split and replicated, two models.
void uspCfgForwardMatchesSingleRank(dist::Runtime& rt);
// A 3-step true-CFG denoising loop on every USP/CFG layout.
void uspCfgGenerateMatchesSingleRank(dist::Runtime& rt);
// Bytes each rank sends per forward equal the analytic volume (world size >= 2).
void communicationVolumeIsAnalytic(dist::Runtime& rt);
// PipeFusion on the tiny model (world size 2 or 4): exact with full warm-up / one patch, bounded stale K/V.
void pipeFusionTinyMatchesSingleRank(dist::Runtime& rt);
// The same on the small preset (world size 2).
void pipeFusionSmallMatchesSingleRank(dist::Runtime& rt);
// Every PipeFusion stage reads exactly its own tensors from a sharded checkpoint.
void pipeFusionRanksReadTheirStage(dist::Runtime& rt);

}  // namespace pardit::test
