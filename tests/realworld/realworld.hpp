// Shared by the tests on Debian's own programs (tests/realworld/rw_*.cpp).
#pragma once
#include <string>
#include <vector>

#include "support/harness.hpp"

namespace hotfix::test::realworld {

// Exit with SKIP (4) naming the package unless `path` is an executable file.
void require_program(const std::string& path, const std::string& debian_package);

// A TCP port on 127.0.0.1 that nothing listens on now.
int free_port();

// A fresh directory under /tmp, removed (recursively) when the object goes.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& prefix);
  ~ScratchDir();
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  // Write `text` to file(name) and return its path.
  std::string write(const std::string& name, const std::string& text) const;

 private:
  std::string path_;
};

// Build a fix the way a user would: `cc -O2 -g -shared -fPIC SOURCE -o OUT [extra...]` (cc is
// gcc for .c, g++ for .cpp). Fails the test (REQUIRE) with the compiler's output on error.
std::string build_fix(const std::string& source, const std::string& out, const std::vector<std::string>& extra = {});

// Wait until something accepts TCP connections on 127.0.0.1:port (true) or the timeout passes.
bool wait_for_port(int port, int timeout_ms = 10000);

// Debian's redis-server on a free loopback port, without persistence, its files in a scratch
// directory: accepting connections once constructed. SKIPs without redis-server, redis-cli or
// redis-benchmark (redis-tools).
struct RedisServer {
  explicit RedisServer(const std::string& prefix);
  ScratchDir dir;
  int port = 0;
  Child server;
  std::string pid() const { return std::to_string(server.pid()); }
};

}  // namespace hotfix::test::realworld
