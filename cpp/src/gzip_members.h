// gzip decoding on one thread: a stream of RFC 1952 members, each inflated by
// ISA-L or zlib. The member framing (what may stand between members, when the
// stream is complete) is written once here; the parallel decoder falls back
// to the ISA-L one for streams too small to split.
#pragma once

#include <memory>
#include <string>

#include "hubfast/decode.h"

namespace hubfast {

std::unique_ptr<Decoder> make_zlib_gzip_decoder();
#ifdef HUBFAST_HAVE_ISAL
std::unique_ptr<Decoder> make_isal_gzip_decoder();
// ISA-L's inflate error codes, in words.
std::string isal_message(int r);
#endif

}  // namespace hubfast
