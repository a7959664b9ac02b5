#include "hubfast/decode.h"

#include <bzlib.h>
#include <lzma.h>
#define ZSTD_STATIC_LINKING_ONLY  // ZSTD_getFrameHeader (exported by Debian's libzstd, as pzstd.cc uses it)
#include <zstd.h>
#include <zstd_errors.h>

#include <sched.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <thread>
#include <vector>

#include "hubfast/error.h"
#include "hubfast/pgzip.h"
#include "hubfast/pzstd.h"
#include "gzip_members.h"

namespace hubfast {
namespace {

constexpr size_t kOutBytes = 1 << 20;

[[noreturn]] void corrupt(const char* fmt, const std::string& detail) {
  throw Error(ErrorKind::kIntegrity, std::string(fmt) + " stream is corrupt: " + detail);
}

class ZstdDecoder : public Decoder {
 public:
  explicit ZstdDecoder(int window_log_max) : out_(ZSTD_DStreamOutSize()) {
    ctx_ = ZSTD_createDCtx();
    if (!ctx_) throw Error(ErrorKind::kIO, "zstd init failed");
    ZSTD_DCtx_setParameter(ctx_, ZSTD_d_windowLogMax, window_log_max);
  }
  ~ZstdDecoder() override { ZSTD_freeDCtx(ctx_); }

  void feed(const uint8_t* in, size_t n, const OutFn& out) override {
    ZSTD_inBuffer ib{in, n, 0};
    while (ib.pos < ib.size || pending_out_) {
      peek_header(ib);
      const size_t pos0 = ib.pos;
      ZSTD_outBuffer ob{out_.data(), out_.size(), 0};
      size_t r = ZSTD_decompressStream(ctx_, &ob, &ib);
      if (ZSTD_isError(r)) {
        ErrorKind k = ZSTD_getErrorCode(r) == ZSTD_error_frameParameter_windowTooLarge
                          ? ErrorKind::kLimit
                          : ErrorKind::kIntegrity;
        throw Error(k, std::string("zstd stream is corrupt: ") + ZSTD_getErrorName(r));
      }
      in_frame_ += ib.pos - pos0;
      decoded_ += ob.pos;
      if (ob.pos) out(out_.data(), ob.pos);
      pending_out_ = ob.pos == ob.size && r != 0;  // output full: more may be buffered
      if (r == 0) {
        // libzstd (1.5.4) checks the declared content size when it decodes
        // a frame in one call, not when the frame arrives in pieces and
        // ends with an empty block: check it here, whatever the pieces.
        if (content_ != ZSTD_CONTENTSIZE_UNKNOWN && decoded_ != content_)
          throw Error(ErrorKind::kIntegrity, "zstd stream is corrupt: a frame declares " + std::to_string(content_) +
                                                 " bytes of content and holds " + std::to_string(decoded_));
        ++frames_;
        frame_open_ = false;
        header_.clear();
        header_read_ = false;
        content_ = ZSTD_CONTENTSIZE_UNKNOWN;
        in_frame_ = decoded_ = 0;
      } else {
        frame_open_ = true;
      }
      if (!pending_out_ && ib.pos == ib.size) break;
    }
  }

  void finish(const OutFn&) override {
    if (frame_open_) throw Error(ErrorKind::kIntegrity, "zstd stream is truncated");
    if (frames_ == 0) throw Error(ErrorKind::kIntegrity, "zstd stream is empty");
  }

  uint64_t units() const override { return frames_; }

