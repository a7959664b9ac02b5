#!/bin/sh
# Builds bench/pgzip/pgzip_bench against the Release core library
# (configures and builds build/pgzip first if needed).
set -e
cd "$(dirname "$0")/../.."
if [ ! -f build/pgzip/libhubfast_core.a ]; then
  cmake -S . -B build/pgzip -G Ninja -DCMAKE_BUILD_TYPE=Release -DHUBFAST_TESTS=ON -DHUBFAST_PYTHON=OFF
fi
cmake --build build/pgzip -j2 --target hubfast_core
c++ -O2 -std=c++17 -Icpp/include bench/pgzip/pgzip_bench.cc build/pgzip/libhubfast_core.a \
  $(pkg-config --libs libisal zlib libzstd liblzma libcurl libcrypto) -lbz2 -lpthread \
  -o build/pgzip/pgzip_bench
echo build/pgzip/pgzip_bench
