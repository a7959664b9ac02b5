// DirWriter and remove_tree_at on a real file system (a temp directory per
// test): masked modes, links planted inside the target, files and
// directories in each other's way, and removal that never follows a link.
#include <catch2/catch.hpp>
#include <zlib.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>

#include "hubfast/error.h"
#include "hubfast/extract.h"
#include "hubfast/fd.h"
#include "temp_dir.h"

using namespace hubfast;

namespace {

using testing::TempDir;

TarMember file_member(const std::string& path, uint64_t size, uint32_t mode = 0644) {
  TarMember m;
  m.path = path;
  m.size = size;
  m.mode = mode;
  return m;
}

TarMember dir_member(const std::string& path, uint32_t mode = 0755) {
  TarMember m;
  m.path = path;
  m.is_dir = true;
  m.mode = mode;
  return m;
}

void write_file(DirWriter& w, const std::string& path, const std::string& data, uint32_t mode = 0644) {
  w.begin_file(file_member(path, data.size(), mode));
  if (!data.empty()) w.file_data(reinterpret_cast<const uint8_t*>(data.data()), data.size());
  w.end_file();
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

mode_t mode_of(const std::string& path) {
  struct stat st;
  REQUIRE(::lstat(path.c_str(), &st) == 0);
  return st.st_mode;
}

std::string kind_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    switch (e.kind()) {
      case ErrorKind::kUnsafeArchive: return "kUnsafeArchive";
      case ErrorKind::kIntegrity: return "kIntegrity";
      case ErrorKind::kLimit: return "kLimit";
      default: return "other: " + std::string(e.what());
    }
  }
  return "none";
}

uint32_t zcrc(const std::string& s) {
  return uint32_t(crc32(0, reinterpret_cast<const Bytef*>(s.data()), uInt(s.size())));
}

}  // namespace

TEST_CASE("extract: DirWriter creates files and directories with masked modes", "[extract]") {
  TempDir t;
  DirWriter w(t.fd.get());
  w.directory(dir_member("a/b", 07777));  // parents are created too
  write_file(w, "a/b/suid", "hello", 04777);
  write_file(w, "a/b/none", "x", 0);
  write_file(w, "a/b/groupw", "g", 0664);
  write_file(w, "top", "");
  write_file(w, "new/parents/leaf", "deep", 0600);

  for (const char* d : {"a", "a/b", "new", "new/parents"}) {
    CAPTURE(d);
    mode_t m = mode_of(t / d);
    CHECK(S_ISDIR(m));
    CHECK((m & 07000) == 0);     // no setuid, setgid, sticky
    CHECK((m & 0022) == 0);      // no group or world write
    CHECK((m & 0700) == 0700);
  }
  for (const char* f : {"a/b/suid", "a/b/none", "a/b/groupw", "top", "new/parents/leaf"}) {
    CAPTURE(f);
    mode_t m = mode_of(t / f);
    CHECK(S_ISREG(m));
    CHECK((m & 07000) == 0);
    CHECK((m & 0022) == 0);
    CHECK((m & 0600) == 0600);  // always owner read-write
  }
  CHECK((mode_of(t / "a/b/suid") & 0777) == 0755);  // execute bits are kept
  CHECK((mode_of(t / "a/b/none") & 0777) == 0600);
  CHECK(slurp(t / "a/b/suid") == "hello");
  CHECK(slurp(t / "new/parents/leaf") == "deep");
  CHECK(slurp(t / "top").empty());

  CHECK(w.files() == 5);
  CHECK(w.dirs() == 1);
  CHECK(w.bytes() == 11);
  const auto& wr = w.written();
  REQUIRE(wr.size() == 5);
  CHECK(wr.at("a/b/suid").size == 5);
  CHECK(wr.at("a/b/suid").crc32 == zcrc("hello"));
  CHECK(wr.at("top").size == 0);
  CHECK(wr.at("top").crc32 == 0);
}

