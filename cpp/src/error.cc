#include "hubfast/error.h"

#include <cerrno>
#include <cstring>

#include "hubfast/queue.h"

namespace hubfast {

void throw_errno(const std::string& what, int err) {
  ErrorKind kind = ErrorKind::kIO;
  switch (err) {
    case ENOSPC:
    case EDQUOT:
      kind = ErrorKind::kDiskFull;
      break;
    case EACCES:
    case EPERM:
    case EROFS:
      kind = ErrorKind::kAccessDenied;
      break;
    case ENOENT:
      kind = ErrorKind::kNotFound;
      break;
    case ELOOP:  // O_NOFOLLOW met a link: planted by someone, never followed
      kind = ErrorKind::kUnsafeCache;
      break;
    default:
      break;
  }
  throw Error(kind, what + ": " + std::strerror(err), err);
}

void CancelToken::throw_if_cancelled() const {
  if (cancelled()) throw Error(ErrorKind::kCancelled, "cancelled");
}

}  // namespace hubfast
