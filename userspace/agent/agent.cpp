#include "agent/agent.hpp"

#include <dirent.h>
#include <elfutils/libdwelf.h>
#include <fcntl.h>
#include <libelf.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <thread>

#include "agent/trigger.hpp"
#include "common/audit.hpp"
#include "common/crashpoint.hpp"
#include "common/sha256.hpp"
#include "patch/deliver.hpp"
#include "patch/engine.hpp"
#include "patch/recover.hpp"
#include "process/maps.hpp"
#include "process/park.hpp"

namespace hotfix {

namespace {

using namespace std::chrono;

constexpr uint64_t kEntrySlack = 16;  // the probed instruction has run when the process stops

std::string build_id_of_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return "";
  elf_version(EV_CURRENT);
  Elf* elf = elf_begin(fd.get(), ELF_C_READ, nullptr);
  if (!elf) return "";
  const void* id = nullptr;
  ssize_t len = dwelf_elf_gnu_build_id(elf, &id);
  std::string out;
  for (ssize_t i = 0; i < len; ++i) out += fmt::format("{:02x}", static_cast<const unsigned char*>(id)[i]);
  elf_end(elf);
  return out;
}

std::string short_id(const std::string& build_id) { return build_id.substr(0, 12); }

// A binary with persisted sets, as armed.
struct Binary {
  std::string path, build_id;
  dev_t dev = 0;
  ino_t ino = 0;
  EntryPoint entry;
  std::vector<uint32_t> sets;
  UniqueFd link;
};

std::string ids_text(const std::vector<uint32_t>& ids) {
  std::string out;
  for (auto id : ids) out += (out.empty() ? "" : ",") + std::to_string(id);
  return out;
}

// Binaries of the usable sets; what cannot be used is logged when `log` is given.
std::vector<Binary> binaries_of(const std::vector<PersistedSet>& sets, const AgentLog* log) {
  std::map<std::pair<std::string, std::string>, std::vector<uint32_t>> groups;
  for (auto& s : sets) {
    if (!s.problem.empty()) {
      if (log) (*log)(fmt::format("set {}: not used: {}", s.id, s.problem));
      continue;
    }
    groups[{s.binary, s.build_id}].push_back(s.id);
  }
  std::vector<Binary> out;
  for (auto& [key, ids] : groups) {
    Binary b;
    b.path = key.first, b.build_id = key.second, b.sets = ids;
    struct stat st;
    if (::stat(b.path.c_str(), &st) != 0) {
      if (log) (*log)(fmt::format("sets {}: {} is missing ({}); not armed", ids_text(ids), b.path, errno_text(errno)));
      continue;
    }
    if (auto now = build_id_of_file(b.path); now != b.build_id) {
      if (log)
        (*log)(fmt::format("sets {}: {} now has build-id {} but the sets are for {}; not armed (the program was "
                           "rebuilt or upgraded: record the fix again for the new build)",
                           ids_text(ids), b.path, now.empty() ? "(none)" : short_id(now), short_id(b.build_id)));
      continue;
    }
    auto entry = elf__entry_point(b.path);
    if (!entry) {
      if (log) (*log)(fmt::format("sets {}: {}; not armed", ids_text(ids), entry.error().line()));
      continue;
    }
    b.dev = st.st_dev, b.ino = st.st_ino, b.entry = *entry;
    out.push_back(std::move(b));
  }
  return out;
}

// Live processes whose executable is the file (dev, ino): renames and symlinks do not matter.
std::vector<pid_t> processes_of(dev_t dev, ino_t ino) {
  std::vector<pid_t> out;
  DIR* d = ::opendir("/proc");
  if (!d) return out;
  while (auto* e = ::readdir(d)) {
    char* end = nullptr;
    long pid = std::strtol(e->d_name, &end, 10);
    if (*end || pid <= 0 || pid == ::getpid()) continue;
    struct stat st;
    if (::stat(fmt::format("/proc/{}/exe", pid).c_str(), &st) == 0 && st.st_dev == dev && st.st_ino == ino)
      out.push_back(static_cast<pid_t>(pid));
  }
  ::closedir(d);
  return out;
}

char state_of(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/status", pid));
  for (std::string line; std::getline(in, line);)
    if (line.rfind("State:", 0) == 0) {
      auto at = line.find_first_not_of(" \t", 6);
      return at == std::string::npos ? '?' : line[at];
    }
  return '?';
}

// The entry point's address in `pid` if it is job-control stopped right at it, else 0.
uint64_t stopped_at_entry(pid_t pid, const Binary& b) {
  if (state_of(pid) != 'T') return 0;
  uint64_t pc = park__stopped_pc(pid);
  auto maps = process__read_maps(pid);
  if (!pc || !maps) return 0;
  for (auto& m : *maps) {
    if (!m.contains(pc) || !m.file_backed()) continue;
    uint64_t off = pc - m.start + m.offset;
    if (off >= b.entry.file_offset && off < b.entry.file_offset + kEntrySlack) return pc - (off - b.entry.file_offset);
  }
  return 0;
}

uint64_t steady_ms() { return static_cast<uint64_t>(duration_cast<milliseconds>(steady_clock::now().time_since_epoch()).count()); }

class Agent {
 public:
  Agent(const AgentOptions& opts, const AgentLog& log) : opts_(opts), log_(log) {}

