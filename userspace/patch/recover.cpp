// Recovery of interrupted operations (see recover.hpp for the rule).
#include "patch/recover.hpp"
#include "patch/preserve.hpp"
#include "patch/adopt.hpp"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <thread>

#include "arch/arch.hpp"
#include "common/crashpoint.hpp"
#include "observe/patchcount.hpp"
#include "observe/perfmap.hpp"
#include "patch/island_names.hpp"
#include "patch/registry.hpp"
#include "patch/switch.hpp"
#include "patch/watchstubs.hpp"
#include "process/maps.hpp"
#include "process/memory.hpp"
#include "process/ptrace.hpp"
#include "process/remote.hpp"

namespace hotfix {

namespace fs = std::filesystem;
using namespace std::chrono;

namespace {

const uint64_t kPage = static_cast<uint64_t>(::getpagesize());

bool is_island_like(const Mapping& m) { return m.path.empty() && m.perms == "r-xp"; }
bool is_bpf_map(const Mapping& m) { return m.path.find("bpf-map") != std::string::npos; }

std::string starts_of(pid_t pid, bool (*pick)(const Mapping&)) {
  std::string out;
  if (auto maps = process__read_maps(pid))
    for (auto& m : *maps)
      if (pick(m)) out += fmt::format("{}{:#x}", out.empty() ? "" : ",", m.start);
  return out;
}

std::set<uint64_t> parse_starts(const std::string& list) {
  auto starts = journal__parse_addresses(list);
  return {starts.begin(), starts.end()};
}

// One attempt of one operation on one patch id: its records since its last "begin".
struct Op {
  std::string op;
  uint32_t id = 0;
  std::vector<JournalRecord> records;

