// Multi-frame zstd decoded frame by frame on several threads. Frame ends are
// found by walking frame and block headers over the input buffers as given
// (not copied into one contiguous frame); each complete frame is decoded by
// a pool straight into a buffer of its declared content size and emitted in
// order; a frame that declares no bounded size, or is too large to buffer,
// switches the rest of the stream to the sequential decoder, so memory stays
// bounded.
#pragma once
#include <memory>

#include "hubfast/decode.h"

namespace hubfast {

std::unique_ptr<Decoder> make_parallel_zstd_decoder(int threads, const DecodeOptions& opt);

}  // namespace hubfast
