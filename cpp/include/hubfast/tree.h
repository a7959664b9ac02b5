// Walks of a directory tree beneath a directory fd: iterative (no recursion, whatever the
// depth), never following a link, and holding at most kWalkOpenDirs descriptors, so that a
// deep tree neither overflows the stack nor exhausts the process's file descriptors.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace hubfast {

// The deepest path an archive member may have, in components ("a/b/c" is 3). The extractor
// refuses deeper members (a limit error), and the cache's walks refuse deeper trees, leaving
// them as they are. Real models nest a few levels.
constexpr size_t kMaxTreeDepth = 128;
constexpr size_t kWalkOpenDirs = 32;

struct TreeFile {
  std::string path;  // relative, '/'-separated
  uint64_t size = 0;
};

// The regular files beneath directory `dir_fd` with their sizes. Throws a limit Error
// (ErrorKind::kLimit) when a path is deeper than `max_depth` components.
std::vector<TreeFile> list_tree(int dir_fd, size_t max_depth = kMaxTreeDepth);

// Removes `name` beneath `parent_fd` (a file, a link, or a directory tree of any depth)
// without following links. A missing name is no error.
void remove_tree_at(int parent_fd, const std::string& name);

}  // namespace hubfast