  Result<void> start() {
    trigger_ = HOTFIX_TRY(EntryTrigger::open());
    reload();
    sweep("start");
    return {};
  }

  void loop(const std::atomic<bool>& stop) {
    uint64_t next_rescan = steady_ms() + static_cast<uint64_t>(opts_.rescan.count());
    while (!stop.load()) {
      // Park the whole batch first (milliseconds each), then patch: a process waiting its turn
      // is asleep with its hold running, not stopped.
      std::vector<EntryEvent> batch;
      if (auto r = trigger_->poll(milliseconds(200), [&](const EntryEvent& e) { batch.push_back(e); }); !r)
        log_(fmt::format("warning: {}", r.error().line()));
      std::vector<Held> held;
      for (auto& e : batch)
        if (auto h = on_new_process(e)) held.push_back(std::move(*h));
      for (auto& h : held) patch_and_release(h);
      if (uint64_t dropped = trigger_->dropped(); dropped > dropped_seen_) {
        log_(fmt::format("{} new process(es) were not stopped (the event buffer was full); looking for them",
                         dropped - dropped_seen_));
        dropped_seen_ = dropped;
        sweep("catch-up");
      }
      if (steady_ms() >= next_rescan) {
        next_rescan = steady_ms() + static_cast<uint64_t>(opts_.rescan.count());
        if (persist__generation() != generation_) {
          log_("the persisted sets changed: re-arming");
          reload();
        }
      }
    }
  }

 private:
  void reload() {
    generation_ = persist__generation();
    for (auto& b : binaries_) b.link.reset();
    auto sets = persist__list();
    if (!sets) {
      log_(fmt::format("cannot read the persisted sets: {}", sets.error().line()));
      binaries_.clear();
      return;
    }
    binaries_ = binaries_of(*sets, &log_);
    for (size_t i = 0; i < binaries_.size(); ++i) {
      auto& b = binaries_[i];
      auto link = trigger_->arm(b.path, b.entry, i);
      if (!link) {
        log_(fmt::format("sets {}: not armed: {}", ids_text(b.sets), link.error().line()));
        continue;
      }
      b.link = std::move(*link);
      log_(fmt::format("armed {} (build-id {}, sets {}): new processes are patched at their entry point", b.path,
                       short_id(b.build_id), ids_text(b.sets)));
    }
    if (binaries_.empty()) log_("no persisted patch sets to apply; waiting for `hotfix-ctl patch --persist`");
  }

