// Fork adoption (see adopt.hpp): the child's own registry and counters, in the child only.
#include "patch/adopt.hpp"

#include <bpf/bpf.h>
#include <fcntl.h>
#include <linux/kcmp.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <thread>

#include "common/crashpoint.hpp"
#include "common/unique_fd.hpp"
#include "patch/counting.hpp"
#include "patch/engine.hpp"
#include "patch/island_names.hpp"
#include "patch/journal.hpp"
#include "patch/recover.hpp"
#include "patch/switch.hpp"
#include "process/fdpass.hpp"
#include "process/maps.hpp"
#include "process/memory.hpp"
#include "process/ptrace.hpp"
#include "process/remote.hpp"
#include "process/targets.hpp"

namespace hotfix {

using namespace std::chrono;

namespace {

JournalRecord jr(pid_t from, const char* step) { return journal__record("adopt", static_cast<uint32_t>(from), step); }

// One address space (a clone with CLONE_VM, vfork): the record is right for both as it is.
bool shares_memory(pid_t pid, pid_t other) { return ::syscall(SYS_kcmp, pid, other, KCMP_VM, 0, 0) == 0; }

struct RegistryMapping {
  uint64_t start = 0, length = 0;
  dev_t dev = 0;
  ino_t ino = 0;  // the memfd's inode: two processes mapping the same one share the record
};

std::optional<RegistryMapping> registry_mapping(pid_t pid) {
  auto maps = process__read_maps(pid);
  if (!maps) return std::nullopt;
  for (auto& m : *maps) {
    if (m.path.rfind(std::string("/memfd:") + kRegistryName, 0) != 0) continue;
    struct stat st;
    if (::stat(fmt::format("/proc/{}/map_files/{:x}-{:x}", pid, m.start, m.end).c_str(), &st) != 0) return std::nullopt;
    return RegistryMapping{m.start, m.end - m.start, st.st_dev, st.st_ino};
  }
  return std::nullopt;
}

// fds of `pid` open on a hotfix-registry memfd. Nothing needs one once it is mapped (patch and
// watch close theirs at once), so one that is open is what a killed adoption left.
std::vector<int> leftover_registry_fds(pid_t pid) {
  std::vector<int> out;
  std::error_code ec;
  for (auto& e : std::filesystem::directory_iterator(fmt::format("/proc/{}/fd", pid), ec)) {
    auto target = std::filesystem::read_symlink(e.path(), ec);
    if (!ec && target.string().rfind(std::string("/memfd:") + kRegistryName, 0) == 0)
      out.push_back(std::atoi(e.path().filename().c_str()));
  }
  return out;
}

Result<void> close_leftovers(Tracee& t, pid_t tid) {
  for (int fd : leftover_registry_fds(t.pid())) HOTFIX_CHECK(remote__close(t, tid, fd));
  return {};
}

// The last attempt of every op `op` in the journal that has no "done" (ids).
std::vector<uint32_t> unfinished(const std::vector<JournalRecord>& records, const std::string& op) {
  std::map<uint32_t, bool> open;
  for (auto& r : records)
    if (r.op == op) {
      if (r.step == "begin") open[r.id] = true;
      if (r.step == "done") open[r.id] = false;
    }
  std::vector<uint32_t> out;
  for (auto& [id, o] : open)
    if (o) out.push_back(id);
  return out;
}

// The child's own counters for patch `p`, at the address its islands and trampolines add to.
Result<void> own_counters(Tracee& t, pid_t tid, Journal& j, pid_t from, const PatchRecord& p) {
  (void)patchcount__remove(t.pid(), p.id);  // a killed adoption's pins: their mapping is replaced below
  auto n = static_cast<uint32_t>(p.functions.size());
  auto tc = HOTFIX_TRY(counting__map_at(t, tid, p.id, n, p.counters));
  if (tc.address != p.counters || tc.length != p.counters_len)
    return fail(fmt::format("the child's counters of patch {} landed at {:#x} (+{:#x}), not over the inherited {:#x} "
                            "(+{:#x})", p.id, tc.address, tc.length, p.counters, p.counters_len));
  crashpoint("adopt: counters mapped");
  return j.append(jr(from, "counters").set("patch", p.id).set("address", p.counters).set("pins", tc.counters.dir));
}

// An inherited watch counts the parent's calls: the child's trampolines get a map of their own
// (unpinned: the mapping keeps it), and a journal op "watch" of the child's, so that recovery
// takes them down in the child once that watch has ended -- exactly as for a killed watch.
Result<void> own_watch(Tracee& t, pid_t tid, Journal& j, pid_t from, const WatchRecord& w,
                       const std::vector<uint32_t>& journaled) {
  auto owner = static_cast<uint32_t>(w.owner);
  if (std::find(journaled.begin(), journaled.end(), owner) == journaled.end()) {
    auto jw = [&](const char* step) { return journal__record("watch", owner, step); };
    HOTFIX_CHECK(j.append(jw("begin").set("owner_start", w.owner_start).set("inherited_from", static_cast<uint64_t>(from))));
    if (w.counters) HOTFIX_CHECK(j.append(jw("counters-mapped").set("address", w.counters).set("length", w.counters_len)));
    for (auto& [a, len] : w.pages) HOTFIX_CHECK(j.append(jw("stub").set("address", a).set("length", len)));
    for (auto& s : w.stubs)
      HOTFIX_CHECK(j.append(jw("switching").set("address", s.address).set("expected", hex_bytes(s.original))
                                .set("bytes", hex_bytes(s.written))));
    HOTFIX_CHECK(j.append(jw("committed")));
  }
  if (!w.counters || !recover__still_ours(t.pid(), w.counters, w.counters_len, true)) return {};
  LIBBPF_OPTS(bpf_map_create_opts, opts, .map_flags = BPF_F_MMAPABLE);
  UniqueFd map(bpf_map_create(BPF_MAP_TYPE_ARRAY, "hotfix_adopted", 4, 8, static_cast<uint32_t>(w.counters_len / 8), &opts));
  if (!map) return fail(fmt::format("cannot create the child's watch counters: {}", errno_text(errno)));
  int fd = HOTFIX_TRY(fdpass__send_to_target(t, tid, map.get()));
  auto at = remote__mmap(t, tid, w.counters, w.counters_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
  (void)remote__close(t, tid, fd);
  HOTFIX_CHECK(at);
  crashpoint("adopt: watch counters mapped");
  return j.append(jr(from, "watch-counters").set("owner", owner).set("address", w.counters));
}

// The commit: a new memfd holding the record as the child's, mapped over the inherited one.
Result<void> own_registry(Tracee& t, pid_t tid, Journal& j, pid_t from, const RegistryMapping& at, const Registry& r) {
  Registry mine = r;
  registry__compact(mine);
  mine.owner = t.pid();
  auto bytes = registry__encode(mine);
  if (bytes.size() > at.length) return fail("the inherited hotfix registry does not fit in a registry mapping");
  int fd = HOTFIX_TRY(remote__memfd_create(t, tid, kRegistryName, at.length));
  HOTFIX_CHECK(j.append(jr(from, "registry-memfd").set("fd", static_cast<uint64_t>(fd))));
  crashpoint("adopt: registry memfd created");
  {
    UniqueFd host(::open(fmt::format("/proc/{}/fd/{}", t.pid(), fd).c_str(), O_RDWR | O_CLOEXEC));
    if (!host || ::pwrite(host.get(), bytes.data(), bytes.size(), 0) != static_cast<ssize_t>(bytes.size()))
      return fail(fmt::format("cannot write the child's registry through /proc/{}/fd/{}: {}", t.pid(), fd, errno_text(errno)));
  }
  crashpoint("adopt: registry written");
  uint64_t mapped = HOTFIX_TRY(remote__mmap(t, tid, at.start, at.length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0));
  if (mapped != at.start) return fail(fmt::format("the child's registry was mapped at {:#x}, not {:#x}", mapped, at.start));
  HOTFIX_CHECK(j.append(jr(from, "registry-swapped")));
  crashpoint("adopt: registry swapped");
  HOTFIX_CHECK(remote__close(t, tid, fd));
  return j.append(jr(from, "done"));
}

Result<std::string> adopt(Tracee& t, Journal& j, const RegistryMapping& at, const Registry& r) {
  pid_t from = r.owner;
  auto records = j.read();
  auto watches = unfinished(records, "watch");
  HOTFIX_CHECK(j.append(jr(from, "begin").set("registry", at.start)));
  crashpoint("adopt: begun");
  pid_t tid = t.threads().front().tid;
  HOTFIX_CHECK(t.stop_thread(tid));
  auto done = [&]() -> Result<size_t> {
    HOTFIX_CHECK(close_leftovers(t, tid));
    size_t counted = 0;
    for (auto& p : r.patches)
      if (p.counters && !p.released && recover__still_ours(t.pid(), p.counters, p.counters_len, true)) {
        HOTFIX_CHECK(own_counters(t, tid, j, from, p));
        ++counted;
      }
    for (auto& w : r.watches) HOTFIX_CHECK(own_watch(t, tid, j, from, w, watches));
    HOTFIX_CHECK(own_registry(t, tid, j, from, at, r));
    return counted;
  }();
  HOTFIX_CHECK(t.resume_thread(tid));
  size_t counted = HOTFIX_TRY(std::move(done));
  size_t active = std::count_if(r.patches.begin(), r.patches.end(), [](auto& p) { return p.state == PatchState::active; });
  return fmt::format("pid {}: adopted the hotfix record inherited from pid {} (a fork): {} active patch(es), {} with "
                     "counters of its own{}", t.pid(), from, active, counted,
                     r.watches.empty() ? "" : fmt::format(", {} inherited watch(es) leave with their watch", r.watches.size()));
}

// A killed adoption that had committed: close what it left open and finish its record.
Result<std::vector<std::string>> finish_interrupted(pid_t pid, bool wait) {
  auto opened = Journal::open_existing(pid, wait);
  if (!opened || !*opened) return std::vector<std::string>{};
  Journal& j = **opened;
  auto ids = unfinished(j.read(), "adopt");
  if (ids.empty()) return std::vector<std::string>{};
  auto t = HOTFIX_TRY(Tracee::seize(pid));
  pid_t tid = t.threads().front().tid;
  HOTFIX_CHECK(t.stop_thread(tid));
  auto closed = close_leftovers(t, tid);
  HOTFIX_CHECK(t.resume_thread(tid));
  HOTFIX_CHECK(std::move(closed));
  for (auto id : ids) HOTFIX_CHECK(j.append(journal__record("adopt", id, "done")));
  return std::vector<std::string>{fmt::format("pid {}: finished an interrupted adoption of its inherited hotfix record", pid)};
}

}  // namespace

std::string adopt__mismatch(const Registry& r,
                            const std::function<std::optional<std::vector<uint8_t>>(uint64_t, size_t)>& read) {
  for (auto& p : r.patches)
    for (auto& f : p.functions) {
      const PatchRecord* top = r.top_at(f.old_address);
      auto live = read(f.old_address, f.written.size());
      std::string name = symbol__demangle(f.mangled);
      if (!live) return fmt::format("the entry of {} ({:#x}) cannot be read", name, f.old_address);
      if (top == &p && *live != f.written)
        return fmt::format("patch {} is active in the record but its jump is not at {} ({} instead of {})", p.id, name,
                           hex_bytes(*live), hex_bytes(f.written));
      if (!top && p.state == PatchState::reverted && *live == f.written)
        return fmt::format("patch {} is reverted in the record but its jump is still at {}", p.id, name);
    }
  return "";
}

Result<std::vector<std::string>> adopt__run(pid_t pid, bool wait) {
  auto at = registry_mapping(pid);
  if (!at) return std::vector<std::string>{};
  auto seen = HOTFIX_TRY(registry__read(pid));
  if (seen.owner == 0 || seen.owner == pid || (process__alive(seen.owner) && shares_memory(pid, seen.owner)))
    return finish_interrupted(pid, wait);
  HOTFIX_CHECK(registry__require_authentic(seen, pid));  // its addresses are what we map over
  auto opened = Journal::open(pid, wait);
  if (!opened && !wait) return std::vector<std::string>{};  // another hotfix-ctl works on it: its turn
  auto journal = HOTFIX_TRY(std::move(opened));
  auto tracee = HOTFIX_TRY(Tracee::seize(pid));
  // Again, now that nobody else can: another hotfix-ctl may have adopted it meanwhile.
  at = registry_mapping(pid);
  auto r = HOTFIX_TRY(registry__read(pid));
  if (!at || r.owner == pid) return std::vector<std::string>{};
  HOTFIX_CHECK(registry__require_authentic(r, pid));
  std::string why = adopt__mismatch(r, [&](uint64_t a, size_t n) -> std::optional<std::vector<uint8_t>> {
    auto b = tracee.memory().read(a, n);
    return b ? std::optional(*b) : std::nullopt;
  });
  if (!why.empty())
    return fail(fmt::format("pid {} maps the hotfix record of pid {} (it was forked from it), but the record no longer "
                            "describes it: {}; nothing was done",
                            pid, r.owner, why),
                fmt::format("pid {}'s patches changed after the fork while this child was not adopted; restart pid {} "
                            "to be rid of what it inherited", r.owner, pid));
  auto line = HOTFIX_TRY(or_target_gone(tracee, adopt(tracee, journal, *at, r)));
  patch__sync_perfmap(pid, [](const ProgressEvent&) {});  // perf names the child's islands too
  return std::vector<std::string>{line};
}

Result<std::vector<std::string>> adopt__sharers(pid_t pid, milliseconds wait) {
  auto mine = registry_mapping(pid);
  if (!mine) return std::vector<std::string>{};
  std::vector<std::string> lines;
  auto deadline = steady_clock::now() + wait;
  for (pid_t c : targets__descendants(pid)) {
    for (;;) {
      auto theirs = registry_mapping(c);
      if (!theirs || theirs->dev != mine->dev || theirs->ino != mine->ino || shares_memory(pid, c)) break;
      auto got = adopt__run(c, false);
      if (!got) return fail(fmt::format("pid {}, a fork of pid {}, still shares its hotfix record and cannot be adopted: {}",
                                        c, pid, got.error().what), got.error().hint);
      lines.insert(lines.end(), got->begin(), got->end());
      if (!got->empty()) continue;
      if (steady_clock::now() >= deadline)
        return fail(fmt::format("pid {}, a fork of pid {}, still shares its hotfix record and another hotfix-ctl holds "
                                "it; writing the record now would change the child's too; nothing was done", c, pid),
                    "retry when the other hotfix-ctl is done");
      std::this_thread::sleep_for(milliseconds(50));
    }
  }
  return lines;
}

Result<std::vector<std::string>> adopt__before_write(pid_t pid) {
  auto lines = HOTFIX_TRY(adopt__run(pid, true));
  auto more = HOTFIX_TRY(adopt__sharers(pid));
  lines.insert(lines.end(), more.begin(), more.end());
  return lines;
}

}  // namespace hotfix
