// Debugging switches read from the environment (HUBFAST_*_TRACE).
#pragma once
#include <cstdlib>

namespace hubfast {

// Set, non-empty and not "0". Callers cache the answer in a static.
inline bool env_flag(const char* name) {
  const char* e = std::getenv(name);
  return e && *e && *e != '0';
}

}  // namespace hubfast