  // The armed binary a probe's cookie names (its index), if still armed.
  const Binary* binary_for(uint64_t cookie) const {
    if (cookie < binaries_.size() && binaries_[cookie].link) return &binaries_[cookie];
    return nullptr;
  }

  // A parked process and the binary whose sets it gets.
  struct Held {
    ParkedProcess parked;
    const Binary* binary = nullptr;
  };

  std::optional<Held> on_new_process(const EntryEvent& e) {
    crashpoint("agent: a new process is stopped");
    const Binary* b = binary_for(e.cookie);
    if (!b) {  // disarmed between the stop and now: let it go as it is
      ::kill(e.pid, SIGCONT);
      log_(fmt::format("pid {} ({}): its binary is no longer armed; continued unpatched", e.pid, process__comm(e.pid)));
      return std::nullopt;
    }
    return park(e.pid, e.ip, *b, "new process");
  }

  std::optional<Held> park(pid_t pid, uint64_t entry, const Binary& b, const char* what) {
    std::string comm = process__comm(pid);
    auto parked = park__hold(pid, entry, entry + kEntrySlack, opts_.hold);
    if (!parked) {
      log_(fmt::format("pid {} ({}): {} of {}: cannot hold it at its entry point: {}", pid, comm, what, b.path,
                       parked.error().line()));
      return std::nullopt;
    }
    log_(fmt::format("pid {} ({}): {} of {}, held at its entry point", pid, comm, what, b.path));
    return Held{*parked, &b};
  }

  void park_and_patch(pid_t pid, uint64_t entry, const Binary& b, const char* what) {
    if (auto h = park(pid, entry, b, what)) patch_and_release(*h);
  }

  void patch_and_release(const Held& h) {
    const pid_t pid = h.parked.pid;
    std::string comm = process__comm(pid);
    auto applied = apply_sets(pid, *h.binary);
    auto released = park__release(h.parked);
    if (!released)
      log_(fmt::format("pid {} ({}): cannot release it: {}", pid, comm, released.error().line()));
    else if (!*released && process__alive(pid))
      log_(fmt::format("pid {} ({}): its hold ({} ms) ran out before the agent was done: it ran on by itself{}", pid,
                       comm, opts_.hold.count(), applied.empty() ? ", unpatched" : ""));
    else if (*released)
      log_(fmt::format("pid {} ({}): continued{}", pid, comm,
                       applied.empty() ? " unpatched" : fmt::format(" with set(s) {}", ids_text(applied))));
  }

  // The current sets of `b` (re-read: a set removed a moment ago is not applied).
  std::vector<PersistedSet> sets_of(const Binary& b) {
    std::vector<PersistedSet> out;
    auto sets = persist__list();
    if (!sets) {
      log_(fmt::format("cannot read the persisted sets: {}", sets.error().line()));
      return out;
    }
    for (auto& s : *sets)
      if (s.binary == b.path && s.build_id == b.build_id) out.push_back(s);
    return out;
  }

  // Apply every set of `b` that `pid` does not carry yet; the ids applied or already there.
  std::vector<uint32_t> apply_sets(pid_t pid, const Binary& b) {
    std::vector<uint32_t> done;
    std::string comm = process__comm(pid);
    for (auto& s : sets_of(b)) {
      if (agent__carries(pid, s.sha256)) {
        log_(fmt::format("pid {} ({}): set {} is already applied; not patched again", pid, comm, s.id));
        done.push_back(s.id);
        continue;
      }
      if (auto id = apply_set(pid, comm, s)) {
        done.push_back(s.id);
        log_(fmt::format("pid {} ({}): applied set {} as patch {}", pid, comm, s.id, *id));
      }
    }
    return done;
  }