  bool has(const char* step) const {
    return std::any_of(records.begin(), records.end(), [&](auto& r) { return r.step == step; });
  }
  const JournalRecord* last(const char* step) const {
    for (auto it = records.rbegin(); it != records.rend(); ++it)
      if (it->step == step) return &*it;
    return nullptr;
  }
  std::vector<const JournalRecord*> all(const char* step) const {
    std::vector<const JournalRecord*> out;
    for (auto& r : records)
      if (r.step == step) out.push_back(&r);
    return out;
  }
  Consistency consistency() const {
    auto* b = last("begin");
    return b && b->get("consistency") == "entry" ? Consistency::entry : Consistency::strict;
  }
};

std::vector<Op> group(const std::vector<JournalRecord>& records) {
  std::vector<Op> ops;
  for (auto& r : records) {
    auto it = std::find_if(ops.begin(), ops.end(), [&](auto& o) { return o.op == r.op && o.id == r.id; });
    bool fresh = r.step == "begin" || (r.op == "release" && r.step == "releasing");
    if (it == ops.end()) ops.push_back({r.op, r.id, {r}});
    else {
      if (fresh) it->records.clear();
      it->records.push_back(r);
    }
  }
  return ops;
}

bool finished(const Op& o) {
  if (o.op == "patch") return o.has("done") || o.has("rolled-back");
  if (o.op == "revert") return o.has("done") || o.has("aborted");
  if (o.op == "release") return o.has("released");
  if (o.op == "watch") return o.has("done");  // a live watch's op is unfinished too: see recover__run
  if (o.op == "adopt") return true;           // adopt__run, before everything else, finishes those
  return true;  // an operation this build does not know: not ours to judge
}

// A site of a switch to undo (patch) or finish (revert): from -> to where the live bytes are `from`.
struct Site {
  uint64_t address = 0;
  std::vector<uint8_t> from, to;
};

std::vector<Site> sites_of(const Op& o, const char* step, bool undo) {
  std::vector<Site> out;
  for (auto* r : o.all(step)) {
    auto expected = journal__parse_bytes(r->get("expected")), bytes = journal__parse_bytes(r->get("bytes"));
    if (!expected || !bytes || expected->size() != bytes->size() || !r->number("address")) continue;
    if (undo) out.push_back({r->number("address"), *bytes, *expected});
    else out.push_back({r->number("address"), *expected, *bytes});
  }
  return out;
}

// The code of an interrupted patch a thread may run: its library's executable mappings and
// its islands (recorded, or found by recovery).
std::vector<AddressRange> code_ranges(pid_t pid, const std::string& copy, const std::vector<uint64_t>& islands) {
  std::vector<AddressRange> out;
  if (auto maps = process__read_maps(pid))
    for (auto& m : *maps)
      if (!copy.empty() && m.path.rfind(copy, 0) == 0 && m.executable()) out.push_back({m.start, m.end, copy});
  for (auto a : islands) out.push_back({a, a + kPage, "an island"});
  return out;
}

// Put the sites back in one stop (the switch's checks for `mode`), and rewrite the registry
// with `update` in that same stop. Returns how many sites were written.
Result<size_t> switch_back(Tracee& t, Journal& j, const Op& o, const std::vector<Site>& sites, Consistency mode,
                           std::vector<AddressRange> bodies, const std::function<bool(Registry&)>& update,
                           const char* done_step, const ProgressFn& progress) {
  std::vector<TextWrite> writes;
  std::vector<AddressRange> overwritten;
  for (auto& s : sites) {
    auto live = t.memory().read(s.address, s.from.size());
    if (!live || *live != s.from) continue;  // already put back (or never written)
    std::string name = fmt::format("the function at {:#x}", s.address);
    writes.push_back({s.address, s.from, s.to, name});
    overwritten.push_back(overwritten_range(s.address, s.from.size(), name));
  }
  auto at = registry__locate(t.pid());
  Registry registry;
  bool changed = false;
  if (at)
    if (auto r = registry__read(t.pid())) registry = *r, changed = update(registry);
  if (writes.empty() && !changed) return 0;
  auto guard = HOTFIX_TRY(make_guard(t.pid(), mode, overwritten, std::move(bodies)));
  auto record = [&]() -> Result<void> {
    crashpoint("recover: in the stop, text written");
    if (changed) HOTFIX_CHECK(registry__write(t.memory(), *at, registry));
    return j.append(journal__record(o.op, o.id, done_step).set("sites", writes.size()));
  };
  HOTFIX_CHECK(j.append(journal__record(o.op, o.id, "recover-switching").set("sites", writes.size())));
  HOTFIX_TRY(switch_when_quiet(t, guard, writes, record, seconds(10), progress));
  return writes.size();
}

// Strict check, retried for a while: may the memory of `code` be given back?
Result<std::string> reachable(Tracee& t, const std::vector<AddressRange>& code) {
  if (code.empty()) return std::string();
  auto checker = HOTFIX_TRY(ConsistencyChecker::create(t.pid(), code));
  std::string why;
  for (auto backoff = milliseconds(2), waited = milliseconds(0); waited < seconds(3); waited += backoff, backoff = std::min(backoff * 2, milliseconds(100))) {
    HOTFIX_CHECK(t.stop_all());
    auto blockers = checker.check(stopped_threads(t));
    HOTFIX_CHECK(t.resume_all());
    if (!blockers) return std::unexpected(blockers.error());
    if (blockers->empty()) return std::string();
    why = blocker__describe(blockers->front());
    std::this_thread::sleep_for(backoff);
  }
  return why;
}

// dlclose the copy while it is mapped: with the journaled handle, else with the handle a
// second dlopen of the same (already loaded) path returns -- no constructor runs again.
Result<bool> unload(Tracee& t, const Op& o, const std::string& copy) {
  if (copy.empty() || !recover__is_mapped(t.pid(), copy)) return false;
  uint64_t handle = o.last("loaded") ? o.last("loaded")->number("handle") : 0;
  if (!handle) {  // killed between dlopen and its record: the loader knows it by its dlopen name
    InjectOptions noload;
    noload.already_loaded = true;
    std::string name = o.last("loading") ? o.last("loading")->get("dlopen") : "";
    handle = HOTFIX_TRY(remote__inject_library(t, name.empty() ? copy : name, noload)).handle;
  }
  for (int i = 0; i < 4 && recover__is_mapped(t.pid(), copy); ++i) {
    crashpoint("recover: before dlclose");
    HOTFIX_CHECK(remote__dlclose(t, handle));
  }
  if (recover__is_mapped(t.pid(), copy))
    return fail(fmt::format("{} stays mapped after dlclose", copy), "the library may be marked NODELETE; it cannot be unloaded");
  return true;
}

// The mappings an interrupted patch made: recorded ones still in place, plus at most one
// unrecorded page per intent whose completion is missing (a page that appeared since).
struct Leftovers {
  std::vector<std::pair<uint64_t, uint64_t>> islands, counters, registry;
};

std::set<uint64_t> committed_pages(pid_t pid) {
  std::set<uint64_t> out;
  if (auto r = registry__read(pid))
    for (auto& p : r->patches) {
      if (p.state == PatchState::reverted && p.released) continue;  // its pages are gone (and reusable)
      if (p.counters) out.insert(p.counters);
      for (auto& f : p.functions)
        for (uint64_t a : {f.island, f.trampoline})
          if (a) out.insert(a & ~(kPage - 1));
    }
  return out;
}

Leftovers find_leftovers(pid_t pid, const Op& o) {
  Leftovers l;
  auto maps = process__read_maps(pid);
  if (!maps) return l;
  auto taken = committed_pages(pid);
  for (auto* r : o.all("island"))
    if (recover__still_ours(pid, r->number("address"), r->number("length"), false))
      l.islands.push_back({r->number("address"), r->number("length")}), taken.insert(r->number("address"));
  auto intents = o.all("island-mapping");
  if (intents.size() > o.all("island").size()) {
    auto* last = intents.back();
    auto known = parse_starts(last->get("known"));
    uint64_t near = last->number("near");
    for (auto& m : *maps) {
      int64_t d = static_cast<int64_t>(m.start - near);
      if (is_island_like(m) && m.end - m.start == kPage && !known.count(m.start) && !taken.count(m.start) &&
          d > -arch::near_jump_reach() && d < arch::near_jump_reach()) {
        l.islands.push_back({m.start, kPage});
        break;
      }
    }
  }
  if (auto* c = o.last("counters-mapped")) {
    if (recover__still_ours(pid, c->number("address"), c->number("length"), true))
      l.counters.push_back({c->number("address"), c->number("length")});
  } else if (auto* intent = o.last("counters")) {
    auto known = parse_starts(intent->get("known"));
    for (auto& m : *maps)
      if (is_bpf_map(m) && !known.count(m.start) && !taken.count(m.start)) {
        l.counters.push_back({m.start, m.end - m.start});
        break;
      }
  }
  if (o.has("registry-creating"))
    if (auto at = registry__locate(pid)) {
      auto r = registry__read(pid);
      if (!r || r->patches.empty()) l.registry.push_back({*at, kRegistrySize});  // made by this patch, holds nothing
    }
  return l;
}

std::vector<int> fds_of_map(pid_t pid, uint64_t map_id) {
  std::vector<int> out;
  std::error_code ec;
  for (auto& e : fs::directory_iterator(fmt::format("/proc/{}/fdinfo", pid), ec)) {
    std::ifstream in(e.path());
    for (std::string line; std::getline(in, line);)
      if (line.rfind("map_id:", 0) == 0) {
        if (std::strtoull(line.c_str() + 7, nullptr, 10) == map_id) out.push_back(std::atoi(e.path().filename().c_str()));
        break;
      }
  }
  return out;
}

Result<std::string> roll_back(Tracee& t, Journal& j, const Op& o, const ProgressFn& progress) {
  const pid_t pid = t.pid();
  auto jr = [&](const char* step) { return journal__record("patch", o.id, step); };
  std::string copy = o.last("begin") ? o.last("begin")->get("copy") : "";
  std::vector<std::string> did;
  HOTFIX_CHECK(j.append(jr("rollback-begin")));
  crashpoint("recover: rollback begins");

  // 1. Text: every jump it wrote goes, and the registry forgets it, in one stop.
  auto leftovers = find_leftovers(pid, o);
  std::vector<uint64_t> islands;
  for (auto& [a, len] : leftovers.islands) islands.push_back(a);
  auto forget = [&](Registry& r) {
    auto n = r.patches.size();
    std::erase_if(r.patches, [&](auto& p) { return p.id == o.id; });
    return r.patches.size() != n;
  };
  size_t restored = HOTFIX_TRY(switch_back(t, j, o, sites_of(o, "switching", true), o.consistency(),
                                           code_ranges(pid, copy, islands), forget, "restored", progress));
  if (restored) did.push_back(fmt::format("{} jump(s) restored", restored));
  crashpoint("recover: text restored");

  // 2. Its memory, once no thread can be running it (only jumps make it reachable).
  if (restored || o.has("restored") || o.has("held")) {
    auto why = HOTFIX_TRY(reachable(t, code_ranges(pid, copy, islands)));
    if (!why.empty()) {
      HOTFIX_CHECK(j.append(jr("held").set("why", why)));
      return fmt::format("{}its memory is held: {} (a later hotfix-ctl releases it)",
                         did.empty() ? "" : fmt::format("{}; ", did.front()), why);
    }
  }
  HOTFIX_CHECK(j.append(jr("unloading").set("copy", copy)));
  if (HOTFIX_TRY(unload(t, o, copy))) did.push_back("library unloaded");
  crashpoint("recover: library unloaded");
  leftovers = find_leftovers(pid, o);  // again: the loader may have moved nothing, but be exact
  size_t pages = leftovers.islands.size() + leftovers.counters.size() + leftovers.registry.size();
  const JournalRecord* handoff = o.last("counters-handoff");
  auto fd_leftovers = handoff ? recover__handoff_leftovers(t, *handoff) : HandoffLeftovers{};
  if (pages || !fd_leftovers.empty()) {
    HOTFIX_CHECK(j.append(jr("unmapping").set("mappings", pages)));
    pid_t tid = t.threads().front().tid;
    HOTFIX_CHECK(t.stop_thread(tid));
    recover__release_handoff(t, tid, fd_leftovers);
    // A page holding unwind information this patch may have registered stays (patch/preserve.hpp).
    std::set<uint64_t> keep;
    for (uint64_t frame : preserve__journaled_frames(o.records, o.id)) keep.insert(frame & ~(kPage - 1));
    std::erase_if(leftovers.islands, [&](auto& m) { return keep.count(m.first) != 0; });
    if (!keep.empty()) did.push_back(fmt::format("{} island page(s) kept (their unwind information may be registered)", keep.size()));
    for (auto* list : {&leftovers.islands, &leftovers.counters, &leftovers.registry})
      for (auto& [a, len] : *list) (void)remote__munmap(t, tid, a, len);
    HOTFIX_CHECK(t.resume_thread(tid));
    crashpoint("recover: unmapped");
  }
  if (!fd_leftovers.fds.empty()) did.push_back(fmt::format("{} fd(s) of the counters' handoff closed", fd_leftovers.fds.size()));
  if (fd_leftovers.scratch) did.push_back("the handoff's scratch page unmapped");
  if (!leftovers.islands.empty()) did.push_back(fmt::format("{} island(s) unmapped", leftovers.islands.size()));
  if (!leftovers.counters.empty()) did.push_back("counters unmapped");
  if (!leftovers.registry.empty()) did.push_back("empty registry unmapped");
  if (o.has("counters") || fs::exists(patchcount__dir(pid, o.id))) {
    HOTFIX_CHECK(patchcount__remove(pid, o.id));
    did.push_back("pins removed");
  }
  std::error_code ec;
  if (copy.starts_with(kPatchDir)) {  // a copy on disk (builds before memfd delivery)
    if (fs::remove(copy, ec)) did.push_back("copy deleted");
    fs::remove(fs::path(copy).parent_path(), ec);  // only if empty
  }
  HOTFIX_CHECK(j.append(jr("rolled-back")));
  if (did.empty()) did.push_back("it had changed nothing");
  std::string text;
  for (auto& d : did) text += (text.empty() ? "" : ", ") + d;
  return text;
}

Result<std::string> finish_revert(Tracee& t, Journal& j, const Op& o, const ProgressFn& progress) {
  auto mark = [&](Registry& r) {
    PatchRecord* p = r.find(o.id);
    if (!p || p->state != PatchState::active) return false;
    for (auto& f : p->functions)
      if (auto* above = r.record_above(o.id, f.old_address)) above->original = f.original;
    p->state = PatchState::reverted;
    p->reverted_ns = realtime_ns();
    return true;
  };
  std::vector<AddressRange> code;
  if (auto r = registry__read(t.pid()))
    if (auto* p = r->find(o.id)) {
      std::vector<uint64_t> islands;
      for (auto& f : p->functions)
        for (uint64_t a : {f.island, f.trampoline})
          if (a) islands.push_back(a & ~(kPage - 1));
      code = code_ranges(t.pid(), p->loaded_copy, islands);
    }
  size_t restored = HOTFIX_TRY(switch_back(t, j, o, sites_of(o, "restoring", false), o.consistency(), code, mark,
                                           "committed", progress));
  crashpoint("recover: revert text restored");
  if (!o.has("committed") && !restored)  // the registry may have been marked already: say so in the journal
    HOTFIX_CHECK(j.append(journal__record("revert", o.id, "committed")));
  HOTFIX_CHECK(patchcount__remove(t.pid(), o.id));
  HOTFIX_CHECK(j.append(journal__record("revert", o.id, "done")));
  return restored ? fmt::format("completed ({} jump(s) restored, pins removed)", restored)
                  : std::string("completed (pins removed)");
}

}  // namespace

JournalRecord& recover__note_handoff(JournalRecord& r, const CountingLeftovers& left) {
  std::string sockets;
  for (int i = 0; i < 2; ++i)
    if (left.handoff.sockets[i] >= 0)
      sockets += fmt::format("{}{}:{}", sockets.empty() ? "" : ",", left.handoff.sockets[i], left.handoff.inodes[i]);
  return r.set("map_id", static_cast<uint64_t>(left.map_id)).set("scratch", left.handoff.scratch).set("sockets", sockets);
}

// Fds of the map (by map id: the target never opens our map by itself), the pair while each
// fd is still that inode, the pair the scratch page names, and the page while an anonymous
// read-write mapping is there.
HandoffLeftovers recover__handoff_leftovers(Tracee& t, const JournalRecord& snapshot) {
  const pid_t pid = t.pid();
  HandoffLeftovers l;
  if (uint64_t id = snapshot.number("map_id")) l.fds = fds_of_map(pid, id);
  auto add = [&](int fd) {
    if (std::find(l.fds.begin(), l.fds.end(), fd) == l.fds.end()) l.fds.push_back(fd);
  };
  std::string sockets = snapshot.get("sockets");
  for (size_t at = 0; at < sockets.size();) {
    size_t comma = sockets.find(',', at);
    std::string one = sockets.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
    int fd = -1;
    unsigned long long inode = 0;
    if (std::sscanf(one.c_str(), "%d:%llu", &fd, &inode) == 2 && inode && fdpass__socket_inode(pid, fd) == inode) add(fd);
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  if (uint64_t page = snapshot.number("scratch"))
    if (auto maps = process__read_maps(pid))
      for (auto& m : *maps)
        if (m.contains(page) && m.path.empty() && m.perms == "rw-p") l.scratch = page;
  if (l.scratch)
    for (int fd : fdpass__sockets_in_scratch(t, l.scratch)) add(fd);
  return l;
}

void recover__release_handoff(Tracee& t, pid_t tid, const HandoffLeftovers& l) {
  for (int fd : l.fds) (void)remote__close(t, tid, fd);
  if (l.scratch) (void)remote__munmap(t, tid, l.scratch, kPage);
}

std::string recover__anonymous_pages(pid_t pid) { return starts_of(pid, is_island_like); }
std::string recover__bpf_map_pages(pid_t pid) { return starts_of(pid, is_bpf_map); }

std::pair<uint64_t, uint64_t> recover__file_identity(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return {0, 0};
  return {static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino)};
}

uint32_t recover__next_id(const Journal& journal) {
  // Only a patch still unfinished (its memory held) keeps its id: one rolled back to the end,
  // or refused, left no copy and no pins behind, so its id is free again.
  uint32_t next = 0;
  for (auto& o : group(journal.read()))
    if (o.op == "patch" && !finished(o)) next = std::max(next, o.id + 1);
  return next;
}

bool recover__is_mapped(pid_t pid, const std::string& path) {
  auto maps = process__read_maps(pid);
  if (!maps) return false;
  return std::any_of(maps->begin(), maps->end(), [&](auto& m) { return m.path.rfind(path, 0) == 0; });
}

bool recover__still_ours(pid_t pid, uint64_t address, uint64_t length, bool bpf_map) {
  auto maps = process__read_maps(pid);
  if (!maps || !address || !length) return false;
  for (auto& m : *maps)
    if (m.start == address) return m.end - m.start == length && (bpf_map ? is_bpf_map(m) : is_island_like(m));
  return false;
}

void recover__forget_if_clean(Journal& journal, const Registry& registry) {
  if (!registry.watches.empty()) return;
  for (auto& p : registry.patches)
    if (p.state == PatchState::active || !p.released) return;
  for (auto& o : group(journal.read()))
    if (!finished(o)) return;
  journal.remove();
  std::error_code ec;
  fs::remove(fmt::format("{}{}", kPatchDir, journal.pid()), ec);  // only if empty
}

namespace {

// The registry already records patch `id` as released (or summarised it, which only happens
// to released patches): an interrupted release of it has nothing left to do.
bool released_in_registry(pid_t pid, uint32_t id) {
  auto registry = registry__read(pid);
  if (!registry) return false;
  auto* p = registry->find(id);
  return p ? p->released : id < registry->next_id;
}

}  // namespace

Result<std::vector<std::string>> recover__run(pid_t pid, const ProgressFn& progress, bool wait) {
  // A fork's inherited record first: everything below writes the registry, which must be the
  // process's own, not its parent's (patch/adopt.hpp).
  std::vector<std::string> lines = HOTFIX_TRY(adopt__run(pid, wait));
  size_t adopted = lines.size();
  bool release = false;
  {
    auto opened = Journal::open_existing(pid, wait);
    if (!opened) return wait ? Result<std::vector<std::string>>(std::unexpected(opened.error())) : lines;
    if (!*opened) return lines;
    Journal& j = **opened;
    std::optional<Tracee> tracee;
    for (auto& o : group(j.read())) {
      if (finished(o)) continue;
      if (o.op == "watch" && watchstubs__owner_alive(o.records)) continue;  // a running watch's trampolines
      if (!tracee) {
        // Recovery rewrites the registry (and so signs it): never one someone else wrote.
        if (auto registry = registry__read(pid)) HOTFIX_CHECK(registry__require_authentic(*registry, pid));
        tracee.emplace(HOTFIX_TRY(Tracee::seize(pid)));
      }
      auto say = [&](const std::string& what) {
        lines.push_back(fmt::format("recovered an interrupted {} {} of pid {}: {}", o.op, o.id, pid, what));
      };
      if (o.op == "watch") {
        auto what = watchstubs__recover(*tracee, j, o.id, o.records);
        if (!what) return fail(fmt::format("cannot remove the trampolines a killed watch left in pid {}: {}", pid,
                                           what.error().what), "retry `hotfix-ctl recover --pid PID`");
        lines.push_back(fmt::format("removed what an ended watch (pid {}) left in pid {}: {}", o.id, pid, *what));
      } else if (o.op == "patch" && o.has("committed")) {
        HOTFIX_CHECK(j.append(journal__record("patch", o.id, "done")));
        say("it had committed: kept (see `hotfix-ctl list`)");
      } else if (o.op == "patch") {
        auto what = roll_back(*tracee, j, o, progress);
        if (!what) return fail(fmt::format("cannot roll back the interrupted patch {} of pid {}: {}", o.id, pid,
                                           what.error().what), "retry `hotfix-ctl recover --pid PID`");
        say("rolled back (" + *what + ")");
      } else if (o.op == "revert") {
        auto what = finish_revert(*tracee, j, o, progress);
        if (!what) return fail(fmt::format("cannot complete the interrupted revert of patch {} of pid {}: {}", o.id, pid,
                                           what.error().what), "retry `hotfix-ctl recover --pid PID`");
        say(*what);
        release = true;
      } else if (released_in_registry(pid, o.id)) {  // killed after the registry said so: only the record is missing
        HOTFIX_CHECK(j.append(journal__record("release", o.id, "released")));
        say("its release had finished");
      } else {
        say("its memory is released now where no thread can run it");
        release = true;
      }
    }
    if (lines.size() > adopted && !release)
      if (auto registry = registry__read(pid)) recover__forget_if_clean(j, *registry);
  }
  if (release) {  // the release of reverted patches, as revert does it (with its own journal records)
    RevertOptions opts;
    opts.pid = pid;
    if (auto r = patch__revert(opts, progress); !r)
      lines.push_back(fmt::format("note: pid {}: the memory of reverted patches stays held: {}", pid, r.error().what));
  }
  // What a killed patch or revert left of the islands' perf names follows the registry now.
  if (!lines.empty()) patch__sync_perfmap(pid, [&](const ProgressEvent& e) { lines.push_back(e.text); });
  return lines;
}

namespace {

std::optional<pid_t> pid_prefix(const std::string& name) {
  size_t digits = name.find_first_not_of("0123456789");
  if (digits == 0 || name.empty()) return std::nullopt;
  try {
    return static_cast<pid_t>(std::stol(name.substr(0, digits)));
  } catch (...) {
    return std::nullopt;
  }
}

bool traced(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/status", pid));
  for (std::string line; std::getline(in, line);)
    if (line.rfind("TracerPid:", 0) == 0) return std::strtol(line.c_str() + 10, nullptr, 10) != 0;
  return true;  // unreadable: leave it alone
}

// Pins and copies of a live process that no committed patch of its registry accounts for.
// Not while something traces it: a hotfix-ctl at work (even one older than the journal)
// holds its target with ptrace, and its state is not committed yet.
void gc_live_orphans(pid_t pid, bool dry_run, GcReport& report) {
  if (traced(pid)) return;
  auto registry = registry__read(pid);
  if (!registry) return;
  if (auto ok = registry__require_authentic(*registry, pid); !ok) {
    report.errors.push_back(ok.error().what);
    return;
  }
  for (auto id : patchcount__ids(pid)) {
    auto* p = registry->find(id);
    if (p && p->state == PatchState::active) continue;
    std::string dir = patchcount__dir(pid, id);
    if (!dry_run)
      if (auto ok = patchcount__remove(pid, id); !ok) {
        report.errors.push_back(ok.error().line());
        continue;
      }
    report.removed.push_back(dir);
  }
  std::error_code ec;
  std::string dir = fmt::format("{}{}", kPatchDir, pid);
  for (auto& entry : fs::directory_iterator(dir, ec)) {
    std::string path = entry.path().string();
    bool kept = std::any_of(registry->patches.begin(), registry->patches.end(),
                            [&](auto& p) { return p.loaded_copy == path && (p.state == PatchState::active || !p.released); });
    if (kept) continue;
    if (recover__is_mapped(pid, path)) {
      report.errors.push_back(fmt::format("{} is loaded in pid {} but no patch records it (left by an older hotfix-ctl); "
                                          "restart the process to unload it", path, pid));
      continue;
    }
    std::error_code rm;
    if (!dry_run) fs::remove(path, rm);
    if (rm) report.errors.push_back(fmt::format("cannot remove {}: {}", path, rm.message()));
    else report.removed.push_back(path);
  }
  if (!dry_run) fs::remove(dir, ec);  // only if empty
  if (!dry_run) patch__sync_perfmap(pid, *registry, [&](const ProgressEvent& e) { report.errors.push_back(e.text); });
}

}  // namespace

void recover__gc(bool dry_run, GcReport& report) {
  std::set<pid_t> live;
  std::error_code ec;
  // Journals of processes that are gone (or whose pid now names another process).
  for (auto& entry : fs::directory_iterator(kStateDir, ec)) {
    auto name = entry.path().filename().string();
    auto pid = pid_prefix(name);
    if (!pid) continue;
    if (journal__dir(*pid) == entry.path().string()) {
      live.insert(*pid);
      continue;
    }
    std::error_code rm;
    if (!dry_run) fs::remove_all(entry.path(), rm);
    if (rm) report.errors.push_back(fmt::format("cannot remove {}: {}", entry.path().string(), rm.message()));
    else report.removed.push_back(entry.path().string());
  }
  for (auto* root : {kPinRoot, kPatchDir})
    for (auto& entry : fs::directory_iterator(root, ec))
      if (auto pid = pid_prefix(entry.path().filename().string());
          pid && entry.path().filename().string() == std::to_string(*pid) && process__alive(*pid))
        live.insert(*pid);
  // Our lines in the perf maps of processes that are gone (the file too, if it was ours alone).
  for (pid_t pid : perfmap__pids()) {
    if (process__alive(pid) || perfmap__read(pid).empty()) continue;
    bool had_ours = false;
    for (auto& e : perfmap__read(pid)) had_ours |= e.name.starts_with(kPerfMapOurs);
    if (!had_ours) continue;
    if (auto ok = dry_run ? Result<void>{} : perfmap__forget(pid); !ok) report.errors.push_back(ok.error().line());
    else report.removed.push_back(fmt::format("hotfix's lines in {}", perfmap__path(pid)));
  }
  for (pid_t pid : live) {
    auto busy = Journal::open_existing(pid, false);  // held by a hotfix-ctl at work: not ours to judge
    if (!busy) continue;
    busy->reset();
    if (!dry_run) {
      auto lines = recover__run(pid, [](const ProgressEvent&) {});
      if (!lines) report.errors.push_back(lines.error().line());
      else
        for (auto& l : *lines) report.removed.push_back(l);
    }
    gc_live_orphans(pid, dry_run, report);
  }
}

}  // namespace hotfix
