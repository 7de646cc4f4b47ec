#include "common/crashpoint.hpp"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace hotfix {

namespace {

struct CrashConfig {
  long at = 0;  // 0: never
  bool list = false;
  CrashConfig() {
    if (const char* s = std::getenv("HOTFIX_CRASH_AT")) at = std::strtol(s, nullptr, 10);
    if (const char* s = std::getenv("HOTFIX_CRASH_LIST")) list = *s && *s != '0';
  }
};

const CrashConfig& config() {
  static const CrashConfig c;
  return c;
}

std::atomic<long> reached{0};

}  // namespace

void crashpoint(const char* name) {
  const auto& c = config();
  if (!c.at && !c.list) return;
  long k = ++reached;
  if (c.list) std::fprintf(stderr, "crashpoint %ld %s\n", k, name);
  if (k == c.at) ::kill(::getpid(), SIGKILL);
}

}  // namespace hotfix
