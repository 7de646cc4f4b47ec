// One error convention for the whole controller (after bpftrace's Result types):
// recoverable failures travel as Result<T>; the CLI prints Error as one line
// "what happened: why" followed by "what to do" (the hint).
#pragma once
#include <expected>
#include <string>
#include <utility>

#include <fmt/format.h>

namespace hotfix {

struct Error {
  std::string what;   // what happened and why, e.g. "no process with pid 42"
  std::string hint;   // what to do, e.g. "check the pid with `ps`"; may be empty
  int exit_code = 1;  // 1 = failure, 2 = usage error

  std::string line() const { return hint.empty() ? what : what + "; " + hint; }
};

template <typename T>
using Result = std::expected<T, Error>;

inline std::unexpected<Error> fail(std::string what, std::string hint = {}) {
  return std::unexpected(Error{std::move(what), std::move(hint), 1});
}
inline std::unexpected<Error> usage_error(std::string what, std::string hint = {}) {
  return std::unexpected(Error{std::move(what), std::move(hint), 2});
}

// errno text, for "why" parts of messages.
std::string errno_text(int err);

}  // namespace hotfix

// Propagate an error from an expression returning Result<T> and yield its value:
//   auto v = HOTFIX_TRY(load(x));
#define HOTFIX_TRY(expr)                                        \
  ({                                                            \
    auto _r = (expr);                                           \
    if (!_r) return std::unexpected(std::move(_r.error()));     \
    std::move(*_r);                                             \
  })

// Propagate an error from an expression returning Result<void> (a statement):
//   HOTFIX_CHECK(write(x));
#define HOTFIX_CHECK(expr)                                      \
  do {                                                          \
    auto _r = (expr);                                           \
    if (!_r) return std::unexpected(std::move(_r.error()));     \
  } while (0)