 private:
  // Copies the current frame's header bytes (those not yet seen, from the
  // input not yet consumed) until ZSTD_getFrameHeader can read its content
  // size. A header libzstd rejects is its to report.
  void peek_header(const ZSTD_inBuffer& ib) {
    if (header_read_) return;
    // Frame bytes [0, have) are copied, and ib.pos is at frame byte
    // in_frame_ <= have (each call copies before libzstd consumes).
    size_t have = header_.size();
    if (have < in_frame_) return;  // not reached; keeps `at` inside the input if it were
    size_t at = ib.pos + (have - in_frame_);
    size_t take = std::min(size_t(ZSTD_FRAMEHEADERSIZE_MAX) - have, at < ib.size ? ib.size - at : 0);
    header_.append(static_cast<const char*>(ib.src) + at, take);
    ZSTD_frameHeader fh;
    size_t r = ZSTD_getFrameHeader(&fh, header_.data(), header_.size());
    if (r == 0 && fh.frameType == ZSTD_frame) content_ = fh.frameContentSize;
    header_read_ = r == 0 || ZSTD_isError(r);
  }

  ZSTD_DCtx* ctx_ = nullptr;
  std::vector<uint8_t> out_;
  bool pending_out_ = false;
  bool frame_open_ = false;
  uint64_t frames_ = 0;
  std::string header_;  // the current frame's first bytes, until its header is read
  bool header_read_ = false;
  uint64_t content_ = ZSTD_CONTENTSIZE_UNKNOWN;  // its declared content size
  uint64_t in_frame_ = 0, decoded_ = 0;  // its bytes consumed and decoded so far
};

class Bzip2Decoder : public Decoder {
 public:
  Bzip2Decoder() : out_(kOutBytes) {}
  ~Bzip2Decoder() override {
    if (open_) BZ2_bzDecompressEnd(&bz_);
  }

  void feed(const uint8_t* in, size_t n, const OutFn& out) override {
    while (n > 0) {
      if (!open_) {
        bz_ = bz_stream{};
        if (BZ2_bzDecompressInit(&bz_, 0, 0) != BZ_OK) throw Error(ErrorKind::kIO, "bzip2 init failed");
        open_ = true;
      }
      unsigned len = unsigned(std::min<size_t>(n, UINT_MAX));
      bz_.next_in = reinterpret_cast<char*>(const_cast<uint8_t*>(in));
      bz_.avail_in = len;
      int r = BZ_OK;
      for (;;) {
        bz_.next_out = reinterpret_cast<char*>(out_.data());
        bz_.avail_out = unsigned(out_.size());
        r = BZ2_bzDecompress(&bz_);
        if (r != BZ_OK && r != BZ_STREAM_END) corrupt("bzip2", "error " + std::to_string(r));
        size_t produced = out_.size() - bz_.avail_out;
        if (produced) out(out_.data(), produced);
        if (r == BZ_STREAM_END) break;
        if (bz_.avail_in == 0 && bz_.avail_out > 0) break;
      }
      size_t used = len - bz_.avail_in;
      in += used;
      n -= used;
      if (r == BZ_STREAM_END) {
        BZ2_bzDecompressEnd(&bz_);
        open_ = false;
        ++streams_;
      }
    }
  }

  void finish(const OutFn&) override {
    if (open_) throw Error(ErrorKind::kIntegrity, "bzip2 stream is truncated");
    if (streams_ == 0) throw Error(ErrorKind::kIntegrity, "bzip2 stream is empty");
  }

  uint64_t units() const override { return streams_; }

 private:
  bz_stream bz_{};
  bool open_ = false;
  uint64_t streams_ = 0;
  std::vector<uint8_t> out_;
};

class XzDecoder : public Decoder {
 public:
  explicit XzDecoder(uint64_t memlimit) : out_(kOutBytes) {
    if (lzma_stream_decoder(&xz_, memlimit, LZMA_CONCATENATED) != LZMA_OK)
      throw Error(ErrorKind::kIO, "xz init failed");
  }
  ~XzDecoder() override { lzma_end(&xz_); }

  void feed(const uint8_t* in, size_t n, const OutFn& out) override { run(in, n, LZMA_RUN, out); }

  void finish(const OutFn& out) override {
    if (!run(nullptr, 0, LZMA_FINISH, out)) throw Error(ErrorKind::kIntegrity, "xz stream is truncated");
  }

