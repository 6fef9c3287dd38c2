// The streamer's sources on the CPU (the analogue of the GPU's host-to-device streaming): a checkpoint's
// tensors read as stored bytes straight into the group buffers, the host copy, the choice between them
// under --host-memory-budget, the read-ahead depth, and the bytes read and host memory each holds.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <fstream>

#include "pardit/core/error.h"
#include "pardit/core/sysinfo.h"
#include "pardit/io/checkpoint.h"
#include "pardit/io/quantize.h"
#include "pardit/io/synth.h"
#include "pardit/memory/planner.h"
#include "pardit/memory/streamer.h"
#include "pardit/model/fp8.h"
#include "pardit/pipeline/latents.h"
#include "pardit/pipeline/loading.h"
#include "test_util.h"

using namespace pardit;

namespace {

model::FluxInputs inputsFor(const model::FluxConfig& c, c10::ScalarType dtype) {
  const pipeline::LatentGeometry geom{32, 32, 16};
  at::manual_seed(11);
  return {at::randn({1, geom.tokens(), c.inChannels}).to(dtype),
          at::randn({1, 8, c.contextInDim}).to(dtype),
          at::randn({1, c.vecInDim}).to(dtype),
          at::tensor({0.6f}).to(dtype),
          at::tensor({3.5f}).to(dtype),
          pipeline::imageIds(geom),
          pipeline::textIds(8)};
}

memory::StoredSource storedOf(const io::FluxCheckpoint& ck) {
  return [&ck](const std::string& n, c10::ScalarType t) {
    return ck.has(n) ? ck.storedRanges(n, t) : std::vector<io::StoredRange>{};
  };
}

// The peak RSS from now on: the kernel's high-water mark reset to the current RSS.
void resetPeakRss() {
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";
  clear.close();
  ASSERT_TRUE(clear.good()) << "cannot reset the peak RSS through /proc/self/clear_refs";
}

}  // namespace

// The file ranges of a tensor are its bytes as stored: diffusers' separate q, k, v become three ranges of
// three tensors, the final layer's swapped scale|shift halves two ranges of one tensor in the other order;
// BFL's fused tensors one range. Concatenated they are what load() returns. A tensor stored in another
// dtype has none (it is converted while loading).
TEST(StreamingSources, StoredRangesAreTheLoadedBytes) {
  for (const std::string layout : {"diffusers", "flux1-tiny-dev.safetensors"}) {
    const auto ck = io::FluxCheckpoint::open(test::fixture("flux_tiny_dev/" + layout));
    const c10::ScalarType stored = ck.storedDtype();
    size_t multiRange = 0;
    for (const auto& g : model::fluxWeightGroups(ck.config()))
      for (const auto& spec : g.tensors) {
        const auto ranges = ck.storedRanges(spec.name, stored);
        ASSERT_FALSE(ranges.empty()) << layout << ": " << spec.name;
        multiRange += ranges.size() > 1;
        at::Tensor expect = ck.load(spec.name, stored).contiguous();
        std::vector<uint8_t> bytes;
        for (const auto& r : ranges) {
          const size_t at = bytes.size();
          bytes.resize(at + r.bytes);
          r.file->readBytes(*r.tensor, r.offset, r.bytes, bytes.data() + at);
        }
        ASSERT_EQ(bytes.size(), expect.nbytes()) << layout << ": " << spec.name;
        EXPECT_EQ(std::memcmp(bytes.data(), expect.data_ptr(), bytes.size()), 0) << layout << ": " << spec.name;
      }
    if (layout == "diffusers") {
      EXPECT_EQ(ck.storedRanges("double_blocks.0.img_attn.qkv.weight", stored).size(), 3u);
      const auto fin = ck.storedRanges("final_layer.adaLN_modulation.1.weight", stored);
      ASSERT_EQ(fin.size(), 2u);
      EXPECT_EQ(fin[0].tensor, fin[1].tensor);
      EXPECT_GT(fin[0].offset, fin[1].offset);  // shift (the second half) first
      EXPECT_GT(multiRange, 0u);
    } else {
      EXPECT_EQ(multiRange, 0u) << "BFL tensors are stored as pardit uses them";
    }
    EXPECT_TRUE(
        ck.storedRanges("double_blocks.0.img_attn.qkv.weight", stored == at::kFloat ? at::kBFloat16 : at::kFloat)
            .empty());
  }
}