  std::optional<uint32_t> apply_set(pid_t pid, const std::string& comm, const PersistedSet& s) {
    AuditEntry audit;
    audit.verb = "agent-patch";
    audit.pid = pid;
    audit.target = audit__target(pid);
    audit.library = s.fix_path();
    auto refused = [&](const Error& e) -> std::optional<uint32_t> {
      audit.result = e.line();
      (void)audit__record(audit);
      log_(fmt::format("pid {} ({}): set {} refused: {}; it runs unpatched", pid, comm, s.id, e.line()));
      return std::nullopt;
    };
    if (auto ok = persist__verify(s); !ok) return refused(ok.error());
    if (auto rec = recover__run(pid, [](const ProgressEvent&) {}, true); rec)
      for (auto& line : *rec) log_(fmt::format("pid {} ({}): {}", pid, comm, line));
    PatchOptions o;
    o.pid = pid;
    o.library = s.fix_path();
    o.patterns = s.patterns;
    o.object = s.object;
    o.consistency = s.consistency == "entry" ? Consistency::entry : Consistency::strict;
    o.timeout = milliseconds(s.timeout_ms ? s.timeout_ms : 10000);
    o.abi_check = s.abi_check;
    o.count = s.count;
    o.allow_uncovered = s.allow_uncovered;
    o.observe = milliseconds(0);
    o.expected_sha256 = s.sha256;
    auto prepared = patch__prepare(o);
    if (!prepared) return refused(prepared.error());
    audit.sha256 = sha256__hex(prepared->fix.bytes);
    for (auto& sw : prepared->switches) audit.functions.push_back(sw.entry.target.name);
    auto out = patch__apply(*prepared, [](const ProgressEvent&) {});
    if (!out) return refused(out.error());
    audit.ids = {out->id};
    audit.loaded_sha256 = out->loaded_sha256;
    audit.pause_us = out->pause.count() / 1000.0;
    (void)audit__record(audit);  // what it could not record (no syslog) is not the agent's action
    return out->id;
  }

  // Processes of armed binaries that exist already: stopped at the entry point by an agent
  // that died (parked and patched like new ones), or running without a set (patched live).
  void sweep(const char* why) {
    size_t seen = 0, patched = 0, had = 0;
    for (auto& b : binaries_) {
      if (!b.link) continue;
      for (pid_t pid : processes_of(b.dev, b.ino)) {
        ++seen;
        if (uint64_t entry = stopped_at_entry(pid, b)) {
          park_and_patch(pid, entry, b, "stopped at its entry point");
          ++patched;
          continue;
        }
        char st = state_of(pid);
        if (st == 'Z' || st == 'X' || st == '?') continue;
        bool missing = false;
        for (auto& s : sets_of(b)) missing = missing || !agent__carries(pid, s.sha256);
        if (!missing) {
          ++had;
          continue;
        }
        log_(fmt::format("pid {} ({}): {}: runs {} without its set(s): patching it live", pid, process__comm(pid), why,
                         b.path));
        apply_sets(pid, b);
        ++patched;
      }
    }
    log_(fmt::format("{}: {} running process(es) of armed binaries: {} patched or tried, {} already had their sets", why,
                     seen, patched, had));
  }