 private:
  bool run(const uint8_t* in, size_t n, lzma_action action, const OutFn& out) {
    xz_.next_in = in;
    xz_.avail_in = n;
    for (;;) {
      xz_.next_out = out_.data();
      xz_.avail_out = out_.size();
      lzma_ret r = lzma_code(&xz_, action);
      size_t produced = out_.size() - xz_.avail_out;
      if (produced) out(out_.data(), produced);
      if (r == LZMA_STREAM_END) return true;
      if (r == LZMA_MEMLIMIT_ERROR)
        throw Error(ErrorKind::kLimit, "xz stream needs more memory than the limit allows");
      if (r == LZMA_BUF_ERROR && action == LZMA_FINISH) return false;
      if (r != LZMA_OK) corrupt("xz", "lzma error " + std::to_string(int(r)));
      if (xz_.avail_in == 0 && xz_.avail_out > 0 && action == LZMA_RUN) return false;
    }
  }

  lzma_stream xz_ = LZMA_STREAM_INIT;
  std::vector<uint8_t> out_;
};

class PassThrough : public Decoder {
 public:
  void feed(const uint8_t* in, size_t n, const OutFn& out) override {
    if (n) out(in, n);
  }
  void finish(const OutFn&) override {}
};

}  // namespace

const char* compression_name(Compression c) {
  switch (c) {
    case Compression::kNone: return "none";
    case Compression::kGzip: return "gzip";
    case Compression::kZstd: return "zstd";
    case Compression::kBzip2: return "bzip2";
    case Compression::kXz: return "xz";
  }
  return "?";
}

Compression detect_compression(const uint8_t* p, size_t n) {
  if (n >= 2 && p[0] == 0x1f && p[1] == 0x8b) return Compression::kGzip;
  if (n >= 4 && p[0] == 0x28 && p[1] == 0xb5 && p[2] == 0x2f && p[3] == 0xfd) return Compression::kZstd;
  // A skippable zstd frame first (a seek table may lead): 0x184D2A5?.
  if (n >= 4 && (p[0] & 0xf0) == 0x50 && p[1] == 0x2a && p[2] == 0x4d && p[3] == 0x18)
    return Compression::kZstd;
  if (n >= 3 && p[0] == 'B' && p[1] == 'Z' && p[2] == 'h') return Compression::kBzip2;
  if (n >= 6 && std::memcmp(p, "\xfd" "7zXZ\0", 6) == 0) return Compression::kXz;
  return Compression::kNone;
}

bool have_isal() {
#ifdef HUBFAST_HAVE_ISAL
  return true;
#else
  return false;
#endif
}

namespace {

// Cores this process may run on (a container's cpuset, taskset), not the host's.
int usable_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1, int(std::thread::hardware_concurrency()));
}

}  // namespace

void Decoder::feed_at(uint64_t, const uint8_t*, size_t, const OutFn&) {
  throw Error(ErrorKind::kInvalid, "this decoder takes its input in order only");
}

std::unique_ptr<Decoder> make_decoder(Compression c, const DecodeOptions& opt) {
  const int threads = opt.threads > 0 ? opt.threads : usable_cores();
  switch (c) {
    case Compression::kGzip:
#ifdef HUBFAST_HAVE_ISAL
      // One gzip stream on every core; it decodes small streams in one (ISA-L) itself.
      if (opt.use_isal && threads > 1) return make_parallel_gzip_decoder(threads);
      if (opt.use_isal) return make_isal_gzip_decoder();
#endif
      return make_zlib_gzip_decoder();
    case Compression::kZstd: {
      if (threads > 1) return make_parallel_zstd_decoder(threads, DecodeOptions{opt.use_isal, opt.zstd_window_log_max, opt.xz_memlimit, 1});
      return std::make_unique<ZstdDecoder>(opt.zstd_window_log_max);
    }
    case Compression::kBzip2: return std::make_unique<Bzip2Decoder>();
    case Compression::kXz: return std::make_unique<XzDecoder>(opt.xz_memlimit);
    case Compression::kNone: return std::make_unique<PassThrough>();
  }
  return std::make_unique<PassThrough>();
}

}  // namespace hubfast