// Every block streamed from the checkpoint, in both layouts and FP8: the output equals the resident run
// bit for bit; each pass reads exactly the streamed groups' bytes from the file (as stored, by several
// threads, the getter only for FP8 scales); the read-ahead depth the plan allows is used and stays within
// the planned stream buffers; the host copy reads the file once and never again.
TEST(StreamingSources, FileAndHostSourcesReadWhatThePlanSays) {
  const test::TempDir dir;
  const auto quantized = io::quantizeCheckpoint(test::fixture("flux_tiny_dev/diffusers"), dir.file("fp8"));
  struct Case {
    std::string name, path;
    model::WeightFormat format;
  };
  for (const Case& k :
       {Case{"diffusers", test::fixture("flux_tiny_dev/diffusers"), model::WeightFormat::kDense},
        Case{"bfl", test::fixture("flux_tiny_dev/flux1-tiny-dev.safetensors"), model::WeightFormat::kDense},
        Case{"fp8 file", quantized.modelPath, model::WeightFormat::kFp8}}) {
    const auto ck = io::FluxCheckpoint::open(k.path);
    const model::FluxConfig& c = ck.config();
    const c10::ScalarType dtype = ck.storedDtype() == at::kFloat8_e4m3fn ? at::kFloat : ck.storedDtype();
    const auto read = pipeline::getterOf(pipeline::checkpointReader(ck, k.format), dtype);
    const auto in = inputsFor(c, dtype);
    const at::Tensor ref = model::FluxTransformer(c, std::make_shared<model::ResidentFluxWeights>(c, read),
                                                  std::make_shared<model::LocalAttention>())
                               .forward(in);
    const auto plan =
        memory::planRank(test::wholeModel(c, dtype, 16, 8, k.format), 1ULL << 40, memory::Offload::kSequential);
    ASSERT_EQ(plan.prefetchDepth, memory::kMaxPrefetchDepth) << "an ample budget reads further ahead";
    uint64_t largest = 0, storedPerPass = 0;
    for (const auto& g : plan.groups)
      if (g.streamed) largest = std::max(largest, g.bufferBytes);
    for (const bool host : {false, true}) {
      const std::string what = k.name + (host ? ", host copy" : ", file");
      memory::StreamingOptions o;
      o.hostCache = host;
      o.format = k.format;
      o.dtype = dtype;
      o.stored = storedOf(ck);
      o.readThreads = 3;
      o.prefetchDepth = plan.prefetchDepth;
      const uint64_t before = ck.bytesRead();
      auto s = std::make_shared<memory::StreamingFluxWeights>(c, read, plan, at::kCPU, o);
      storedPerPass = 0;
      for (const auto& g : plan.groups)
        if (g.streamed) storedPerPass += s->layout(g.name).storedBytes;
      // Every tensor is read as stored but FP8 scales (4 bytes a row), which go through the getter.
      uint64_t scaleBytes = 0;
      for (const auto& g : plan.groups)
        if (g.streamed)
          for (const auto& t : s->layout(g.name).tensors) {
            const bool scale = t.name.size() > 13 && t.name.compare(t.name.size() - 13, 13, ".weight_scale") == 0;
            EXPECT_EQ(t.ranges.empty(), scale) << what << ": " << t.name;
            if (scale) scaleBytes += t.bytes;
          }
      EXPECT_EQ(storedPerPass + scaleBytes, plan.streamedBytes) << what;
      EXPECT_EQ(scaleBytes > 0, k.format == model::WeightFormat::kFp8) << what;
      const uint64_t atStart = ck.bytesRead();
      EXPECT_EQ(s->storedBytesRead(), host ? storedPerPass : 0u) << what;
      model::FluxTransformer t(c, s, std::make_shared<model::LocalAttention>());
      for (int pass = 0; pass < 3; ++pass) EXPECT_TRUE(at::equal(t.forward(in), ref)) << what << ", pass " << pass;
      s->endOfRun();
      const uint64_t passes = s->storedBytesRead() - (host ? storedPerPass : 0);
      if (host) {
        EXPECT_EQ(ck.bytesRead(), atStart) << what << ": the host copy reads the file once";
        EXPECT_EQ(passes, 0u) << what;
      } else {
        // Three passes' groups, and at most the read-ahead of a fourth that endOfRun() stopped.
        EXPECT_GE(passes, 3 * storedPerPass) << what;
        EXPECT_LE(passes, 3 * storedPerPass + static_cast<uint64_t>(plan.prefetchDepth) * largest) << what;
        EXPECT_GE(ck.bytesRead() - before, 3 * storedPerPass) << what;
      }
      EXPECT_LE(s->accountant().peak(), plan.residentBytes + plan.streamBufferBytes) << what;
      EXPECT_GT(s->accountant().peak(), plan.residentBytes + largest) << what << ": groups read ahead";
      // Recycled buffers: as many as the read-ahead and the group in use need, each the largest group's size.
      if (!host) {
        EXPECT_LE(s->hostBytes(), static_cast<uint64_t>(plan.prefetchDepth + 1) * largest) << what;
      }
    }
  }
}

