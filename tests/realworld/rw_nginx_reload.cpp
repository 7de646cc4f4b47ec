// Debian's nginx (nginx-light), a single-threaded master and two single-threaded workers: a
// user's C fix makes ngx_http_set_etag return NGX_OK without setting the ETag. `patch --exe`
// patches the master and both workers; curl shows no ETag on every worker; `kill -HUP` makes the
// master fork two new workers, which run the fix (fork gives it) and are adopted by `list --exe`
// (their own registry and counters, patch/adopt.hpp); `revert --exe` restores the ETag on all.
//
// nginx runs from a private copy of /usr/sbin/nginx, so that --exe (matched by device and
// inode) reaches this test's processes and never another nginx on the machine.
#include <signal.h>
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <set>

#include <fmt/format.h>
#include <regex>
#include <thread>

#include "realworld.hpp"

using namespace hotfix::test;
using namespace hotfix::test::realworld;
using namespace std::chrono;

namespace {

std::vector<pid_t> children_of(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/task/{}/children", pid, pid));
  std::vector<pid_t> out;
  for (pid_t c; in >> c;) out.push_back(c);
  std::sort(out.begin(), out.end());
  return out;
}

// `tries` requests on fresh connections (reuseport spreads them over the workers): every one
// succeeds and carries an ETag exactly when `etag`. Returns the workers that answered.
std::set<pid_t> expect_etag(int port, bool etag, int tries = 60) {
  std::set<pid_t> workers;
  for (int i = 0; i < tries; ++i) {
    auto r = run({"/usr/bin/curl", "-s", "-D", "-", "-o", "/dev/null", fmt::format("http://127.0.0.1:{}/index.html", port)},
                 seconds(20));
    INFO("response " << i << ": " << r.out);
    REQUIRE(r.exit_code == 0);
    REQUIRE(r.out.find(" 200") != std::string::npos);
    std::smatch m;
    REQUIRE(std::regex_search(r.out, m, std::regex("X-Worker: ([0-9]+)", std::regex::icase)));
    workers.insert(std::stoi(m[1]));
    CHECK(std::regex_search(r.out, std::regex("^ETag:", std::regex::icase | std::regex::multiline)) == etag);
  }
  return workers;
}

// The registry memfd `pid` maps (device, inode): the same in processes that share it.
std::pair<uint64_t, uint64_t> registry_identity(pid_t pid) {
  for (auto& line : lines_of(read_file(fmt::format("/proc/{}/maps", pid)))) {
    if (line.find("/memfd:hotfix-registry") == std::string::npos) continue;
    struct stat st{};
    if (::stat(fmt::format("/proc/{}/map_files/{}", pid, line.substr(0, line.find(' '))).c_str(), &st) != 0) break;
    return {st.st_dev, st.st_ino};
  }
  return {0, 0};
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

}  // namespace

TEST_CASE("nginx reload: patch --exe, kill -HUP, the new workers serve the fix, revert --exe restores it") {
  require_root();
  require_program("/usr/sbin/nginx", "nginx-light");
  require_program("/usr/bin/curl", "curl");
  ScratchDir dir("rw-nginx-reload");
  std::filesystem::permissions(dir.path(), std::filesystem::perms(0755));  // workers (www-data) read the docroot
  std::filesystem::create_directories(dir.file("www"));
  std::filesystem::create_directories(dir.file("tmp"));
  dir.write("www/index.html", "hello from hotfix\n");
  const std::string exe = dir.file("nginx");
  std::filesystem::copy_file("/usr/sbin/nginx", exe);
  std::filesystem::permissions(exe, std::filesystem::perms(0755));
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
    listen 127.0.0.1:{1} reuseport;
    root {0}/www;
    location / {{ add_header X-Worker $pid; }}
  }}
}}
)", dir.path(), port));
  Child nginx({exe, "-p", dir.path(), "-c", conf, "-e", dir.file("error.log")});
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

  auto syms = ctl_run({"symbols", "--pid", std::to_string(workers[0]), "ngx_http_set_etag"});
  if (syms.out.find("ngx_http_set_etag") == std::string::npos) {
    fprintf(stderr, "SKIP: this nginx has no ngx_http_set_etag symbol (%s)\n", syms.err.c_str());
    std::exit(4);
  }
  // ngx_int_t ngx_http_set_etag(ngx_http_request_t *r) (src/http/ngx_http_core_module.c):
  // NGX_OK (0) without setting r->headers_out.etag, so no ETag header is sent.
  auto fix = build_fix(dir.write("fix.c",
                                 "#include <stdint.h>\n"
                                 "intptr_t ngx_http_set_etag(void *r) { (void)r; return 0; }\n"),
                       dir.file("fix.so"));
  CHECK(expect_etag(port, true, 10).size() >= 1);

  // One command patches the master and both workers.
  auto patched = ctl_run({"patch", "--exe", exe, "--lib", fix, "ngx_http_set_etag", "--json"});
  INFO("patch: " << patched.out << patched.err);
  REQUIRE(patched.exit_code == 0);
  CHECK(patched.out.find("\"processes\":3,\"ok\":3,\"failed\":0") != std::string::npos);
  auto served = expect_etag(port, false);
  CHECK(served == std::set<pid_t>(workers.begin(), workers.end()));  // every worker was hit, none sent an ETag

  // Reload: the master forks new workers (the old ones finish and exit).
  REQUIRE(::kill(nginx.pid(), SIGHUP) == 0);
  std::vector<pid_t> fresh;
  for (int i = 0; i < 500; ++i) {
    fresh = children_of(nginx.pid());
    bool renewed = fresh.size() == 2 && std::none_of(fresh.begin(), fresh.end(), [&](pid_t p) {
      return std::find(workers.begin(), workers.end(), p) != workers.end();
    });
    if (renewed) break;
    std::this_thread::sleep_for(milliseconds(20));
  }
  REQUIRE(fresh.size() == 2);
  for (pid_t p : fresh) REQUIRE(std::find(workers.begin(), workers.end(), p) == workers.end());
  served = expect_etag(port, false);  // forks of the patched master: the fix, with nothing done to them
  for (pid_t p : fresh) CHECK(registry_identity(p) == registry_identity(nginx.pid()));  // inherited: shared
  CHECK(served == std::set<pid_t>(fresh.begin(), fresh.end()));

  // list --exe shows every process, the new workers' inherited patch adopted as their own.
  auto listed = ctl_run({"list", "--exe", exe, "--json"});
  INFO("list: " << listed.out << listed.err);
  REQUIRE(listed.exit_code == 0);
  CHECK(listed.out.find("\"processes\":3,\"ok\":3,\"failed\":0") != std::string::npos);
  for (pid_t p : {nginx.pid(), fresh[0], fresh[1]}) {
    CHECK(listed.out.find(fmt::format("\"pid\":{},", p)) != std::string::npos);
    CHECK(listed.out.find(fmt::format("\"owner\":{}", p)) != std::string::npos);
  }
  CHECK(count(listed.out, "\"state\":\"active\"") == 3);
  for (pid_t p : fresh) CHECK(registry_identity(p) != registry_identity(nginx.pid()));  // a registry of its own
  auto stats = ctl_run({"stats", "--pid", std::to_string(fresh[0]), "--json"});
  INFO("stats: " << stats.out << stats.err);
  CHECK(stats.exit_code == 0);

  auto reverted = ctl_run({"revert", "--exe", exe, "--all", "--json"});
  INFO("revert: " << reverted.out << reverted.err);
  REQUIRE(reverted.exit_code == 0);
  CHECK(reverted.out.find("\"processes\":3,\"ok\":3,\"failed\":0") != std::string::npos);
  served = expect_etag(port, true);
  CHECK(served == std::set<pid_t>(fresh.begin(), fresh.end()));
  CHECK(nginx.running());
  CHECK(children_of(nginx.pid()) == fresh);  // no worker died and was replaced
}
