// libFuzzer harness for the decoders, differential:
//  - every format: one piece vs uneven pieces must agree (same outcome; on
//    success the same output; on failure one output a prefix of the other);
//  - zstd: the streaming decoder vs the parallel one, likewise;
//  - gzip: ISA-L vs zlib: when both accept, the outputs must be equal. When
//    only one accepts, that is reported but not fatal unless
//    HUBFAST_FUZZ_STRICT=1 (ISA-L and zlib differ on a few malformed
//    streams, e.g. incomplete Huffman codes). Two failures with different
//    error kinds are likewise reported, fatal only in strict mode.
// ISA-L is fed in one piece only: isal_inflate() loses the gzip header's
// flags when the header is split across calls (intel/isa-l#224), a known
// defect of the core's GzipIsalDecoder reported separately.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "hubfast/decode.h"
#include "hubfast/error.h"

namespace {

constexpr size_t kCap = 2u << 20;  // decoded bytes kept per run (bombs are cut here)

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "fuzz_decode: %s\n", what.c_str());
  std::abort();
}

struct Capped {};

struct Result {
  std::string out;
  std::string status = "ok";  // "ok", "capped", or "error <kind>"
};

Result run(hubfast::Compression c, const hubfast::DecodeOptions& opt, const uint8_t* data, size_t size,
           bool pieces) {
  Result r;
  auto dec = hubfast::make_decoder(c, opt);
  hubfast::OutFn out = [&](const uint8_t* p, size_t n) {
    if (n == 0) finding("empty output piece");
    size_t take = std::min(n, kCap - r.out.size());
    r.out.append(reinterpret_cast<const char*>(p), take);
    if (r.out.size() >= kCap) throw Capped{};
  };
  try {
    if (!pieces) {
      dec->feed(data, size, out);
    } else {
      size_t pos = 0, step = size % 11 + 1;
      while (pos < size) {
        size_t k = step < size - pos ? step : size - pos;
        dec->feed(data + pos, k, out);
        pos += k;
        step = (step * 5 + 1) % 3001 + 1;
      }
    }
    dec->finish(out);
  } catch (const Capped&) {
    r.status = "capped";
  } catch (const hubfast::Error& e) {
    r.status = "error " + std::to_string(int(e.kind()));
  }
  return r;
}

bool strict() {
  static const bool s = [] {
    const char* e = std::getenv("HUBFAST_FUZZ_STRICT");
    return e && *e == '1';
  }();
  return s;
}

bool prefix_of(const std::string& a, const std::string& b) {
  return a.size() <= b.size() && std::memcmp(a.data(), b.data(), a.size()) == 0;
}

// Two runs of equivalent decoders must agree.
void agree(const char* what, const Result& a, const Result& b, bool strict_status) {
  if (a.status == "capped" || b.status == "capped") {
    if (!prefix_of(a.out, b.out) && !prefix_of(b.out, a.out)) finding(std::string(what) + ": capped outputs differ");
    return;
  }
  if (a.status == "ok" && b.status == "ok") {
    if (a.out != b.out) finding(std::string(what) + ": both succeeded with different outputs");
    return;
  }
  if (a.status != b.status) {
    std::string msg = std::string(what) + ": outcomes differ: " + a.status + " vs " + b.status;
    // Success against failure is fatal where the decoders must agree; two
    // different error kinds only in strict mode (the parallel zstd decoder
    // reports a frame header's windowTooLarge found while cutting frames as
    // kIntegrity, the streaming one as kLimit).
    bool one_ok = a.status == "ok" || b.status == "ok";
    if ((strict_status && one_ok) || strict()) finding(msg);
    static int shown = 0;
    if (shown++ < 5) std::fprintf(stderr, "fuzz_decode (not fatal): %s\n", msg.c_str());
    return;
  }
  // Both failed: what was emitted before the error must be consistent.
  if (!prefix_of(a.out, b.out) && !prefix_of(b.out, a.out)) finding(std::string(what) + ": outputs before the error differ");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using hubfast::Compression;
  Compression c = hubfast::detect_compression(data, size);
  if (c == Compression::kNone) return 0;
  hubfast::DecodeOptions seq;
  seq.threads = 1;
  seq.use_isal = false;
  seq.xz_memlimit = 64ull << 20;

  Result whole = run(c, seq, data, size, false);
  agree("one piece vs pieces", whole, run(c, seq, data, size, true), true);

  if (c == Compression::kZstd) {
    hubfast::DecodeOptions par = seq;
    par.threads = 3;
    agree("zstd streaming vs parallel", whole, run(c, par, data, size, false), true);
    agree("zstd streaming vs parallel in pieces", whole, run(c, par, data, size, true), true);
  }
  if (c == Compression::kGzip && hubfast::have_isal()) {
    hubfast::DecodeOptions isal = seq;
    isal.use_isal = true;
    agree("gzip zlib vs ISA-L", whole, run(c, isal, data, size, false), strict());
  }
  return 0;
}