  AgentOptions opts_;
  AgentLog log_;
  std::unique_ptr<EntryTrigger> trigger_;
  std::vector<Binary> binaries_;
  uint64_t generation_ = 0;
  uint64_t dropped_seen_ = 0;
};

// The watchdog: a child that outlives a killed agent and continues what it left stopped.
// Forked before any BPF object exists, so it holds no probe: once the agent is gone no new
// process is stopped, and the watchdog sweeps for a while for the ones that were.
struct Watchdog {
  pid_t pid = -1;
  int pipe = -1;
};

Result<Watchdog> start_watchdog(const AgentLog& log) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return fail(fmt::format("cannot create the watchdog's pipe: {}", errno_text(errno)));
  std::fflush(stdout);
  std::fflush(stderr);
  pid_t child = ::fork();
  if (child < 0) return fail(fmt::format("cannot start the watchdog: {}", errno_text(errno)));
  if (child == 0) {
    ::close(fds[1]);
    ::prctl(PR_SET_NAME, "hotfix-watchdog");
    for (int sig : {SIGTERM, SIGINT, SIGHUP, SIGPIPE}) ::signal(sig, SIG_IGN);  // it ends after the agent
    char c = 0;
    ssize_t n;
    while ((n = ::read(fds[0], &c, 1)) < 0 && errno == EINTR) {
    }
    // 'q': the agent stopped cleanly, its probes are gone: one look is enough. EOF: it died,
    // and probes being torn down may still stop a process for a moment: ~2 s of looks.
    int rounds = n == 1 && c == 'q' ? 1 : 20;
    auto say = [&](const std::string& line) { log("watchdog: " + line); };
    for (int round = 0; round < rounds; ++round) {
      agent__release_stopped(say);
      std::this_thread::sleep_for(milliseconds(100));
    }
    std::fflush(stdout);
    ::_exit(0);
  }
  ::close(fds[0]);
  return Watchdog{child, fds[1]};
}

}  // namespace

bool agent__carries(pid_t pid, const std::string& sha256) {
  auto r = registry__read(pid);
  if (!r) return false;
  for (auto& p : r->patches)
    if (p.state == PatchState::active && deliver__sha256_of(p.loaded_copy) == sha256) return true;
  return false;
}

int agent__release_stopped(const AgentLog& log) {
  auto sets = persist__list();
  if (!sets) return 0;
  int n = 0;
  for (auto& b : binaries_of(*sets, nullptr))
    for (pid_t pid : processes_of(b.dev, b.ino))
      if (stopped_at_entry(pid, b) && ::kill(pid, SIGCONT) == 0) {
        ++n;
        log(fmt::format("pid {} ({}) was stopped at its entry point by an agent that is gone: continued, unpatched",
                        pid, process__comm(pid)));
      }
  return n;
}

Result<PersistedSet> persist__plan(const PreparedPatch& p) {
  if (!p.untrusted.empty())
    return fail("--persist refuses an untrusted fix library (--allow-untrusted-lib)",
                "make fix.so root's (or yours) and writable by nobody else, then persist it");
  PersistedSet s;
  s.binary = p.executable;
  for (auto& sw : p.switches)
    if (sw.entry.target.object != p.executable)
      return fail(fmt::format("--persist: {} is in {}, not in the executable {}", sw.entry.target.name,
                              sw.entry.target.object, p.executable),
                  "persisted sets are for the executable's own functions; patch the library's users live instead");
  for (auto& o : p.table.objects())
    if (o.path == p.executable) s.build_id = o.build_id;
  if (s.build_id.empty()) s.build_id = build_id_of_file(fmt::format("/proc/{}/exe", p.options.pid));
  s.library = std::filesystem::absolute(p.options.library).string();
  s.object = p.options.object;
  s.patterns = p.options.patterns;
  s.consistency = consistency__name(p.options.consistency);
  s.timeout_ms = static_cast<uint64_t>(p.options.timeout.count());
  s.abi_check = p.options.abi_check;
  s.count = p.options.count;
  s.allow_uncovered = p.options.allow_uncovered;
  return s;
}

Result<void> agent__run(const AgentOptions& opts, const AgentLog& log, const std::atomic<bool>& stop) {
  Watchdog watchdog;
  if (opts.watchdog) watchdog = HOTFIX_TRY(start_watchdog(log));
  Result<void> started;
  {
    Agent agent(opts, log);
    started = agent.start();
    if (started) agent.loop(stop);
  }  // the probes are gone from here on
  if (watchdog.pid > 0) {
    (void)!::write(watchdog.pipe, "q", 1);  // one last look, then it exits
    ::close(watchdog.pipe);
    ::waitpid(watchdog.pid, nullptr, 0);
  }
  return started;
}

}  // namespace hotfix
