// Errors as values: every fallible call in the core returns a status.
#pragma once

#include <string>
#include <utility>

namespace pregated {

enum class status_code {
  status_code_ok = 0,
  status_code_invalid_argument,  // the caller passed something wrong; the message says what
  status_code_out_of_memory,     // an allocation failed; the message says how much
  status_code_unavailable,       // a backend or device is not usable here
  status_code_closed,            // the object was closed and can no longer be used
  status_code_internal,          // a backend call failed (CUDA, cuBLAS, ...)
};

class status {
 public:
  status() = default;
  status(status_code code, std::string message) : code_(code), message_(std::move(message)) {}

  static status ok() { return {}; }
  bool is_ok() const { return code_ == status_code::status_code_ok; }
  explicit operator bool() const { return is_ok(); }
  status_code code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  status_code code_ = status_code::status_code_ok;
  std::string message_;
};

inline status invalid_argument(std::string message) {
  return {status_code::status_code_invalid_argument, std::move(message)};
}
inline status internal_error(std::string message) {
  return {status_code::status_code_internal, std::move(message)};
}

}  // namespace pregated

// Propagate a non-ok status to the caller.
#define PREGATED_RETURN_IF_ERROR(expr)        \
  do {                                        \
    ::pregated::status _pg_st = (expr);       \
    if (!_pg_st.is_ok()) return _pg_st;       \
  } while (0)
