// hotfix-ctl VERB --exe PATH / --unit NAME / --pid A,B / --children: one run of the verb per
// process, several at a time, then one summary.
//
// Each process gets its own hotfix-ctl child (`hotfix-ctl VERB --pid P ...`): ptrace is per
// tracer thread and the engine keeps per-operation state (journal lock, progress, audit), so a
// process of its own per target is the simplest parallelism that cannot mix two targets up,
// and a single-pid run stays byte for byte what it always was.
#include "cli/targets.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>

#include "common/json.hpp"
#include "patch/journal.hpp"
#include "process/maps.hpp"
#include "process/targets.hpp"

namespace hotfix::cli {

namespace {

constexpr size_t kParallel = 4;  // processes worked on at once: bounded, the host keeps serving

struct Scanned {
  TargetSpec spec;
  std::vector<std::string> pid_words;  // as given, for the error of a bad one
  Args rest;                           // every other argument, passed to each run unchanged
  bool help = false;
};

// Take the target options out of `args` (forms: --pid N, --pid=N, -p N, -pN, --exe P,
// --exe=P, --unit U, --unit=U, --children).
Scanned scan(const Args& args) {
  Scanned s;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&](const std::string& name, std::vector<std::string>& into) {
      if (a == name) {
        if (i + 1 < args.size()) into.push_back(args[++i]);
        else into.push_back("");
        return true;
      }
      if (a.rfind(name + "=", 0) == 0) {
        into.push_back(a.substr(name.size() + 1));
        return true;
      }
      return false;
    };
    if (a == "--help" || a == "-h") s.help = true;
    if (value("--pid", s.pid_words) || value("-p", s.pid_words) || value("--exe", s.spec.exes) ||
        value("--unit", s.spec.units))
      continue;
    if (a.size() > 2 && a.rfind("-p", 0) == 0 && a[2] != '-' && std::isdigit(static_cast<unsigned char>(a[2]))) {
      s.pid_words.push_back(a.substr(2));
      continue;
    }
    if (a == "--children") {
      s.spec.children = true;
      continue;
    }
    s.rest.push_back(a);
  }
  return s;
}

Result<std::vector<pid_t>> parse_pids(const std::vector<std::string>& words) {
  std::vector<pid_t> out;
  for (auto& w : words) {
    size_t at = 0;
    while (at <= w.size()) {
      size_t comma = w.find(',', at);
      std::string one = w.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
      char* end = nullptr;
      long v = std::strtol(one.c_str(), &end, 10);
      if (one.empty() || *end != '\0' || v <= 0 || v > (1l << 22))
        return std::unexpected(
            Error{fmt::format("bad --pid '{}': give process ids, repeated or as a comma list (--pid 12,34)", w), "", 2});
      out.push_back(static_cast<pid_t>(v));
      if (comma == std::string::npos) break;
      at = comma + 1;
    }
  }
  return out;
}

struct Run {
  pid_t target = 0;
  uint64_t start = 0;  // the target's start time: a pid reused meanwhile is not "still there"
  std::string comm;
  pid_t child = -1;
  int out = -1, err = -1;
  std::string stdout_text, stderr_text;
  int exit_code = -1;
  std::string status;  // "ok", "failed", "exited"
};

std::string self_exe() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : "/proc/self/exe";
}