TEST_CASE("extract: a later duplicate member replaces the earlier file", "[extract]") {
  TempDir t;
  DirWriter w(t.fd.get());
  write_file(w, "f", "first version, longer");
  write_file(w, "f", "second");
  CHECK(slurp(t / "f") == "second");
  CHECK(w.written().at("f").size == 6);
  CHECK(w.written().at("f").crc32 == zcrc("second"));
  w.directory(dir_member("d"));
  w.directory(dir_member("d"));  // a repeated directory is fine
  CHECK(S_ISDIR(mode_of(t / "d")));
}

TEST_CASE("extract: a symlink planted in the target is never followed", "[extract]") {
  TempDir t, outside;
  { std::ofstream(outside / "victim") << "keep"; }
  REQUIRE(::symlinkat(outside.path.c_str(), t.fd.get(), "models") == 0);
  REQUIRE(::mkdirat(t.fd.get(), "real", 0755) == 0);
  REQUIRE(::symlink(outside.path.c_str(), (t / "real/link").c_str()) == 0);
  REQUIRE(::symlink((outside / "victim").c_str(), (t / "leaf").c_str()) == 0);
  REQUIRE(::symlink((outside / "created").c_str(), (t / "dangling").c_str()) == 0);

  SECTION("as a directory component of a file") {
    DirWriter w(t.fd.get());
    CHECK(kind_of([&] { w.begin_file(file_member("models/x", 1)); }) == "kUnsafeArchive");
    CHECK(kind_of([&] { w.begin_file(file_member("models/sub/x", 1)); }) == "kUnsafeArchive");
    CHECK(kind_of([&] { w.begin_file(file_member("real/link/deeper/f", 1)); }) == "kUnsafeArchive");
  }
  SECTION("as a directory member") {
    DirWriter w(t.fd.get());
    CHECK(kind_of([&] { w.directory(dir_member("models")); }) == "kUnsafeArchive");
    CHECK(kind_of([&] { w.directory(dir_member("models/sub")); }) == "kUnsafeArchive");
    CHECK(kind_of([&] { w.directory(dir_member("real/link/sub")); }) == "kUnsafeArchive");
  }
  SECTION("as the file itself") {
    DirWriter w(t.fd.get());
    CHECK(kind_of([&] { w.begin_file(file_member("leaf", 4)); }) == "kUnsafeArchive");
    CHECK(kind_of([&] { w.begin_file(file_member("dangling", 4)); }) == "kUnsafeArchive");
  }
  // Nothing appeared or changed at the links' destinations.
  CHECK(slurp(outside / "victim") == "keep");
  for (const char* name : {"x", "sub", "deeper", "created"}) {
    CAPTURE(name);
    CHECK_FALSE(exists(outside / name));
  }
  CHECK(S_ISLNK(mode_of(t / "models")));
  CHECK(S_ISLNK(mode_of(t / "leaf")));
}

TEST_CASE("extract: files and directories in each other's way", "[extract]") {
  TempDir t;
  DirWriter w(t.fd.get());
  write_file(w, "f", "x");
  CHECK(kind_of([&] { w.directory(dir_member("f")); }) == "kUnsafeArchive");
  CHECK(kind_of([&] { w.directory(dir_member("f/sub")); }) == "kUnsafeArchive");
  CHECK(kind_of([&] { w.begin_file(file_member("f/x", 1)); }) == "kUnsafeArchive");
  w.directory(dir_member("d"));
  CHECK(kind_of([&] { w.begin_file(file_member("d", 1)); }) == "kUnsafeArchive");
  CHECK(slurp(t / "f") == "x");
  CHECK(S_ISDIR(mode_of(t / "d")));
}

TEST_CASE("extract: more directories than the writer keeps open", "[extract]") {
  TempDir t;
  DirWriter w(t.fd.get());
  // Interleave writes across 300 directories so that cached descriptors are
  // dropped and reopened many times.
  for (int round = 0; round < 2; ++round)
    for (int i = 0; i < 300; ++i) {
      std::string d = "d" + std::to_string(i % 17) + "/e" + std::to_string(i);
      write_file(w, d + "/f" + std::to_string(round), d + " round " + std::to_string(round));
    }
  for (int i = 0; i < 300; ++i) {
    std::string d = "d" + std::to_string(i % 17) + "/e" + std::to_string(i);
    CHECK(slurp(t / (d + "/f0")) == d + " round 0");
    CHECK(slurp(t / (d + "/f1")) == d + " round 1");
  }
  CHECK(w.files() == 600);
}

