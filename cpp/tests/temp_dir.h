// A fresh directory under $TMPDIR for one test, removed (without following
// links) when done. Shared by the native tests that write real trees.
#pragma once
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "hubfast/extract.h"
#include "hubfast/fd.h"

namespace hubfast {
namespace testing {

inline std::string temp_base() {
  const char* t = std::getenv("TMPDIR");
  return t && *t ? t : "/tmp";
}

struct TempDir {
  std::string path;
  Fd fd;
  TempDir() {
    std::string t = temp_base() + "/hubfast-test-XXXXXX";
    REQUIRE(::mkdtemp(&t[0]) != nullptr);
    path = t;
    fd.reset(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    REQUIRE(fd);
  }
  ~TempDir() {
    fd.reset();
    size_t slash = path.rfind('/');
    Fd parent(::open(path.substr(0, slash).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    try {
      remove_tree_at(parent.get(), path.substr(slash + 1));
    } catch (...) {
    }
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& rel) const { return path + "/" + rel; }
};

}  // namespace testing
}  // namespace hubfast