bool start_run(Run& r, const std::string& exe, const std::string& verb, const Args& rest) {
  int out[2], err[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return false;
  if (::pipe2(err, O_CLOEXEC) != 0) {
    ::close(out[0]), ::close(out[1]);
    return false;
  }
  std::vector<std::string> argv_s = {exe, verb, "--pid", std::to_string(r.target)};
  argv_s.insert(argv_s.end(), rest.begin(), rest.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t child = ::fork();
  if (child == 0) {
    ::dup2(out[1], 1);
    ::dup2(err[1], 2);
    ::execv(exe.c_str(), argv.data());
    _exit(127);
  }
  ::close(out[1]), ::close(err[1]);
  if (child < 0) {
    ::close(out[0]), ::close(err[0]);
    return false;
  }
  r.child = child, r.out = out[0], r.err = err[0];
  return true;
}

// Read what the running children print until each has closed both pipes, then reap it.
void pump(std::vector<Run*>& running) {
  std::vector<pollfd> fds;
  for (auto* r : running) {
    if (r->out >= 0) fds.push_back({r->out, POLLIN, 0});
    if (r->err >= 0) fds.push_back({r->err, POLLIN, 0});
  }
  if (!fds.empty()) ::poll(fds.data(), fds.size(), 1000);
  for (auto& f : fds) {
    if (!(f.revents & (POLLIN | POLLHUP | POLLERR))) continue;
    for (auto* r : running) {
      int* which = f.fd == r->out ? &r->out : f.fd == r->err ? &r->err : nullptr;
      if (!which) continue;
      char buf[65536];
      ssize_t n = ::read(f.fd, buf, sizeof buf);
      if (n > 0) (which == &r->out ? r->stdout_text : r->stderr_text).append(buf, static_cast<size_t>(n));
      else if (n == 0 || (errno != EINTR && errno != EAGAIN)) ::close(f.fd), *which = -1;
    }
  }
  for (auto it = running.begin(); it != running.end();) {
    Run* r = *it;
    if (r->out >= 0 || r->err >= 0) {
      ++it;
      continue;
    }
    int st = 0;
    while (::waitpid(r->child, &st, 0) < 0 && errno == EINTR) {
    }
    r->exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    it = running.erase(it);
  }
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at < text.size()) {
    size_t nl = text.find('\n', at);
    out.push_back(text.substr(at, nl == std::string::npos ? std::string::npos : nl - at));
    if (nl == std::string::npos) break;
    at = nl + 1;
  }
  return out;
}

// Why a run failed: its last error line, without the "hotfix-ctl: " every error starts with.
std::string failure_of(const Run& r) {
  auto lines = lines_of(r.stderr_text);
  for (auto it = lines.rbegin(); it != lines.rend(); ++it) {
    if (it->empty()) continue;
    std::string l = *it;
    if (l.rfind("hotfix-ctl: ", 0) == 0) l = l.substr(12);
    return l;
  }
  return r.exit_code >= 128 ? fmt::format("hotfix-ctl ended by signal {}", r.exit_code - 128)
                            : fmt::format("exit status {}", r.exit_code);
}

std::string run_json(const std::string& verb, const Run& r) {
  std::string results, notes;
  for (auto& l : lines_of(r.stdout_text)) {
    if (l.empty()) continue;
    if (l.front() == '{' && l.back() == '}') results += (results.empty() ? "" : ",") + l;  // our own JSON
    else notes += (notes.empty() ? "" : ",") + json__quote(l);
  }
  return fmt::format("{{\"verb\":\"{}\",\"pid\":{},\"comm\":{},\"status\":\"{}\",\"exit_code\":{},\"error\":{},"
                     "\"results\":[{}],\"notes\":[{}]}}",
                     verb, r.target, json__quote(r.comm), r.status, r.exit_code,
                     r.status == "ok" ? std::string("null") : json__quote(failure_of(r)), results, notes);
}

int summarise(const std::string& verb, std::vector<Run>& runs, const std::vector<std::string>& notes, bool json) {
  size_t ok = 0, failed = 0, exited = 0, usage = 0;
  for (auto& r : runs) {
    if (r.exit_code == 0) r.status = "ok", ++ok;
    else if (!targets__same_process(r.target, r.start)) r.status = "exited", ++exited;  // gone meanwhile: not our failure
    else r.status = "failed", ++failed, usage += r.exit_code == 2;
  }
  if (json) {
    std::string failures, gone;
    for (auto& r : runs) {
      if (r.status == "ok") continue;
      std::string item = fmt::format("{{\"pid\":{},\"error\":{}}}", r.target, json__quote(failure_of(r)));
      std::string& into = r.status == "failed" ? failures : gone;
      into += (into.empty() ? "" : ",") + item;
    }
    for (auto& r : runs) fmt::print("{}\n", run_json(verb, r));
    std::string note_items;
    for (auto& n : notes) note_items += (note_items.empty() ? "" : ",") + json__quote(n);
    fmt::print("{{\"summary\":{{\"verb\":\"{}\",\"processes\":{},\"ok\":{},\"failed\":{},\"exited\":{},"
               "\"failures\":[{}],\"exits\":[{}],\"notes\":[{}]}}}}\n",
               verb, runs.size(), ok, failed, exited, failures, gone, note_items);
  } else {
    for (auto& r : runs) {
      fmt::print("{}", r.stdout_text);
      if (!r.stdout_text.empty() && r.stdout_text.back() != '\n') fmt::print("\n");
      if (r.status != "ok") continue;
      for (auto& l : lines_of(r.stderr_text))  // warnings and notes of a run that succeeded
        if (!l.empty()) fmt::print(stderr, "pid {}: {}\n", r.target, l);
    }
    for (auto& n : notes) fmt::print("note: {}\n", n);
    fmt::print("\nsummary: {} on {} process(es): {} ok, {} failed, {} exited meanwhile\n", verb, runs.size(), ok,
               failed, exited);
    fmt::print("  {:<8} {:<16} {:<7} {}\n", "PID", "COMM", "RESULT", "DETAIL");
    for (auto& r : runs)
      fmt::print("  {:<8} {:<16} {:<7} {}\n", r.target, one_line(r.comm), r.status,
                 r.status == "ok" ? "" : one_line(failure_of(r)));
  }
  std::fflush(stdout);
  if (failed) {
    std::string which;
    for (auto& r : runs)
      if (r.status == "failed") which += fmt::format("{}{} ({})", which.empty() ? "" : "; ", r.target, failure_of(r));
    fmt::print(stderr, "hotfix-ctl {}: {} of {} process(es) failed: {}\n", verb, failed, runs.size(), one_line(which));
  }
  if (failed && usage == failed && ok == 0) return 2;  // the same bad option for every one
  return failed ? 1 : 0;
}

}  // namespace

