// Many threads of one process resolving the same and different entries at
// once (run under TSan by `dev/sanitize thread`): one extraction per entry,
// every thread gets a complete entry.
#include <catch2/catch.hpp>
#include <zlib.h>

#include <fcntl.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "hubfast/cache.h"
#include "hubfast/extract.h"

using namespace hubfast;

namespace {

void put_octal(char* field, size_t len, uint64_t v) {
  std::snprintf(field, len, "%0*llo", int(len - 1), static_cast<unsigned long long>(v));
}

std::string tar_member(const std::string& name, const std::string& data) {
  char h[512] = {0};
  std::memcpy(h, name.data(), name.size());
  put_octal(h + 100, 8, 0644);
  put_octal(h + 108, 8, 0);
  put_octal(h + 116, 8, 0);
  put_octal(h + 124, 12, data.size());
  put_octal(h + 136, 12, 0);
  h[156] = '0';
  std::memcpy(h + 257, "ustar\0" "00", 8);
  std::memset(h + 148, ' ', 8);
  unsigned sum = 0;
  for (unsigned char c : std::string(h, 512)) sum += c;
  std::snprintf(h + 148, 8, "%06o", sum);
  std::string out(h, 512);
  out += data;
  out.append((512 - data.size() % 512) % 512, '\0');
  return out;
}

std::string gzip(const std::string& in) {
  z_stream zs{};
  deflateInit2(&zs, 6, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY);
  std::string out(deflateBound(&zs, in.size()) + 64, '\0');
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  zs.avail_in = uInt(in.size());
  zs.next_out = reinterpret_cast<Bytef*>(&out[0]);
  zs.avail_out = uInt(out.size());
  deflate(&zs, Z_FINISH);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

std::string make_archive(const std::string& dir, int i) {
  std::string data(300000 + i * 1000, '\0');
  for (size_t k = 0; k < data.size(); ++k) data[k] = char((k * 7919 + size_t(i)) % 251);
  std::string tar = tar_member("saved_model.pb", "pb" + std::to_string(i)) +
                    tar_member("variables/variables.data-00000-of-00001", data) + std::string(1024, '\0');
  std::string path = dir + "/m" + std::to_string(i) + ".tar.gz";
  std::ofstream(path, std::ios::binary) << gzip(tar);
  return path;
}

}  // namespace

TEST_CASE("threads resolving the same and different entries", "[concurrency]") {
  char tmpl[] = "/tmp/hubfast-conc-XXXXXX";
  std::string dir = ::mkdtemp(tmpl);
  std::string root = dir + "/cache";
  std::vector<std::string> archives;
  for (int i = 0; i < 3; ++i) archives.push_back(make_archive(dir, i));

  constexpr int kThreads = 9;  // three per entry
  std::atomic<int> downloads[3] = {};
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      int e = t % 3;
      EntryRequest req;
      req.root = root;
      req.name = "entry" + std::to_string(e);
      req.handle = archives[size_t(e)];
      req.lock_mode = LockMode::kFlock;
      try {
        EntryResult r = ensure_entry(req, [&](int) { return make_file_source(archives[size_t(e)]); }, nullptr);
        if (r.downloaded) downloads[e]++;
        if (lookup_entry(root, req.name).state != EntryState::kComplete) failures++;
      } catch (const std::exception& ex) {
        failures++;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(failures.load() == 0);
  for (auto& d : downloads) CHECK(d.load() == 1);
  Fd parent(::open(dir.substr(0, dir.rfind('/')).c_str(), O_RDONLY | O_DIRECTORY));
  remove_tree_at(parent.get(), dir.substr(dir.rfind('/') + 1));
}
