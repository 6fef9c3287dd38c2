#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <fstream>

#include "pardit/core/error.h"
#include "pardit/io/safetensors.h"
#include "test_util.h"

using namespace pardit;
using pardit::test::TempDir;

namespace {

// Writes 8-byte length + header + data verbatim.
void writeRaw(const std::string& path, const std::string& header, size_t dataBytes, uint64_t lengthOverride = 0) {
  std::ofstream out(path, std::ios::binary);
  uint64_t n = lengthOverride ? lengthOverride : header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header;
  for (size_t i = 0; i < dataBytes; ++i) out.put(static_cast<char>(i));
}

std::string openError(const std::string& path) {
  try {
    io::SafetensorsFile::open(path);
  } catch (const Error& e) {
    return e.message();
  }
  return "";
}

}  // namespace

TEST(Safetensors, RoundTripAllCommonDtypes) {
  TempDir dir;
  std::map<std::string, at::Tensor> tensors = {
      {"f32", at::randn({3, 5})},
      {"bf16", at::randn({4, 2}).to(at::kBFloat16)},
      {"f16", at::randn({7}).to(at::kHalf)},
      {"i64", at::arange(10)},
      {"scalar", at::scalar_tensor(2.5)},
      {"empty", at::empty({0, 4})},
  };
  io::writeSafetensors(dir.file("a.safetensors"), tensors, {{"format", "pt"}});
  auto f = io::SafetensorsFile::open(dir.file("a.safetensors"));
  EXPECT_EQ(f->metadata().at("format"), "pt");
  EXPECT_EQ(f->tensors().size(), tensors.size());
  EXPECT_EQ(f->dataOffset() % 8, 0u);  // header padded to 8 bytes
  for (const auto& [name, t] : tensors) {
    at::Tensor r = f->read(name);
    EXPECT_EQ(r.scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(r.sizes(), t.sizes()) << name;
    EXPECT_TRUE(at::equal(r, t)) << name;
  }
  EXPECT_EQ(f->bytesRead(), f->fileSize() - f->dataOffset());
}

TEST(Safetensors, ReadRowsReadsOnlyThoseBytes) {
  TempDir dir;
  at::Tensor t = at::arange(60, at::kFloat).reshape({12, 5});
  io::writeSafetensors(dir.file("r.safetensors"), {{"w", t}});
  auto f = io::SafetensorsFile::open(dir.file("r.safetensors"));
  at::Tensor rows = f->readRows("w", 3, 7);
  EXPECT_TRUE(at::equal(rows, t.narrow(0, 3, 4)));
  EXPECT_EQ(f->bytesRead(), 4u * 5 * 4);
  EXPECT_THROW(f->readRows("w", 5, 13), Error);
}

TEST(Safetensors, ZeroFillWritesSparseFileWithValidHeader) {
  TempDir dir;
  io::SafetensorsWriter w;
  w.addLazy("big", at::kBFloat16, {4096, 4096}, nullptr);
  w.write(dir.file("z.safetensors"));
  auto f = io::SafetensorsFile::open(dir.file("z.safetensors"));
  EXPECT_EQ(f->info("big").nbytes(), 4096u * 4096 * 2);
  EXPECT_TRUE(at::equal(f->readRows("big", 100, 101), at::zeros({1, 4096}, at::kBFloat16)));
}

TEST(Safetensors, FailedWriteLeavesNoFileUnderTheFinalName) {
  TempDir dir;
  io::SafetensorsWriter w;
  w.addLazy("x", at::kFloat, {2, 2}, [] { return at::zeros({3, 3}); });  // wrong shape
  EXPECT_THROW(w.write(dir.file("x.safetensors")), Error);
  EXPECT_FALSE(std::filesystem::exists(dir.file("x.safetensors")));
  EXPECT_FALSE(std::filesystem::exists(dir.file("x.safetensors.tmp")));
}

TEST(Safetensors, ParsesTheReferenceExample) {
  TempDir dir;
  writeRaw(dir.file("e.safetensors"), R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})", 24);
  auto f = io::SafetensorsFile::open(dir.file("e.safetensors"));
  EXPECT_EQ(f->info("attn.0").shape, (std::vector<int64_t>{1, 2, 3}));
}

struct BadFile {
  const char* what;
  std::string header;
  size_t data;
  uint64_t lengthOverride;
  const char* expect;
};

TEST(Safetensors, RejectsCorruptFilesWithAClearMessage) {
  const std::vector<BadFile> cases = {
      {"huge header", "{}", 0, 200'000'000, "exceeds the maximum"},
      {"header beyond file", "{}", 0, 5000, "exceeds the file size"},
      {"invalid json", "{\"a\": [1, 2", 0, 0, "not valid JSON"},
      {"not json object", "[1, 2, 3]  ", 0, 0, "does not start with '{'"},
      {"unknown dtype", R"({"w":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}})", 8, 0, "unknown dtype 'F17'"},
      {"size mismatch", R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8, 0, "shape x dtype size is 12"},
      {"beyond data", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8, 0, "beyond the data area"},
      {"overlap",
       R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       12, 0, "overlaps"},
      {"gap", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8, 0, "gap of 4 bytes"},
      {"trailing bytes", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 12, 0, "trailing garbage"},
      {"negative shape", R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4, 0, "non-negative"},
      {"missing offsets", R"({"a":{"dtype":"F32","shape":[1]}})", 4, 0, "data_offsets"},
      {"reversed offsets", R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}})", 4, 0, "reversed"},
      {"bad metadata", R"({"__metadata__":{"k":1}})", 0, 0, "is not a string"},
  };
  TempDir dir;
  for (const auto& c : cases) {
    const std::string path = dir.file("bad.safetensors");
    writeRaw(path, c.header, c.data, c.lengthOverride);
    const std::string msg = openError(path);
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.what << ": got '" << msg << "'";
    EXPECT_NE(msg.find(path), std::string::npos) << c.what << ": message must name the file";
    EXPECT_EQ(msg.find('\n'), std::string::npos) << c.what << ": one line";
  }
}

TEST(Safetensors, TruncatedFileIsAnErrorNamingFileAndTensor) {
  TempDir dir;
  io::writeSafetensors(dir.file("t.safetensors"), {{"weight", at::randn({64, 64})}});
  std::filesystem::resize_file(dir.file("t.safetensors"), std::filesystem::file_size(dir.file("t.safetensors")) - 100);
  const std::string msg = openError(dir.file("t.safetensors"));
  EXPECT_NE(msg.find("weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("t.safetensors"), std::string::npos) << msg;
  std::filesystem::resize_file(dir.file("t.safetensors"), 5);
  EXPECT_NE(openError(dir.file("t.safetensors")).find("shorter than the 8-byte"), std::string::npos);
}

TEST(Safetensors, MissingTensorAndMissingFile) {
  TempDir dir;
  io::writeSafetensors(dir.file("m.safetensors"), {{"a", at::ones({2})}});
  auto f = io::SafetensorsFile::open(dir.file("m.safetensors"));
  try {
    f->read("b");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("tensor 'b' not found"), std::string::npos);
    EXPECT_NE(e.message().find("m.safetensors"), std::string::npos);
  }
  EXPECT_NE(openError(dir.file("nope.safetensors")).find("cannot open"), std::string::npos);
}