void add_target_options(po::options_description& desc) {
  desc.add_options()("exe", po::value<std::vector<std::string>>(),
                     "every process running this file (same device and inode: renames and symlinks match)")(
      "unit", po::value<std::vector<std::string>>(), "every process in this systemd unit's cgroup (NAME.service)")(
      "children", "also every descendant of the processes named (a pre-fork server's workers)");
}

std::optional<int> run_for_targets(const std::string& verb, const Args& args) {
  Scanned s = scan(args);
  if (s.help) return std::nullopt;
  bool single = s.pid_words.size() == 1 && s.pid_words[0].find(',') == std::string::npos && s.spec.exes.empty() &&
                s.spec.units.empty() && !s.spec.children;
  bool host_wide = verb == "list" && s.pid_words.empty() && s.spec.empty();
  // Host-wide list takes only list's own flags; anything else is the verb parser's to refuse
  // (a usage error, exit 2), before any process is looked at.
  if (host_wide)
    for (auto& w : s.rest)
      if (w != "--json" && w != "--all") return std::nullopt;
  if (single || (!host_wide && s.pid_words.empty() && s.spec.empty())) return std::nullopt;
  auto pids = parse_pids(s.pid_words);
  if (!pids) return report(pids.error());
  s.spec.pids = *pids;
  ResolvedTargets resolved;
  if (host_wide) {
    resolved.pids = targets__with_registry();
    if (resolved.pids.empty()) {
      if (std::find(s.rest.begin(), s.rest.end(), "--json") != s.rest.end())
        fmt::print("{{\"summary\":{{\"verb\":\"list\",\"processes\":0,\"ok\":0,\"failed\":0,\"exited\":0,"
                   "\"failures\":[],\"exits\":[],\"notes\":[]}}}}\n");
      else fmt::print("no process on this host has hotfix patches\n");
      return 0;
    }
  } else {
    auto r = targets__resolve(s.spec);
    if (!r) return report(r.error());
    resolved = std::move(*r);
    if (resolved.pids.empty()) return report(Error{"the targets named no process", "check --pid, --exe and --unit", 1});
  }
  bool json = std::find(s.rest.begin(), s.rest.end(), "--json") != s.rest.end();
  std::vector<Run> runs(resolved.pids.size());
  for (size_t i = 0; i < runs.size(); ++i) {
    runs[i].target = resolved.pids[i];
    runs[i].start = process__start_time(resolved.pids[i]).value_or(0);
    runs[i].comm = process__comm(resolved.pids[i]);
  }
  const std::string exe = self_exe();
  std::vector<Run*> running;
  size_t next = 0;
  while (next < runs.size() || !running.empty()) {
    while (next < runs.size() && running.size() < kParallel) {
      Run& r = runs[next++];
      if (start_run(r, exe, verb, s.rest)) running.push_back(&r);
      else r.exit_code = 1, r.stderr_text = fmt::format("cannot start hotfix-ctl for pid {}: {}\n", r.target, errno_text(errno));
    }
    pump(running);
  }
  return summarise(verb, runs, resolved.notes, json);
}

}  // namespace hotfix::cli
