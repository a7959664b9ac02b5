// The one translation unit that provides Catch2's main(); the tests live in
// the other cpp/tests/*.cc files and are discovered by ctest.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