// The streamer on CUDA (label gpu): every block streamed to the device, from the file through the two
// pinned staging buffers (small here, so that every group crosses several chunks) and from the pinned
// host copy, gives the resident CUDA run bit for bit over three passes; each pass reads exactly the
// streamed groups' bytes from the file (the host copy: once, at construction); the host memory is the two
// staging buffers, or the streamed groups' buffers.
TEST(CudaStreaming, FileAndHostSourcesEqualTheResidentRun) {
  PARDIT_REQUIRE_CUDA();
  const c10::Device cuda(c10::kCUDA, 0);
  {  // diffusers' layout: q, k, v read as three ranges, the final layer's halves swapped
    const std::string layout = "diffusers";
    const auto ck = io::FluxCheckpoint::open(test::fixture("flux_tiny_dev/" + layout));
    const model::FluxConfig& c = ck.config();
    const c10::ScalarType dtype = ck.storedDtype();
    const auto reader = pipeline::checkpointReader(ck, model::WeightFormat::kDense);
    const auto in = test::inputsOn(inputsFor(c, dtype), cuda);
    const auto resident = std::make_shared<model::ResidentFluxWeights>(c, pipeline::getterOf(reader, dtype, cuda));
    const at::Tensor ref =
        model::FluxTransformer(c, resident, std::make_shared<model::LocalAttention>()).forward(in).cpu();
    const auto plan = memory::planRank(test::wholeModel(c, dtype, 16, 8), 1ULL << 40, memory::Offload::kSequential);
    uint64_t largest = 0;
    for (const auto& g : plan.groups)
      if (g.streamed) largest = std::max(largest, g.bufferBytes);
    for (const bool host : {false, true}) {
      const std::string what = layout + (host ? ", host copy" : ", file");
      memory::StreamingOptions o;
      o.hostCache = host;
      o.dtype = dtype;
      o.stored = storedOf(ck);
      o.readThreads = 3;
      o.prefetchDepth = plan.prefetchDepth;
      o.stagingBytes = 4096;
      auto s = std::make_shared<memory::StreamingFluxWeights>(c, pipeline::getterOf(reader, dtype), plan, cuda, o);
      uint64_t storedPerPass = 0, buffers = 0;
      for (const auto& g : plan.groups)
        if (g.streamed) {
          storedPerPass += s->layout(g.name).storedBytes;
          buffers += s->layout(g.name).bytes;
        }
      EXPECT_EQ(storedPerPass, plan.streamedBytes) << what << ": every tensor read as stored";
      const uint64_t atStart = ck.bytesRead();
      model::FluxTransformer t(c, s, std::make_shared<model::LocalAttention>());
      const auto started = std::chrono::steady_clock::now();
      for (int pass = 0; pass < 3; ++pass) {
        const at::Tensor out = t.forward(in);
        EXPECT_TRUE(out.is_cuda()) << what;
        EXPECT_TRUE(at::equal(out.cpu(), ref)) << what << ", pass " << pass;
      }
      s->endOfRun();
      // The compute stream's waits for the copies, timed on the device: within the passes' wall time.
      const double passes = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
      const double stood = s->deviceWaitSeconds();
      std::printf("[cuda] streaming %s: the compute stream waited %.3f ms for weights in %.3f ms of passes\n",
                  what.c_str(), stood * 1e3, passes * 1e3);
      EXPECT_GE(stood, 0.0) << what;
      EXPECT_LE(stood, passes) << what;
      if (host) {
        EXPECT_EQ(s->storedBytesRead(), storedPerPass) << what << ": the host copy reads the file once";
        EXPECT_EQ(ck.bytesRead(), atStart) << what;
        EXPECT_EQ(s->hostBytes(), buffers) << what;
      } else {
        EXPECT_GE(s->storedBytesRead(), 3 * storedPerPass) << what;
        EXPECT_LE(s->storedBytesRead(), 3 * storedPerPass + static_cast<uint64_t>(plan.prefetchDepth) * largest)
            << what;
        EXPECT_EQ(s->hostBytes(), 2 * std::min<uint64_t>(o.stagingBytes, largest)) << what;
      }
      EXPECT_LE(s->accountant().peak(), plan.residentBytes + plan.streamBufferBytes) << what;
    }
  }
}

