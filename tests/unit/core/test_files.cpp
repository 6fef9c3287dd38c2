// Safe outputs: temporaries beside the target, committed by rename, removed on failure, destruction and
// SIGTERM; inputs of a run and non-regular files are never replaced.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>

#include "pardit/core/error.h"
#include "pardit/core/files.h"
#include "test_util.h"

namespace fs = std::filesystem;
using pardit::test::TempDir;

namespace {
void writeFile(const std::string& path, const std::string& text) { std::ofstream(path) << text; }
std::string readFile(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
// Files of `dir` whose name ends in .tmp.
int temporaries(const std::string& dir) {
  int n = 0;
  for (const auto& e : fs::directory_iterator(dir)) n += e.path().extension() == ".tmp";
  return n;
}
}  // namespace

TEST(Files, TemporariesAreHiddenUniqueAndBesideTheTarget) {
  TempDir dir;
  const std::string a = pardit::temporaryPathFor(dir.file("out.png")),
                    b = pardit::temporaryPathFor(dir.file("out.png"));
  EXPECT_NE(a, b);
  EXPECT_EQ(fs::path(a).parent_path(), fs::path(dir.file("out.png")).parent_path());
  EXPECT_EQ(fs::path(a).filename().string().rfind(".out.png.", 0), 0u) << a;
}

TEST(Files, CommitReplacesTheTargetAndAnUncommittedTemporaryIsRemoved) {
  TempDir dir;
  const std::string target = dir.file("x.txt");
  writeFile(target, "old");
  {
    pardit::TemporaryFile t(target);
    writeFile(t.path(), "new");
    t.commit("--test");
  }
  EXPECT_EQ(readFile(target), "new");
  {
    pardit::TemporaryFile t(target);
    writeFile(t.path(), "partial");
  }  // a writer that failed: the target keeps its content, nothing is left behind
  EXPECT_EQ(readFile(target), "new");
  EXPECT_EQ(temporaries(dir.path()), 0);
}

TEST(Files, SigtermRemovesTheTemporariesBeingWritten) {
  TempDir dir;
  const std::string target = dir.file("latents.safetensors");
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    pardit::TemporaryFile t(target);
    writeFile(t.path(), "half a file");
    ::raise(SIGTERM);
    ::_exit(3);  // not reached: SIGTERM's default action ends the process
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) << "status " << status;
  EXPECT_EQ(temporaries(dir.path()), 0);
  EXPECT_FALSE(fs::exists(target));
}

TEST(Files, InputsAndNonRegularFilesAreNeverReplaced) {
  TempDir dir;
  const std::string input = dir.file("model.safetensors"), link = dir.file("alias.safetensors");
  writeFile(input, "weights");
  fs::create_hard_link(input, link);
  EXPECT_NO_THROW(pardit::checkReplaceable(input, "--save-latents"));
  pardit::registerInputFile(input);
  EXPECT_TRUE(pardit::isInputFile(link));  // another name of the same file
  try {
    pardit::checkReplaceable(link, "--save-latents");
    FAIL() << "an input was accepted as an output";
  } catch (const pardit::Error& e) {
    EXPECT_NE(std::string(e.what()).find("is an input of this run"), std::string::npos) << e.what();
  }
  pardit::TemporaryFile t(input);
  writeFile(t.path(), "latents");
  EXPECT_THROW(t.commit("--save-latents"), pardit::Error);
  EXPECT_EQ(readFile(input), "weights");
  EXPECT_THROW(pardit::checkReplaceable("/dev/null", "--output"), pardit::Error);
  EXPECT_NO_THROW(pardit::checkReplaceable(dir.file("new.png"), "--output"));
}
