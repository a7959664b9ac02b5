// Multi-frame zstd decoded frame by frame on several threads. Complete
// frames are cut from the stream (ZSTD_findFrameCompressedSize), decoded by a
// pool and emitted in order; a frame too large to buffer switches the rest of
// the stream to the sequential decoder, so memory stays bounded.
#pragma once
#include <memory>

#include "hubfast/decode.h"

namespace hubfast {

std::unique_ptr<Decoder> make_parallel_zstd_decoder(int threads, const DecodeOptions& opt);

}  // namespace hubfast
