// extract(): the whole pipeline from an archive file (make_file_source) or a
// scripted Source into a temp directory: stats, files on disk, every format,
// errors from each stage, and cancellation from the poll callback.
#include <catch2/catch.hpp>

#include <bzlib.h>
#include <lzma.h>
#include <openssl/evp.h>
#include <zlib.h>
#include <zstd.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "compressors.h"
#include "hubfast/error.h"
#include "hubfast/extract.h"
#include "hubfast/fd.h"
#include "temp_dir.h"
#include "hubfast/pipeline.h"
#include "hubfast/source.h"

using namespace hubfast;

namespace {

using testing::bzip2;
using testing::gzip;

using testing::TempDir;

// ---- archives ----------------------------------------------------------------------

std::string tar_header(const std::string& name, char type, uint64_t size, uint32_t mode) {
  std::string h(512, '\0');
  std::memcpy(&h[0], name.data(), std::min<size_t>(name.size(), 100));
  std::snprintf(&h[100], 8, "%07o", mode);
  std::snprintf(&h[108], 8, "%07o", 0u);
  std::snprintf(&h[116], 8, "%07o", 0u);
  std::snprintf(&h[124], 12, "%011llo", static_cast<unsigned long long>(size));
  std::snprintf(&h[136], 12, "%011o", 0u);
  h[156] = type;
  std::memcpy(&h[257], "ustar\0" "00", 8);
  std::memset(&h[148], ' ', 8);
  unsigned sum = 0;
  for (unsigned char c : h) sum += c;
  std::snprintf(&h[148], 8, "%06o", sum);
  h[155] = ' ';
  return h;
}

std::string tar_file(const std::string& name, const std::string& data, uint32_t mode = 0644) {
  return tar_header(name, '0', data.size(), mode) + data + std::string((512 - data.size() % 512) % 512, '\0');
}

std::string tar_dir(const std::string& name) { return tar_header(name, '5', 0, 0755); }

const std::string kEnd(1024, '\0');

// Frames of about `frame` bytes each, as pzstd/zstdmt-style writers make them.
std::string zstd_frames(const std::string& in, size_t frame) {
  std::string out;
  for (size_t pos = 0; pos < in.size(); pos += frame) {
    size_t n = std::min(frame, in.size() - pos);
    std::string buf(ZSTD_compressBound(n), '\0');
    size_t r = ZSTD_compress(&buf[0], buf.size(), in.data() + pos, n, 3);
    REQUIRE(!ZSTD_isError(r));
    out.append(buf.data(), r);
  }
  return out;
}

std::string xz(const std::string& in) {
  std::string out(lzma_stream_buffer_bound(in.size()), '\0');
  size_t pos = 0;
  REQUIRE(lzma_easy_buffer_encode(1, LZMA_CHECK_CRC64, nullptr, reinterpret_cast<const uint8_t*>(in.data()),
                                  in.size(), reinterpret_cast<uint8_t*>(&out[0]), &pos, out.size()) == LZMA_OK);
  out.resize(pos);
  return out;
}

std::string sha256_hex(const std::string& s) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned len = 0;
  REQUIRE(EVP_Digest(s.data(), s.size(), md, &len, EVP_sha256(), nullptr) == 1);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

std::string random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = char(rng() % 7 == 0 ? rng() : 'a' + rng() % 4);  // compressible, not trivial
  return s;
}

uint32_t zcrc(const std::string& s) {
  return uint32_t(crc32(0, reinterpret_cast<const Bytef*>(s.data()), uInt(s.size())));
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void spit(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary);
  f << data;
  REQUIRE(f.good());
}

const char* kind_name(ErrorKind k) {
  switch (k) {
    case ErrorKind::kIntegrity: return "kIntegrity";
    case ErrorKind::kUnsafeArchive: return "kUnsafeArchive";
    case ErrorKind::kLimit: return "kLimit";
    case ErrorKind::kNotFound: return "kNotFound";
    case ErrorKind::kNetwork: return "kNetwork";
    case ErrorKind::kCancelled: return "kCancelled";
    default: return "other";
  }
}

// A model-like tree: a few small files, one big file, directories.
struct Model {
  std::map<std::string, std::string> files;
  std::vector<std::string> dirs;
  std::string tar;
  uint64_t bytes = 0;
};

Model make_model() {
  Model m;
  m.dirs = {"variables", "assets"};
  m.files["saved_model.pb"] = random_bytes(20000, 1);
  m.files["variables/variables.index"] = random_bytes(700, 2);
  m.files["variables/variables.data-00000-of-00001"] = random_bytes(3 << 20, 3);
  m.files["assets/vocab.txt"] = "a\nb\nc\n";
  m.files["assets/empty"] = "";
  m.tar = tar_dir("variables/") + tar_dir("assets/");
  for (auto& [name, data] : m.files) {
    m.tar += tar_file(name, data);
    m.bytes += data.size();
  }
  m.tar += kEnd;
  return m;
}

