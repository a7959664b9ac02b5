// Errors inside the native core: one exception type carrying a kind; the
// bindings translate each kind once into a class of hubfast.errors.
#pragma once
#include <stdexcept>
#include <string>

namespace hubfast {

enum class ErrorKind {
  kNotFound,       // local file or entry missing, HTTP 404/410
  kNetwork,        // connection failures, HTTP errors other than 404/403
  kHttp,           // an HTTP status the caller should see (code() holds it)
  kIntegrity,      // corrupt or truncated stream, digest or length mismatch
  kUnsafeArchive,  // member escaping the target, links, devices
  kLimit,          // archive exceeds a configured limit (bomb)
  kDiskFull,       // ENOSPC / EDQUOT
  kAccessDenied,   // EACCES / EPERM / EROFS, HTTP 401/403
  kUnsafeCache,    // a link or a non-regular file where the cache creates one (ELOOP)
  kTimeout,        // network stall or connect timeout
  kLock,           // lock wait timed out
  kCancelled,      // the caller asked to stop (Ctrl-C)
  kInvalid,        // bad argument
  kIO,             // any other OS error
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& msg, int code = 0)
      : std::runtime_error(msg), kind_(kind), code_(code) {}
  ErrorKind kind() const { return kind_; }
  // errno for OS errors, the HTTP status for HTTP errors, else 0.
  int code() const { return code_; }

 private:
  ErrorKind kind_;
  int code_;
};

// The object changed under a download (a 200 to a Range request, a part without the
// validator or with another one, a drop with no validator to resume against): the bytes
// already passed on belong to another version, so the extraction starts again from byte 0.
// If it escapes, it is an integrity error.
class RestartError : public Error {
 public:
  explicit RestartError(const std::string& msg) : Error(ErrorKind::kIntegrity, msg) {}
};

// Throws an Error whose kind follows errno (ENOSPC -> kDiskFull, ...).
[[noreturn]] void throw_errno(const std::string& what, int err);

}  // namespace hubfast
