#include "hubfast/pipeline.h"

#include <atomic>
#include <condition_variable>
#include <chrono>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

#include "hubfast/digest.h"
#include "hubfast/error.h"
#include "hubfast/extract.h"
#include "hubfast/queue.h"
#include "hubfast/spares.h"

namespace hubfast {
namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Bytes and where they sit in the stream (sources that fetch ranges in
// parallel may deliver compressed bytes out of order).
struct Chunk {
  uint64_t offset = 0;
  Bytes bytes;
  // Or a slice of a buffer handed over by the decoder (not copied).
  std::shared_ptr<const Bytes> shared;
  const uint8_t* slice = nullptr;
  size_t slice_len = 0;
  const uint8_t* data() const { return shared ? slice : bytes.data(); }
  size_t size() const { return shared ? slice_len : bytes.size(); }
};

// Collects bytes into chunks of about `chunk` bytes before queueing them, so
// that small network reads do not become many queue hand-offs; a piece at
// another offset than the end of the current chunk starts a new one. Chunk
// buffers come back from the consuming stage through `spares` (a fresh 1 MiB
// buffer per chunk faulted ~70k pages per GiB: 5% of a local resolve's CPU).
// The chunk size may grow while it runs: to the decoder's input segment, once
// the decoder is known, so that whole chunks go to it by move.
class Chunker {
 public:
  Chunker(BoundedQueue<Chunk>& q, const std::atomic<size_t>& chunk, Spares& spares)
      : q_(q), chunk_size_(chunk), spares_(spares) {}
  void put(const uint8_t* p, size_t n) { put_at(next_, p, n); }
  void put_at(uint64_t off, const uint8_t* p, size_t n) {
    if (off != buf_.offset + buf_.bytes.size()) {
      flush();
      buf_.offset = off;
    }
    const size_t chunk_ = chunk_size_.load(std::memory_order_relaxed);
    while (n > 0) {
      if (buf_.bytes.capacity() < chunk_) {
        if (buf_.bytes.empty()) buf_.bytes = spares_.take(true);
        buf_.bytes.reserve(chunk_);
      }
      // Chunks end at multiples of the chunk size in the stream: after a
      // piece cut short, the next ones are whole and aligned again.
      const uint64_t end = buf_.offset + buf_.bytes.size();
      size_t take = std::min<uint64_t>(n, chunk_ - end % chunk_);
      buf_.bytes.insert(buf_.bytes.end(), p, p + take);
      p += take;
      n -= take;
      if ((end + take) % chunk_ == 0) flush();
    }
    next_ = std::max(next_, buf_.offset + buf_.bytes.size());
  }
  // A whole buffer goes on in slices of the chunk size that share it: the
  // queue's bound still counts chunk-sized pieces.
  void put_shared(std::shared_ptr<const Bytes> b) {
    const size_t chunk_ = chunk_size_.load(std::memory_order_relaxed);
    flush();
    for (size_t pos = 0; pos < b->size(); pos += chunk_) {
      Chunk c;
      c.offset = buf_.offset + pos;
      c.shared = b;
      c.slice = b->data() + pos;
      c.slice_len = std::min(chunk_, b->size() - pos);
      if (!q_.push(std::move(c))) throw Error(ErrorKind::kCancelled, "pipeline stopped");
    }
    buf_.offset += b->size();
    next_ = std::max(next_, buf_.offset);
  }
  void flush() {
    if (buf_.bytes.empty()) return;
    uint64_t end = buf_.offset + buf_.bytes.size();
    if (!q_.push(std::move(buf_))) throw Error(ErrorKind::kCancelled, "pipeline stopped");
    buf_ = Chunk();
    buf_.offset = end;
  }

 private:
  BoundedQueue<Chunk>& q_;
  const std::atomic<size_t>& chunk_size_;
  Spares& spares_;
  Chunk buf_;
  uint64_t next_ = 0;
};

// The decoder thread's answer to "may the source deliver out of order?",
// given once it has seen the first bytes and made its decoder.
class Decision {
 public:
  void set(bool offsets) {
    std::lock_guard<std::mutex> lk(mu_);
    if (decided_) return;
    decided_ = true;
    offsets_ = offsets;
    cv_.notify_all();
  }
  bool wait(const CancelToken& cancel) {
    std::unique_lock<std::mutex> lk(mu_);
    while (!decided_) {
      cv_.wait_for(lk, std::chrono::milliseconds(50));
      if (cancel.cancelled()) throw Error(ErrorKind::kCancelled, "pipeline stopped");
    }
    return offsets_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool decided_ = false, offsets_ = false;
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

// Thrown through the source to close a transfer that goes on after the
// archive ended (not an error: the archive is complete).
struct PastTheEnd {};

// A source without a declared length is read at most this far once the
// archive's end has been decoded: a server that keeps sending must not keep
// us reading. One with a length is read to it, so that the length, digest
// and pin checks see the whole object.
constexpr uint64_t kReadPastEnd = 1 << 20;

}  // namespace

ExtractStats extract(Source& src, int target_fd, const ExtractOptions& opt, const PollFn& poll) {
  BoundedQueue<Chunk> compressed(opt.queue_chunks), decoded(opt.queue_chunks);
  // The compressed chunks' size: the decoder's input segment once it is known.
  std::atomic<size_t> in_chunk{opt.chunk_bytes};
  const std::atomic<size_t> out_chunk{opt.chunk_bytes};
  // Each queue's chunks, back from their consumer; as many as can be in use
  // at once (compressed ones also from the segments a parallel decoder holds).
  auto compressed_spares = std::make_shared<Spares>(opt.queue_chunks + 8);
  Spares decoded_spares(opt.queue_chunks + 2);
  Decision decision;
  std::atomic<uint64_t> input_floor{0};  // the decoder's, for the source's window
  CancelToken cancel;
  FirstError error;
  std::atomic<uint64_t> bytes_in{0}, bytes_out{0};
  // bytes_in when the writer read the end-of-archive marker (UINT64_MAX: not yet).
  std::atomic<uint64_t> in_at_end{UINT64_MAX};
  std::atomic<bool> cut{false};  // the reader stopped past the end
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
      Chunker out(compressed, in_chunk, *compressed_spares);
      struct Probe {  // the queue dies with extract(); the source may not
        Source& s;
        ~Probe() {
          s.set_consumer_wait(nullptr);
          s.set_offset_sink(nullptr);
        }
      } probe{src};
      src.set_consumer_wait([&compressed] { return compressed.wait_seconds(); });
      Source::OffsetSink offsets{
          [&] {
            out.flush();
            return decision.wait(cancel);
          },
          [&](uint64_t off, const uint8_t* p, size_t n) {
            bytes_in.fetch_add(n, std::memory_order_relaxed);
            out.put_at(off, p, n);
          },
          [&] { return input_floor.load(std::memory_order_relaxed); },
          [&] { out.flush(); }};
      if (!sha) src.set_offset_sink(&offsets);  // a pinned sha256 needs the bytes in order
      try {
        src.run(
            [&](const uint8_t* p, size_t n) {
              const uint64_t end = in_at_end.load(std::memory_order_relaxed);
              if (end != UINT64_MAX && bytes_in.load(std::memory_order_relaxed) - end >= kReadPastEnd &&
                  src.expected_size() < 0)
                throw PastTheEnd{};
              if (sha) sha->update(p, n);
              bytes_in.fetch_add(n, std::memory_order_relaxed);
              out.put(p, n);
            },
            cancel);
      } catch (const PastTheEnd&) {
        cut = true;
      }
      out.flush();
      if (sha && cut)
        throw Error(ErrorKind::kIntegrity, "sha256 of '" + src.describe() +
                                               "' cannot be checked: the server went on sending past the end "
                                               "of the archive and declared no length");
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
      Chunker out(decoded, out_chunk, decoded_spares);
      auto emit = [&](const uint8_t* p, size_t n) { out.put(p, n); };
      bool any = false, offsets = false;
      for (;;) {
        // Out of order, the decoder hands out its output only when called:
        // with nothing new to give it, it is called empty-handed, or the
        // source, waiting for the decoder's release point, would wait forever.
        bool idle = false;
        auto chunk = offsets ? compressed.pop_for(std::chrono::milliseconds(2), &idle) : compressed.pop();
        if (idle) {
          auto t = Clock::now();
          dec->feed_at(0, nullptr, 0, emit);
          input_floor.store(dec->input_floor(), std::memory_order_relaxed);
          busy += since(t);
          continue;
        }
        if (!chunk) break;
        auto t = Clock::now();
        const Bytes& b = chunk->bytes;
        if (!dec) {
          // The first chunk holds the stream's first bytes: sources deliver
          // out of order only after asking, which this answers.
          stats.compression = detect_compression(b.data(), b.size());
          dec = make_decoder(stats.compression, opt.decode);
          dec->set_shared_out([&](std::shared_ptr<const Bytes> b) { out.put_shared(std::move(b)); });
          dec->set_input_spares(compressed_spares);
          if (size_t seg = dec->input_segment_bytes()) in_chunk.store(std::max(seg, opt.chunk_bytes));
          offsets = dec->takes_offsets();
          decision.set(offsets);
        }
        any = true;
        if (offsets) {
          dec->feed_at_owned(chunk->offset, std::move(chunk->bytes), emit);
          input_floor.store(dec->input_floor(), std::memory_order_relaxed);
        } else {
          dec->feed_owned(std::move(chunk->bytes), emit);
        }
        compressed_spares->give(std::move(chunk->bytes));  // unless the decoder kept it
        busy += since(t);
      }
      if (cancel.cancelled()) throw Error(ErrorKind::kCancelled, "cancelled");
      if (!any) throw Error(ErrorKind::kIntegrity, "archive '" + src.describe() + "' is empty");
      if (!cut) dec->finish(emit);  // cut: the stream goes on, but the archive is whole
      out.flush();
      stats.units = dec->units();
      stats.decode_threads = dec->parallelism();
      decoded.close();
    } catch (...) {
      fail(std::current_exception());
    }
    decision.set(false);
    input_floor.store(UINT64_MAX, std::memory_order_relaxed);
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
        if (tar.ended() && in_at_end.load(std::memory_order_relaxed) == UINT64_MAX)
          in_at_end.store(bytes_in.load());
        decoded_spares.give(std::move(chunk->bytes));
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
