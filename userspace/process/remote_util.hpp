// Small helpers shared by remote.cpp (system calls, function calls) and inject.cpp (loader).
#pragma once
#include <unistd.h>

#include <cstdint>
#include <string>

namespace hotfix::remote_util {

inline uint64_t page_size() { return static_cast<uint64_t>(::sysconf(_SC_PAGESIZE)); }
inline uint64_t page_up(uint64_t v) { return (v + page_size() - 1) & ~(page_size() - 1); }
inline uint64_t page_down(uint64_t v) { return v & ~(page_size() - 1); }

inline std::string basename_of(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}
inline bool is_libc(const std::string& path) {
  auto base = basename_of(path);
  return base.rfind("libc.so", 0) == 0 || base.rfind("libc-", 0) == 0;
}

}  // namespace hotfix::remote_util