// Host memory on the CPU, measured: streaming every block of a 312 MB model from the file holds the
// planned stream buffers, not the model; the host copy holds the streamed bytes once (no second copy
// while reading them), within 10% of what each must hold.
TEST(StreamingSources, HostMemoryStaysWithinWhatTheSourceMustHold) {
  if (test::underAddressSanitizer()) {
    GTEST_SKIP() << "AddressSanitizer keeps freed memory in quarantine: RSS bounds do not apply";
  }
  const test::TempDir dir;
  io::SynthOptions so;
  so.config = model::FluxConfig::preset("small");
  so.presetName = "small";
  so.layout = io::CheckpointLayout::kBfl;
  so.outDir = dir.file("small");
  so.dtype = at::kBFloat16;
  so.withVae = false;
  so.withText = false;
  const auto made = io::synthesizeCheckpoint(so);
  const auto ck = io::FluxCheckpoint::open(made.modelPath);
  const model::FluxConfig& c = ck.config();
  const auto read = ck.getter(at::kBFloat16);
  const auto in = inputsFor(c, at::kBFloat16);
  auto plan = memory::planRank(test::wholeModel(c, at::kBFloat16, 16, 8), 1ULL << 40, memory::Offload::kSequential);
  plan.prefetchDepth = 1;  // the tightest buffers
  uint64_t largest = 0, copies = 0;
  for (const auto& g : plan.groups)
    if (g.streamed) {
      largest = std::max(largest, g.bufferBytes);
      copies += g.bufferBytes;
    }
  plan.streamBufferBytes = 2 * largest;
  ASSERT_GT(copies, 250ULL << 20);
  at::Tensor ref;
  for (const bool host : {false, true}) {
    releaseFreedMemory();
    const uint64_t base = currentRssBytes();
    resetPeakRss();
    memory::StreamingOptions o;
    o.hostCache = host;
    o.dtype = at::kBFloat16;
    o.stored = storedOf(ck);
    o.prefetchDepth = 1;
    at::Tensor out;
    uint64_t hostBytes = 0;
    {
      auto s = std::make_shared<memory::StreamingFluxWeights>(c, read, plan, at::kCPU, o);
      model::FluxTransformer t(c, s, std::make_shared<model::LocalAttention>());
      for (int pass = 0; pass < 2; ++pass) out = t.forward(in);
      s->endOfRun();
      hostBytes = s->hostBytes();
    }
    const uint64_t peak = peakRssBytes() - base;
    // What the source must hold: resident weights, the stream buffers in use and read ahead, the host copy.
    const uint64_t must = plan.residentBytes + plan.streamBufferBytes + (host ? copies : 0);
    // The forward's own activations at 16 + 8 tokens and library scratch space: a fixed allowance.
    const uint64_t allowance = 24ULL << 20;
    std::printf(
        "[streaming] small preset bf16, every block streamed from the %s: peak RSS +%.1f MiB, must hold "
        "%.1f MiB (model %.1f MiB, stream buffers %.1f MiB), streaming host memory %.1f MiB\n",
        host ? "host copy" : "file", peak / 1048576.0, must / 1048576.0, copies / 1048576.0,
        plan.streamBufferBytes / 1048576.0, hostBytes / 1048576.0);
    EXPECT_LE(peak, must + must / 10 + allowance) << (host ? "host copy" : "file");
    if (host) {
      EXPECT_GE(hostBytes, copies);
    }
    if (!ref.defined()) ref = out;
    EXPECT_TRUE(at::equal(out, ref));
  }
}

