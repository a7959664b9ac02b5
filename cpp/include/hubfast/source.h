// Where archive bytes come from. A source pushes bytes, in order, into an
// EmitFn from the pipeline's reader thread; it checks the cancel token and
// throws hubfast::Error on failure.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "hubfast/queue.h"

namespace hubfast {

using EmitFn = std::function<void(const uint8_t*, size_t)>;

class Source {
 public:
  virtual ~Source() = default;
  virtual void run(const EmitFn& emit, const CancelToken& cancel) = 0;
  // Total bytes if known before the end (Content-Length, file size), else -1.
  virtual int64_t expected_size() const { return -1; }
  // For messages: the file path or URL.
  virtual std::string describe() const = 0;
  // Counters for stats (retries, connections, ...); names -> values.
  virtual void add_stats(std::function<void(const char*, double)> put) const {}
  // How long the consumer of the emitted bytes has waited for them (seconds,
  // cumulative), set by the pipeline for the duration of run(): a source that
  // can open more connections does so only while this grows.
  void set_consumer_wait(std::function<double()> f) { consumer_wait_ = std::move(f); }

  // Out-of-order delivery, offered by the pipeline when its decoder can take
  // it (a parallel gzip decoder works on every segment that has arrived, not
  // only on the oldest). A source that fetches ranges in parallel asks
  // accept() once, after the first bytes went out in order through emit; if
  // it returns true, it may deliver the rest through emit_at in any order
  // (each byte once, the pieces of one range in order). floor() is the
  // offset below which the consumer has released everything: what it was
  // given above it is still held, so the source's window counts from there.
  // flush() passes on bytes the sink holds back (a partial chunk): a source
  // calls it before it waits, as the floor it waits on may need them.
  struct OffsetSink {
    std::function<bool()> accept;
    std::function<void(uint64_t, const uint8_t*, size_t)> emit_at;
    std::function<uint64_t()> floor;
    std::function<void()> flush;
  };
  void set_offset_sink(const OffsetSink* s) { offset_sink_ = s; }

 protected:
  std::function<double()> consumer_wait_;
  const OffsetSink* offset_sink_ = nullptr;
};

std::unique_ptr<Source> make_file_source(const std::string& path);

}  // namespace hubfast
