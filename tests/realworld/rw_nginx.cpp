// Debian's nginx (nginx-light): a single-threaded master and two single-threaded workers on a
// private config. A user's C fix makes ngx_http_set_etag return NGX_OK without setting the
// ETag; it is applied to the worker that serves and to the master, curl shows responses of
// the patched worker without ETag (the other worker's keep theirs), revert restores them, and
// nginx keeps serving throughout. Before injection chose threads by unwinding, a worker in
// epoll_wait was refused for a stale __libc_fork word on its stack.
#include <signal.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <map>
#include <regex>
#include <thread>

#include "realworld.hpp"

using namespace hotfix::test;
using namespace hotfix::test::realworld;
using namespace std::chrono;

namespace {

struct Response {
  pid_t worker = 0;  // X-Worker: nginx's $pid
  bool etag = false;
  bool ok = false;
};

Response get(int port) {
  auto r = run({"/usr/bin/curl", "-s", "-D", "-", "-o", "/dev/null", fmt::format("http://127.0.0.1:{}/index.html", port)},
               seconds(20));
  Response out;
  out.ok = r.exit_code == 0 && r.out.find(" 200") != std::string::npos;
  std::smatch m;
  if (std::regex_search(r.out, m, std::regex("X-Worker: ([0-9]+)", std::regex::icase))) out.worker = std::stoi(m[1]);
  out.etag = std::regex_search(r.out, std::regex("^ETag:", std::regex::icase | std::regex::multiline));
  return out;
}

std::vector<pid_t> children_of(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/task/{}/children", pid, pid));
  std::vector<pid_t> out;
  for (pid_t c; in >> c;) out.push_back(c);
  return out;
}

int threads_of(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/status", pid));
  for (std::string line; std::getline(in, line);)
    if (line.rfind("Threads:", 0) == 0) return std::stoi(line.substr(8));
  return -1;
}

// Up to `tries` requests: every one succeeds; how many came from `worker`, and whether each
// worker's responses carried an ETag exactly when expected.
void expect_etags(int port, pid_t patched_worker, bool patched, int tries = 300) {
  int from_patched = 0;
  for (int i = 0; i < tries && from_patched < 5; ++i) {
    auto r = get(port);
    REQUIRE(r.ok);
    REQUIRE(r.worker != 0);
    INFO("response from worker " << r.worker << (r.etag ? " with" : " without") << " ETag");
    if (r.worker == patched_worker) {
      ++from_patched;
      CHECK(r.etag == !patched);
    } else {
      CHECK(r.etag);
    }
  }
  CHECK(from_patched > 0);
}

}  // namespace

TEST_CASE("nginx: a worker and the master patched and reverted; curl sees the change on the patched worker") {
  require_root();
  require_program("/usr/sbin/nginx", "nginx-light");
  require_program("/usr/bin/curl", "curl");
  ScratchDir dir("rw-nginx");
  // The workers run as www-data: they must be able to read the docroot inside the 0700 scratch dir.
  std::filesystem::permissions(dir.path(), std::filesystem::perms(0755));
  std::filesystem::create_directories(dir.file("www"));
  std::filesystem::create_directories(dir.file("tmp"));
  dir.write("www/index.html", "hello from hotfix\n");
  int port = free_port();
  auto conf = dir.write("nginx.conf", fmt::format(R"(
master_process on;
daemon off;
worker_processes 2;
pid {0}/nginx.pid;
error_log {0}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {0}/tmp;
  server {{
    listen 127.0.0.1:{1};
    root {0}/www;
    location / {{ add_header X-Worker $pid; }}
  }}
}}
)", dir.path(), port));
  Child nginx({"/usr/sbin/nginx", "-p", dir.path(), "-c", conf, "-e", dir.file("error.log")});
  // Child kills the master with SIGKILL, which would orphan the workers: end them first.
  struct Workers {
    pid_t master;
    ~Workers() {
      for (pid_t w : children_of(master)) ::kill(w, SIGKILL);
    }
  } reap_workers{nginx.pid()};
  REQUIRE(wait_for_port(port));
  std::vector<pid_t> workers;
  for (int i = 0; i < 100 && workers.size() < 2; ++i) {
    workers = children_of(nginx.pid());
    std::this_thread::sleep_for(milliseconds(20));
  }
  REQUIRE(workers.size() == 2);
  for (pid_t p : {nginx.pid(), workers[0], workers[1]}) REQUIRE(threads_of(p) == 1);

  auto syms = ctl_run({"symbols", "--pid", std::to_string(workers[0]), "ngx_http_set_etag"});
  if (syms.out.find("ngx_http_set_etag") == std::string::npos) {
    fprintf(stderr, "SKIP: this nginx has no ngx_http_set_etag symbol (%s)\n", syms.err.c_str());
    std::exit(4);
  }
  auto fix = build_fix(dir.write("fix.c",
                                 "#include <stdint.h>\n"
                                 "/* NGX_OK without setting r->headers_out.etag: no ETag header. */\n"
                                 "intptr_t ngx_http_set_etag(void *r) { (void)r; return 0; }\n"),
                       dir.file("fix.so"));

  // The worker the kernel hands connections to now is the one to patch (EPOLLEXCLUSIVE
  // tends to wake the same one).
  auto first = get(port);
  REQUIRE(first.ok);
  REQUIRE(first.etag);
  pid_t serving = first.worker;
  REQUIRE((serving == workers[0] || serving == workers[1]));

  for (pid_t target : {serving, nginx.pid()}) {
    std::vector<std::string> args{"patch", "--pid", std::to_string(target), "--lib", fix, "ngx_http_set_etag"};
    // A worker runs as www-data and cannot open root's pinned hit counters (troubleshooting.md).
    if (target != nginx.pid()) args.push_back("--no-count");
    auto patched = ctl_run(args);
    INFO("pid " << target << ": " << patched.out << patched.err);
    REQUIRE(patched.exit_code == 0);
  }
  expect_etags(port, serving, true);
  for (pid_t target : {serving, nginx.pid()}) {
    auto reverted = ctl_run({"revert", "--pid", std::to_string(target), "--all"});
    INFO("pid " << target << ": " << reverted.out << reverted.err);
    REQUIRE(reverted.exit_code == 0);
  }
  expect_etags(port, serving, false);
  CHECK(nginx.running());
  CHECK(children_of(nginx.pid()) == workers);  // no worker died and was replaced
}
