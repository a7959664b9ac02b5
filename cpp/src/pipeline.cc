#include "hubfast/pipeline.h"

#include <atomic>
#include <condition_variable>
#include <chrono>
#include <exception>
#include <mutex>
#include <thread>

#include "hubfast/digest.h"
#include "hubfast/error.h"
#include "hubfast/extract.h"
#include "hubfast/queue.h"

namespace hubfast {
namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Collects bytes into chunks of about `chunk` bytes before queueing them, so
// that small network reads do not become many queue hand-offs.
class Chunker {
 public:
  Chunker(BoundedQueue<Bytes>& q, size_t chunk) : q_(q), chunk_(chunk) {}
  void put(const uint8_t* p, size_t n) {
    while (n > 0) {
      if (buf_.capacity() < chunk_) buf_.reserve(chunk_);
      size_t take = std::min(n, chunk_ - buf_.size());
      buf_.insert(buf_.end(), p, p + take);
      p += take;
      n -= take;
      if (buf_.size() == chunk_) flush();
    }
  }
  void flush() {
    if (buf_.empty()) return;
    if (!q_.push(std::move(buf_))) throw Error(ErrorKind::kCancelled, "pipeline stopped");
    buf_ = Bytes();
  }

 private:
  BoundedQueue<Bytes>& q_;
  size_t chunk_;
  Bytes buf_;
};

// The first failure wins; later ones are consequences of the abort.
class FirstError {
 public:
  void set(std::exception_ptr e) {
    std::lock_guard<std::mutex> lk(mu_);
    if (!err_) err_ = e;
  }
  std::exception_ptr get() {
    std::lock_guard<std::mutex> lk(mu_);
    return err_;
  }

 private:
  std::mutex mu_;
  std::exception_ptr err_;
};

}  // namespace

ExtractStats extract(Source& src, int target_fd, const ExtractOptions& opt, const PollFn& poll) {
  BoundedQueue<Bytes> compressed(opt.queue_chunks), decoded(opt.queue_chunks);
  CancelToken cancel;
  FirstError error;
  std::atomic<uint64_t> bytes_in{0}, bytes_out{0};
  int running = 3;  // guarded by done_mu
  std::mutex done_mu;
  std::condition_variable done_cv;
  auto stage_done = [&] {
    std::lock_guard<std::mutex> lk(done_mu);
    if (--running == 0) done_cv.notify_all();
  };
  ExtractStats stats;
  auto t0 = Clock::now();

  auto fail = [&](std::exception_ptr e) {
    error.set(e);
    cancel.cancel();
    compressed.abort();
    decoded.abort();
  };

  std::thread reader([&] {
    auto t = Clock::now();
    try {
      std::unique_ptr<Digest> sha;
      if (!opt.expected_sha256.empty()) sha = std::make_unique<Digest>(DigestAlgo::kSha256);
      Chunker out(compressed, opt.chunk_bytes);
      struct Probe {  // the queue dies with extract(); the source may not
        Source& s;
        ~Probe() { s.set_consumer_wait(nullptr); }
      } probe{src};
      src.set_consumer_wait([&compressed] { return compressed.wait_seconds(); });
      src.run(
          [&](const uint8_t* p, size_t n) {
            if (sha) sha->update(p, n);
            bytes_in.fetch_add(n, std::memory_order_relaxed);
            out.put(p, n);
          },
          cancel);
      out.flush();
      if (sha) {
        stats.sha256 = sha->hex();
        if (stats.sha256 != opt.expected_sha256)
          throw Error(ErrorKind::kIntegrity, "sha256 of '" + src.describe() + "' is " + stats.sha256 +
                                                 ", expected " + opt.expected_sha256);
      }
      compressed.close();
    } catch (...) {
      fail(std::current_exception());
    }
    stats.read_busy = since(t);
    stage_done();
  });

  std::thread decoder([&] {
    double busy = 0;
    try {
      std::unique_ptr<Decoder> dec;
      Chunker out(decoded, opt.chunk_bytes);
      auto emit = [&](const uint8_t* p, size_t n) { out.put(p, n); };
      bool any = false;
      while (auto chunk = compressed.pop()) {
        auto t = Clock::now();
        if (!dec) {
          stats.compression = detect_compression(chunk->data(), chunk->size());
          dec = make_decoder(stats.compression, opt.decode);
        }
        any = true;
        dec->feed(chunk->data(), chunk->size(), emit);
        busy += since(t);
      }
      if (cancel.cancelled()) throw Error(ErrorKind::kCancelled, "cancelled");
      if (!any) throw Error(ErrorKind::kIntegrity, "archive '" + src.describe() + "' is empty");
      dec->finish(emit);
      out.flush();
      stats.units = dec->units();
      stats.decode_threads = dec->parallelism();
      decoded.close();
    } catch (...) {
      fail(std::current_exception());
    }
    stats.decode_busy = busy;
    stage_done();
  });

  std::thread writer([&] {
    double busy = 0;
    try {
      DirWriter dir(target_fd);
      TarReader tar(dir, opt.limits);
      while (auto chunk = decoded.pop()) {
        auto t = Clock::now();
        tar.feed(chunk->data(), chunk->size());
        bytes_out.store(dir.bytes(), std::memory_order_relaxed);
        busy += since(t);
      }
      if (cancel.cancelled()) throw Error(ErrorKind::kCancelled, "cancelled");
      tar.finish();
      stats.files = dir.files();
      stats.dirs = dir.dirs();
      stats.bytes_out = dir.bytes();
      for (auto& [path, info] : dir.written()) stats.tree[path] = ExtractStats::File{info.size, info.crc32};
    } catch (...) {
      fail(std::current_exception());
    }
    stats.write_busy = busy;
    stage_done();
  });

  // The calling thread waits, reporting progress; poll() may throw to cancel.
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(done_mu);
      if (done_cv.wait_for(lk, std::chrono::milliseconds(100), [&] { return running == 0; })) break;
    }
    if (!poll) continue;
    try {
      poll(Progress{bytes_in.load(), src.expected_size(), bytes_out.load()});
    } catch (...) {
      fail(std::current_exception());
    }
  }
  reader.join();
  decoder.join();
  writer.join();
  if (auto e = error.get()) std::rethrow_exception(e);
  stats.bytes_in = bytes_in.load();
  stats.seconds = since(t0);
  src.add_stats([&](const char* k, double v) { stats.source[k] = v; });
  if (poll) poll(Progress{stats.bytes_in, src.expected_size(), stats.bytes_out});
  return stats;
}

}  // namespace hubfast
