#include "realworld.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

namespace hotfix::test::realworld {

void require_program(const std::string& path, const std::string& debian_package) {
  if (::access(path.c_str(), X_OK) != 0) {
    std::fprintf(stderr, "SKIP: %s is missing (apt-get install %s; tools/check installs it)\n", path.c_str(),
                 debian_package.c_str());
    std::exit(4);
  }
}

int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  int port = 0;
  if (fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  if (fd >= 0) ::close(fd);
  return port;
}

ScratchDir::ScratchDir(const std::string& prefix) {
  std::string tmpl = "/tmp/" + prefix + "-XXXXXX";
  if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

ScratchDir::~ScratchDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string ScratchDir::write(const std::string& name, const std::string& text) const {
  std::ofstream(file(name)) << text;
  return file(name);
}

std::string build_fix(const std::string& source, const std::string& out, const std::vector<std::string>& extra) {
  bool cxx = source.ends_with(".cpp") || source.ends_with(".cc");
  std::vector<std::string> argv = {cxx ? "/usr/bin/g++" : "/usr/bin/gcc", "-O2", "-g", "-shared", "-fPIC", source, "-o", out};
  argv.insert(argv.end(), extra.begin(), extra.end());
  auto r = run(argv);
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  return out;
}

bool wait_for_port(int port, int timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(port));
    bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    ::close(fd);
    if (ok) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

namespace {
int redis_port() {
  require_program("/usr/bin/redis-server", "redis-server");
  require_program("/usr/bin/redis-cli", "redis-tools");
  require_program("/usr/bin/redis-benchmark", "redis-tools");
  int port = free_port();
  REQUIRE(port > 0);
  return port;
}
}  // namespace

RedisServer::RedisServer(const std::string& prefix)
    : dir(prefix),
      port(redis_port()),
      server({"/usr/bin/redis-server", "--port", std::to_string(port), "--bind", "127.0.0.1", "--save", "",
              "--appendonly", "no", "--dir", dir.path()}) {
  REQUIRE(wait_for_port(port));
}

}  // namespace hotfix::test::realworld