TEST_CASE("extract: member data beyond or short of the declared size", "[extract]") {
  TempDir t;
  SECTION("more data than declared") {
    DirWriter w(t.fd.get());
    w.begin_file(file_member("f", 3));
    CHECK(kind_of([&] { w.file_data(reinterpret_cast<const uint8_t*>("12345"), 5); }) == "kIntegrity");
  }
  SECTION("less data than declared") {
    DirWriter w(t.fd.get());
    w.begin_file(file_member("f", 5));
    w.file_data(reinterpret_cast<const uint8_t*>("123"), 3);
    CHECK(kind_of([&] { w.end_file(); }) == "kIntegrity");
  }
  SECTION("a large file is reserved up front and written in pieces") {
    DirWriter w(t.fd.get());
    std::string data(3 << 20, 'z');
    w.begin_file(file_member("big", data.size()));
    for (size_t pos = 0; pos < data.size(); pos += 100000)
      w.file_data(reinterpret_cast<const uint8_t*>(data.data()) + pos, std::min<size_t>(100000, data.size() - pos));
    w.end_file();
    CHECK(slurp(t / "big") == data);
    CHECK(w.written().at("big").crc32 == zcrc(data));
  }
}

TEST_CASE("extract: remove_tree_at removes nested trees without following links", "[extract]") {
  TempDir t, outside;
  { std::ofstream(outside / "survivor") << "still here"; }
  REQUIRE(::mkdir((outside / "subdir").c_str(), 0755) == 0);
  { std::ofstream(outside / "subdir/also") << "me too"; }

  std::string tree = "tree";
  {  // 40 levels deep, a file in each
    std::string q = t / tree;
    REQUIRE((::mkdir(q.c_str(), 0755) == 0 || errno == EEXIST));
    for (int depth = 0; depth < 40; ++depth) {
      q += "/level" + std::to_string(depth);
      REQUIRE((::mkdir(q.c_str(), 0755) == 0 || errno == EEXIST));
      std::ofstream(q + "/file") << depth;
    }
  }
  for (int i = 0; i < 200; ++i) std::ofstream(t / (tree + "/many" + std::to_string(i))) << i;
  REQUIRE(::symlink(outside.path.c_str(), (t / (tree + "/link_to_dir")).c_str()) == 0);
  REQUIRE(::symlink((outside / "survivor").c_str(), (t / (tree + "/level0/link_to_file")).c_str()) == 0);
  REQUIRE(::symlink("/nonexistent/target", (t / (tree + "/level0/level1/dangling")).c_str()) == 0);
  REQUIRE(::mkfifo((t / (tree + "/fifo")).c_str(), 0600) == 0);
  REQUIRE(::mkdir((t / (tree + "/empty")).c_str(), 0755) == 0);

  remove_tree_at(t.fd.get(), tree);
  CHECK_FALSE(exists(t / tree));
  CHECK(slurp(outside / "survivor") == "still here");
  CHECK(slurp(outside / "subdir/also") == "me too");

  SECTION("a missing name is not an error") { CHECK_NOTHROW(remove_tree_at(t.fd.get(), "missing")); }
  SECTION("a link given by name is removed, its target kept") {
    REQUIRE(::symlink(outside.path.c_str(), (t / "link").c_str()) == 0);
    remove_tree_at(t.fd.get(), "link");
    CHECK_FALSE(exists(t / "link"));
    CHECK(slurp(outside / "survivor") == "still here");
  }
  SECTION("a regular file given by name is removed") {
    { std::ofstream(t / "plain") << "x"; }
    remove_tree_at(t.fd.get(), "plain");
    CHECK_FALSE(exists(t / "plain"));
  }
}