// --stream-from under --host-memory-budget: auto takes the host copy on CUDA when it fits, else the file;
// on the CPU the file; host beyond the budget is a one-line error naming both flags.
TEST(StreamingSources, SourceChoiceFollowsTheHostBudget) {
  const auto c = model::FluxConfig::preset("flux-dev");
  auto plan = memory::planRank(test::wholeModel(c, at::kBFloat16, 4096, 512), 12ULL << 30, memory::Offload::kAuto);
  ASSERT_TRUE(plan.fits && plan.anyStreamed());
  uint64_t copies = 0;
  for (const auto& g : plan.groups)
    if (g.streamed) copies += g.bufferBytes;
  memory::chooseStreamSource(plan, memory::StreamSource::kAuto, /*cuda=*/true, copies);
  EXPECT_TRUE(plan.streamFromHost);
  EXPECT_EQ(plan.hostBytes, copies);
  memory::chooseStreamSource(plan, memory::StreamSource::kAuto, /*cuda=*/true, copies - 1);
  EXPECT_FALSE(plan.streamFromHost);
  EXPECT_EQ(plan.hostBytes, 2 * memory::kStagingBytes);
  memory::chooseStreamSource(plan, memory::StreamSource::kAuto, /*cuda=*/false, 1ULL << 50);
  EXPECT_FALSE(plan.streamFromHost);
  EXPECT_EQ(plan.hostBytes, 0u);
  memory::chooseStreamSource(plan, memory::StreamSource::kFile, /*cuda=*/true, 1ULL << 50);
  EXPECT_FALSE(plan.streamFromHost);
  try {
    memory::chooseStreamSource(plan, memory::StreamSource::kHost, /*cuda=*/true, 1ULL << 30);
    ADD_FAILURE() << "host beyond the host budget was accepted";
  } catch (const Error& e) {
    const std::string m = e.message();
    EXPECT_NE(m.find("--stream-from host needs"), std::string::npos) << m;
    EXPECT_NE(m.find("--host-memory-budget is 1.00 GiB"), std::string::npos) << m;
  }
  // A plan without streamed groups needs nothing.
  auto resident = memory::planRank(test::wholeModel(c, at::kBFloat16, 4096, 512), 80ULL << 30, memory::Offload::kNone);
  memory::chooseStreamSource(resident, memory::StreamSource::kHost, true, 0);
  EXPECT_EQ(resident.hostBytes, 0u);
}

// The read-ahead depth: as deep as the budget allows, up to kMaxPrefetchDepth, each level one more buffer
// of the largest streamed group.
TEST(StreamingSources, PrefetchDepthGrowsWithTheBudget) {
  const auto c = model::FluxConfig::preset("flux-dev");
  const auto w = test::wholeModel(c, at::kBFloat16, 4096, 512);
  const auto tight = memory::planRank(w, 12ULL << 30, memory::Offload::kAuto);
  const auto seq = memory::planRank(w, 80ULL << 30, memory::Offload::kSequential);
  const uint64_t doubleBlock = memory::groupBufferBytes(c, "double_blocks.0", at::kBFloat16);
  EXPECT_EQ(seq.prefetchDepth, memory::kMaxPrefetchDepth);
  EXPECT_EQ(seq.streamBufferBytes, static_cast<uint64_t>(memory::kMaxPrefetchDepth + 1) * doubleBlock);
  EXPECT_LE(tight.total(), tight.budget);
  EXPECT_EQ(tight.streamBufferBytes % (static_cast<uint64_t>(tight.prefetchDepth) + 1), 0u);
  // With room for exactly one more buffer than depth 1 needs, the depth is 2.
  auto one = memory::planRank(w, 80ULL << 30, memory::Offload::kSequential);
  const uint64_t depth1 = one.total() - one.streamBufferBytes + 2 * doubleBlock;
  const auto two = memory::planRank(w, depth1 + doubleBlock, memory::Offload::kSequential);
  EXPECT_EQ(two.prefetchDepth, 2);
  const auto single = memory::planRank(w, depth1, memory::Offload::kSequential);
  EXPECT_EQ(single.prefetchDepth, 1);
}