const Model& model() {
  static const Model m = make_model();
  return m;
}

struct Run {
  ExtractStats stats;
  std::string error = "none";
  std::string message;
  std::vector<Progress> polls;
};

Run run_file(const std::string& archive, const TempDir& target, ExtractOptions opt = {}) {
  Run r;
  try {
    auto src = make_file_source(archive);
    r.stats = extract(*src, target.fd.get(), opt, [&](const Progress& p) { r.polls.push_back(p); });
  } catch (const Error& e) {
    r.error = kind_name(e.kind());
    r.message = e.what();
  }
  return r;
}

// Emits scripted pieces; optionally slowly and for ever until cancelled.
class ScriptSource : public Source {
 public:
  std::vector<std::string> pieces;
  bool endless = false;          // after the pieces, emit zeros every few ms until cancelled
  bool fail_after = false;       // throw kNetwork after the pieces
  std::atomic<bool> saw_cancel{false};

  void run(const EmitFn& emit, const CancelToken& cancel) override {
    for (auto& p : pieces) emit(reinterpret_cast<const uint8_t*>(p.data()), p.size());
    if (fail_after) throw Error(ErrorKind::kNetwork, "connection reset (scripted)");
    while (endless) {
      if (cancel.cancelled()) {
        saw_cancel = true;
        cancel.throw_if_cancelled();
      }
      std::string zeros(4096, '\0');
      emit(reinterpret_cast<const uint8_t*>(zeros.data()), zeros.size());
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
  int64_t expected_size() const override { return -1; }
  std::string describe() const override { return "scripted source"; }
};

}  // namespace

TEST_CASE("pipeline: a .tar.gz file extracts with correct stats and files", "[pipeline]") {
  const Model& m = model();
  TempDir work, target;
  std::string archive = work / "model.tar.gz";
  std::string packed = gzip(m.tar);
  spit(archive, packed);

  ExtractOptions opt;
  opt.chunk_bytes = 64 << 10;  // many chunks through small queues
  opt.queue_chunks = 2;
  opt.expected_sha256 = sha256_hex(packed);
  Run r = run_file(archive, target, opt);
  REQUIRE(r.error == "none");
  const ExtractStats& s = r.stats;
  CHECK(s.compression == Compression::kGzip);
  CHECK(s.bytes_in == packed.size());
  CHECK(s.bytes_out == m.bytes);
  CHECK(s.files == m.files.size());
  CHECK(s.dirs == m.dirs.size());
  CHECK(s.units == 1);
  CHECK(s.sha256 == opt.expected_sha256);
  CHECK(s.seconds > 0);
  REQUIRE(s.tree.size() == m.files.size());
  for (auto& [name, data] : m.files) {
    CAPTURE(name);
    REQUIRE(s.tree.count(name) == 1);
    CHECK(s.tree.at(name).size == data.size());
    CHECK(s.tree.at(name).crc32 == zcrc(data));
    CHECK(slurp(target / name) == data);
  }
  // The final poll reports the totals.
  REQUIRE_FALSE(r.polls.empty());
  CHECK(r.polls.back().bytes_in == packed.size());
  CHECK(r.polls.back().total_in == int64_t(packed.size()));
  CHECK(r.polls.back().bytes_out == m.bytes);
  for (size_t i = 1; i < r.polls.size(); ++i) CHECK(r.polls[i].bytes_in >= r.polls[i - 1].bytes_in);
}

TEST_CASE("pipeline: every format", "[pipeline]") {
  const Model& m = model();
  struct Fmt {
    const char* ext;
    Compression c;
    std::string bytes;
    uint64_t units;
  };
  std::string frames = zstd_frames(m.tar, 256 << 10);
  std::vector<Fmt> fmts = {
      {"tar", Compression::kNone, m.tar, 0},
      {"tar.zst", Compression::kZstd, frames, (m.tar.size() + (256 << 10) - 1) / (256 << 10)},
      {"tar.bz2", Compression::kBzip2, bzip2(m.tar), 1},
      {"tar.xz", Compression::kXz, xz(m.tar), 0},
  };
  for (int threads : {1, 3}) {
    for (const Fmt& f : fmts) {
      INFO(f.ext << ", " << threads << " decoding threads");
      TempDir work, target;
      spit(work / ("m." + std::string(f.ext)), f.bytes);
      ExtractOptions opt;
      opt.decode.threads = threads;
      Run r = run_file(work / ("m." + std::string(f.ext)), target, opt);
      REQUIRE(r.error == "none");
      CHECK(r.stats.compression == f.c);
      CHECK(r.stats.files == m.files.size());
      CHECK(r.stats.bytes_out == m.bytes);
      if (f.c != Compression::kXz) CHECK(r.stats.units == f.units);
      for (auto& [name, data] : m.files) CHECK(slurp(target / name) == data);
    }
  }
}

TEST_CASE("pipeline: errors from each stage propagate with their kind", "[pipeline]") {
  const Model& m = model();
  TempDir work;
  auto run_bytes = [&](const std::string& bytes, ExtractOptions opt = {}) {
    TempDir target;
    spit(work / "a", bytes);
    return run_file(work / "a", target, opt);
  };
  std::string packed = gzip(m.tar);

  SECTION("missing file") {
    TempDir target;
    CHECK(run_file(work / "does-not-exist.tar.gz", target).error == "kNotFound");
  }
  SECTION("empty file") { CHECK(run_bytes("").error == "kIntegrity"); }
  SECTION("corrupt gzip") {
    std::string bad = packed;
    bad[bad.size() / 2] ^= 0x40;
    CHECK(run_bytes(bad).error == "kIntegrity");
  }
  SECTION("truncated gzip") { CHECK(run_bytes(packed.substr(0, packed.size() - 3)).error == "kIntegrity"); }
  SECTION("tar without its end-of-archive marker") {
    CHECK(run_bytes(gzip(m.tar.substr(0, m.tar.size() - 1024))).error == "kIntegrity");
  }
  SECTION("a symlink member") {
    std::string tar = tar_file("ok", "fine") + tar_header("link", '2', 0, 0777) + kEnd;
    CHECK(run_bytes(gzip(tar)).error == "kUnsafeArchive");
  }
  SECTION("a member escaping the target") {
    CHECK(run_bytes(gzip(tar_file("../escape", "x") + kEnd)).error == "kUnsafeArchive");
    CHECK_FALSE(std::ifstream(work / "escape").good());
  }
  SECTION("limits") {
    ExtractOptions opt;
    opt.limits.max_members = 3;
    CHECK(run_bytes(packed, opt).error == "kLimit");
    opt = {};
    opt.limits.max_total_bytes = 1 << 20;
    CHECK(run_bytes(packed, opt).error == "kLimit");
  }
  SECTION("sha256 mismatch") {
    ExtractOptions opt;
    opt.expected_sha256 = std::string(64, '0');
    Run r = run_bytes(packed, opt);
    CHECK(r.error == "kIntegrity");
    CHECK_THAT(r.message, Catch::Contains("sha256"));
  }
  SECTION("a source failure is reported as such, not as a cancellation") {
    ScriptSource src;
    src.pieces = {packed.substr(0, packed.size() / 2)};
    src.fail_after = true;
    TempDir target;
    try {
      extract(src, target.fd.get(), {}, nullptr);
      FAIL("no error");
    } catch (const Error& e) {
      CHECK(std::string(kind_name(e.kind())) == "kNetwork");
    }
  }
}

TEST_CASE("pipeline: a throwing poll callback cancels the pipeline", "[pipeline]") {
  // An uncompressed member, then zeros for ever: the source keeps emitting
  // until it sees the cancel token.
  ScriptSource src;
  src.pieces = {tar_header("member", '0', 100000, 0644)};
  src.endless = true;
  TempDir target;
  auto t0 = std::chrono::steady_clock::now();
  int calls = 0;
  try {
    extract(src, target.fd.get(), {}, [&](const Progress&) {
      ++calls;
      throw std::runtime_error("stop from poll");
    });
    FAIL("extract returned");
  } catch (const Error& e) {
    FAIL("a hubfast::Error instead of the poll's exception: " << e.what());
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()) == "stop from poll");
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(secs < 10);
  CHECK(calls >= 1);
  CHECK(src.saw_cancel);

  SECTION("a hubfast::Error from poll keeps its kind") {
    ScriptSource src2;
    src2.pieces = {tar_header("member", '0', 100000, 0644)};
    src2.endless = true;
    TempDir t2;
    try {
      extract(src2, t2.fd.get(), {}, [](const Progress&) { throw Error(ErrorKind::kCancelled, "KeyboardInterrupt"); });
      FAIL("extract returned");
    } catch (const Error& e) {
      CHECK(std::string(kind_name(e.kind())) == "kCancelled");
      CHECK(std::string(e.what()) == "KeyboardInterrupt");
    }
  }
}

TEST_CASE("pipeline: a throwing poll callback with a file source", "[pipeline]") {
  const Model& m = model();
  TempDir work, target;
  spit(work / "m.tar.gz", gzip(m.tar));
  auto src = make_file_source(work / "m.tar.gz");
  // Whether the pipeline is still running at the first poll or already done
  // (the last poll comes after the threads are joined), the exception
  // reaches the caller.
  CHECK_THROWS_WITH(extract(*src, target.fd.get(), {},
                            [](const Progress&) { throw std::runtime_error("stop from poll"); }),
                    "stop from poll");
}
