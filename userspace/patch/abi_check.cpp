// The -fipa-ra check at every call site (see abi_check.hpp for what is proven and how).
#include "patch/abi_check.hpp"

#include <fcntl.h>
#include <gelf.h>
#include <libelf.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "arch/arch.hpp"
#include "common/unique_fd.hpp"
#include "patch/engine.hpp"
#include "patch/fixlib.hpp"
#include "patch/plan.hpp"
#include "patch/preserve.hpp"
#include "process/memory.hpp"

namespace hotfix {

namespace {

// fix.so is not loaded yet: its code is placed at this base, which no user-space address of
// the target reaches, so one address space holds both and a call is followed wherever it goes.
constexpr uint64_t kFixBase = 1ull << 62;
constexpr int kCalleeDepth = 8;  // levels of calls followed for what a function changes
constexpr int kReadDepth = 3;    // levels of calls followed for the arguments a callee reads
constexpr int kCallerDepth = 3;  // levels of callers followed from a return
constexpr size_t kMaxSites = 4096;  // call sites looked at per check, transitive ones included

struct Segment {
  uint64_t start = 0;  // runtime address
  std::vector<uint8_t> bytes;
};

// The executable segments of one object and, built on first use, every direct reference to
// one of its function entries (candidates from the byte pre-filter).
struct ObjectCode {
  std::vector<Segment> segments;
  bool indexed = false;
  std::unordered_map<uint64_t, std::vector<uint64_t>> refs;  // entry -> candidate sites
};

std::vector<Segment> exec_segments(Elf* elf, uint64_t bias, std::span<const uint8_t> file_bytes, int fd) {
  std::vector<Segment> out;
  size_t n = 0;
  if (elf_getphdrnum(elf, &n) != 0) return out;
  for (size_t i = 0; i < n; ++i) {
    GElf_Phdr ph;
    if (!gelf_getphdr(elf, static_cast<int>(i), &ph) || ph.p_type != PT_LOAD || !(ph.p_flags & PF_X)) continue;
    Segment s{ph.p_vaddr + bias, std::vector<uint8_t>(ph.p_filesz)};
    if (!file_bytes.empty()) {
      if (ph.p_offset + ph.p_filesz > file_bytes.size()) continue;
      std::copy_n(file_bytes.begin() + ph.p_offset, ph.p_filesz, s.bytes.begin());
    } else if (::pread(fd, s.bytes.data(), s.bytes.size(), static_cast<off_t>(ph.p_offset)) !=
               static_cast<ssize_t>(s.bytes.size())) {
      continue;
    }
    out.push_back(std::move(s));
  }
  return out;
}

std::vector<Segment> file_segments(const std::string& path, uint64_t bias) {
  static const bool ready = elf_version(EV_CURRENT) != EV_NONE;
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!ready || !fd) return {};
  Elf* elf = elf_begin(fd.get(), ELF_C_READ_MMAP, nullptr);
  if (!elf) return {};
  auto out = exec_segments(elf, bias, {}, fd.get());
  elf_end(elf);
  return out;
}

std::vector<Segment> image_segments(std::span<const uint8_t> image) {
  static const bool ready = elf_version(EV_CURRENT) != EV_NONE;
  if (!ready) return {};
  std::vector<char> copy(image.begin(), image.end());
  Elf* elf = elf_memory(copy.data(), copy.size());
  if (!elf) return {};
  auto out = exec_segments(elf, kFixBase, image, -1);
  elf_end(elf);
  return out;
}

bool names(const Function& f, const std::string& symbol) {
  return f.mangled == symbol || std::find(f.aliases.begin(), f.aliases.end(), symbol) != f.aliases.end();
}

// One direct reference to a function's entry.
struct Site {
  uint64_t site = 0, next = 0;
  bool call = true;  // false: a tail call (jmp/jcc)
  const Function* caller = nullptr;
};
struct Sites {
  std::vector<Site> confirmed;
  std::vector<std::pair<uint64_t, std::string>> unsure;  // candidate sites that could not be decoded, and why
};

// Why a site keeps registers live: the first reason found, for the refusal.
struct Finding {
  uint64_t live = 0;
  std::string why;
};

class CallSiteCheck {
 public:
  CallSiteCheck(PreparedPatch& p, const ProcessMemory& mem, const SymbolTable& fix_table, const FixLibrary& fix)
      : p_(p), mem_(mem), fix_lib_(fix) {
    std::vector<Function> shifted = fix_table.functions();
    for (auto& f : shifted) f.address += kFixBase;
    fix_ = SymbolTable::from_records(std::move(shifted));
    fix_code_.segments = image_segments(p.fix.bytes);
    for (auto& s : p.switches) patched_.insert(s.entry.target.address);
    for (auto& o : p.table.objects()) bias_[o.path] = o.load_bias;
  }

  Result<void> check(PlannedSwitch& s);

 private:
  // ---- where code is ----
  const Function* function_at(uint64_t addr) const {
    return addr >= kFixBase ? fix_.function_at(addr) : p_.table.function_at(addr);
  }
  const Function* entry_at(uint64_t addr) const {
    const Function* f = function_at(addr);
    return f && f->address == addr ? f : nullptr;
  }
  ObjectCode& object(const std::string& path) {
    auto [it, fresh] = objects_.try_emplace(path);
    if (fresh) it->second.segments = file_segments(path, bias_[path]);
    return it->second;
  }
  ObjectCode& code_space(uint64_t addr, const Function* f) {
    return addr >= kFixBase ? fix_code_ : object(f ? f->object : std::string());
  }
  std::optional<arch::CodeAt> bytes_at(ObjectCode& o, uint64_t addr, uint64_t len) const {
    for (auto& s : o.segments)
      if (addr >= s.start && addr - s.start + len <= s.bytes.size())
        return arch::CodeAt{{s.bytes.begin() + (addr - s.start), s.bytes.begin() + (addr - s.start + len)}, addr};
    return std::nullopt;
  }
  std::optional<arch::CodeAt> code_of(const Function& f) {
    if (f.size == 0) return std::nullopt;
    if (auto c = bytes_at(code_space(f.address, &f), f.address, f.size)) return c;
    if (f.address >= kFixBase) return std::nullopt;
    auto live = mem_.read(f.address, f.size);  // the file is gone or unreadable: the mapped bytes
    if (!live) return std::nullopt;
    return arch::CodeAt{std::move(*live), f.address};
  }
  std::optional<arch::CodeAt> code_containing(uint64_t addr) {
    const Function* f = function_at(addr);
    return f ? code_of(*f) : std::nullopt;
  }

  // A PLT stub: the function it reaches once bound. fix.so's from its relocations (RTLD_NOW:
  // no lazy resolver runs), the target's from the pointer in its live GOT.
  std::optional<uint64_t> resolve_stub(uint64_t addr);
  std::optional<uint64_t> fix_symbol_target(const std::string& symbol) const;

  // ---- what functions change ----
  enum class Side { compiler, runtime };
  uint64_t clobbers(uint64_t entry, Side side, int depth);

  // ---- callers and liveness ----
  ObjectCode& indexed(const std::string& path);
  const arch::FunctionBranches& branches_of(const Function& f);
  Sites direct_sites(const Function& f);
  std::optional<arch::CallEffect> call_effect(uint64_t entry, uint64_t regs);
  arch::LivenessEnv env();
  Finding live_at_site(const Site& s, uint64_t regs, int depth);
  Finding live_after_return(const Function& f, uint64_t regs, int depth);
  std::string describe(uint64_t addr) const;

  PreparedPatch& p_;
  const ProcessMemory& mem_;
  const FixLibrary& fix_lib_;
  SymbolTable fix_;
  ObjectCode fix_code_;
  std::map<std::string, ObjectCode> objects_;
  std::map<std::string, uint64_t> bias_;
  std::set<uint64_t> patched_;
  std::map<std::pair<int, uint64_t>, uint64_t> clobbers_;
  // A function's decoded effects, the same for both sides: decoding (Capstone) was most of
  // the check's time on redis when each side decoded every function again.
  std::unordered_map<uint64_t, std::optional<arch::ClobberScan>> scans_;
  const arch::ClobberScan* scan_of(const Function& f) {
    auto [it, added] = scans_.try_emplace(f.address);
    if (added)
      if (auto code = code_of(f)) it->second = arch::scan_clobbers(code->bytes, code->address);
    return it->second ? &*it->second : nullptr;
  }
  std::set<std::pair<int, uint64_t>> in_progress_;
  std::unordered_map<uint64_t, arch::FunctionBranches> branches_;
  std::map<std::pair<uint64_t, uint64_t>, arch::CallEffect> effects_;
  std::map<std::tuple<uint64_t, uint64_t, int>, Finding> after_return_;
  int read_depth_ = kReadDepth;
  size_t sites_seen_ = 0;
  size_t transitive_ = 0;
};

std::optional<uint64_t> CallSiteCheck::fix_symbol_target(const std::string& symbol) const {
  for (auto& f : fix_.functions())
    if (names(f, symbol)) return f.address;
  // The target's function the fix binds to: what the dynamic linker (exported) or hotfix's
  // binder (the executable's own statics) picks, the executable first.
  const Function* best = nullptr;
  auto rank = [&](const Function& f) { return (f.exported ? 2 : 0) + (f.object == p_.executable ? 1 : 0); };
  for (auto& f : p_.table.functions())
    if (names(f, symbol) && (!best || rank(f) > rank(*best))) best = &f;
  if (best) return best->address;
  return std::nullopt;
}

std::optional<uint64_t> CallSiteCheck::resolve_stub(uint64_t addr) {
  const Function* near = function_at(addr);
  ObjectCode& o = addr >= kFixBase ? fix_code_ : (near ? object(near->object) : fix_code_);
  std::optional<arch::CodeAt> stub;
  if (addr >= kFixBase || near) stub = bytes_at(o, addr, 16);
  if (!stub && addr < kFixBase) {  // a PLT of an object without a symbol nearby: the live bytes
    if (auto live = mem_.read(addr, 16)) stub = arch::CodeAt{std::move(*live), addr};
  }
  if (!stub) return std::nullopt;
  auto slot = arch::stub_slot(stub->bytes, addr);
  if (!slot) return std::nullopt;
  if (addr >= kFixBase) {
    for (auto& r : fix_lib_.relocs)
      if (r.offset == *slot - kFixBase && r.symbol < fix_lib_.dynsyms.size())
        return fix_symbol_target(fix_lib_.dynsyms[r.symbol].name);
    return std::nullopt;
  }
  auto word = mem_.read(*slot, 8);
  if (!word) return std::nullopt;
  uint64_t to = 0;
  std::memcpy(&to, word->data(), 8);
  if (!entry_at(to)) return std::nullopt;  // not bound yet (lazy binding): unknown
  return to;
}

// The call-clobbered registers a function may change. `compiler`: as the compiler of its
// callers saw it (it cannot see past its object: a PLT or indirect call changes them all),
// and where we cannot see, less rather than more -- the check stays conservative. `runtime`:
// what it may really change, PLT calls followed to the functions they reach, and where we
// cannot see, everything.
uint64_t CallSiteCheck::clobbers(uint64_t entry, Side side, int depth) {
  const uint64_t all = arch::call_clobbered_registers();
  const uint64_t unseen = side == Side::runtime ? all : 0;
  auto key = std::make_pair(static_cast<int>(side), entry);
  if (auto it = clobbers_.find(key); it != clobbers_.end()) return it->second;
  if (in_progress_.count(key) || depth <= 0) return unseen;
  const Function* f = entry_at(entry);
  if (!f) {
    // A jump into another function's body (a .cold part, whose own symbol a stripped object
    // lacks): its compiler-side effect is not known, so it adds nothing (the conservative way);
    // outside any function (a PLT) the compiler could not see the callee: the ABI.
    if (side == Side::compiler) return function_at(entry) ? 0 : all;
    auto real = resolve_stub(entry);
    return real ? clobbers(*real, side, depth - 1) : all;
  }
  const arch::ClobberScan* found = scan_of(*f);
  if (!found) return unseen;
  const arch::ClobberScan scan = *found;  // a copy: the recursion below may grow scans_
  in_progress_.insert(key);
  uint64_t bits = scan.written;
  for (uint64_t t : scan.calls) bits |= clobbers(t, side, depth - 1);
  if (scan.indirect_calls) bits = all;  // the compiler, too, assumes an indirect callee changes all
  if (scan.indirect_jumps || scan.undecodable) bits |= unseen;
  bits &= ~scan.preserved;
  in_progress_.erase(key);
  clobbers_[key] = bits;
  return bits;
}

ObjectCode& CallSiteCheck::indexed(const std::string& path) {
  ObjectCode& o = object(path);
  if (o.indexed) return o;
  o.indexed = true;
  std::unordered_set<uint64_t> entries;
  for (auto& f : p_.table.functions())
    if (f.object == path) entries.insert(f.address);
  auto is_entry = [&](uint64_t a) { return entries.count(a) > 0; };
  for (auto& s : o.segments)
    for (auto& c : arch::branch_candidates(s.bytes, s.start, is_entry)) o.refs[c.target].push_back(c.site);
  return o;
}

const arch::FunctionBranches& CallSiteCheck::branches_of(const Function& f) {
  if (auto it = branches_.find(f.address); it != branches_.end()) return it->second;
  auto code = code_of(f);
  arch::FunctionBranches b = code ? arch::direct_branches(code->bytes, code->address) : arch::FunctionBranches{{}, f.address};
  return branches_.emplace(f.address, std::move(b)).first->second;
}

Sites CallSiteCheck::direct_sites(const Function& f) {
  Sites out;
  ObjectCode& o = indexed(f.object);
  auto it = o.refs.find(f.address);
  if (it == o.refs.end()) return out;
  for (uint64_t site : it->second) {
    const Function* caller = p_.table.function_at(site);
    if (!caller || caller->object != f.object) {
      out.unsure.push_back({site, "in code no symbol covers"});
      continue;
    }
    const auto& b = branches_of(*caller);
    if (site >= b.decoded_end) {
      out.unsure.push_back({site, fmt::format("in {}, whose bytes before it do not decode", caller->name)});
      continue;
    }
    for (auto& br : b.branches)
      if (br.site == site && br.target == f.address) out.confirmed.push_back({site, br.next, br.call, caller});
  }
  return out;
}

// A direct call the caller makes after the site: it kills what its compiler assumed the
// callee changes, and reads the registers the callee reads before writing (its arguments).
std::optional<arch::CallEffect> CallSiteCheck::call_effect(uint64_t entry, uint64_t regs) {
  auto key = std::make_pair(entry, regs);
  if (auto it = effects_.find(key); it != effects_.end()) return it->second;
  arch::CallEffect e;
  e.kills = clobbers(entry, Side::compiler, kCalleeDepth);
  std::optional<uint64_t> code = entry_at(entry) ? std::optional<uint64_t>(entry) : resolve_stub(entry);
  if (code && read_depth_ > 0) {
    --read_depth_;
    auto in = arch::live_registers(*code, regs, env());
    ++read_depth_;
    e.reads = in.live;
  } else {
    e.reads = regs & arch::argument_registers();
  }
  effects_[key] = e;
  return e;
}

arch::LivenessEnv CallSiteCheck::env() {
  arch::LivenessEnv e;
  e.code_at = [this](uint64_t a) { return code_containing(a); };
  e.call = [this](uint64_t entry, uint64_t regs) { return call_effect(entry, regs); };
  return e;
}

std::string CallSiteCheck::describe(uint64_t addr) const {
  const Function* f = function_at(addr);
  if (!f) return fmt::format("{:#x}", addr);
  Function at = *f;
  at.address = addr;
  auto src = plan__source_of(p_.table, at);
  return fmt::format("{}+{:#x}{}", f->name, addr - f->address, src.empty() ? "" : " (" + src + ")");
}

// After a call returns to `s`, or -- a tail call -- after the caller itself returns.
Finding CallSiteCheck::live_at_site(const Site& s, uint64_t regs, int depth) {
  ++sites_seen_;
  if (sites_seen_ > kMaxSites) return {regs, "more call sites than the check follows"};
  uint64_t at_return = regs;
  Finding out;
  if (s.call) {
    auto l = arch::live_registers(s.next, regs, env());
    at_return = l.at_return;
    out.live = l.live;
    if (!l.unknown.empty())
      out.why = fmt::format("after the call at {:#x} the check meets {} at {}", s.site, l.unknown, describe(l.where));
    else if (l.live)
      out.why = fmt::format("{} reads {} at {}", s.caller->name, arch::register_names(l.live), describe(l.where));
  }
  at_return &= ~out.live;
  if (at_return) {
    Finding up = live_after_return(*s.caller, at_return, depth - 1);
    if (up.live && out.why.empty())
      out.why = fmt::format("{} still holds {} when it returns: {}", s.caller->name, arch::register_names(up.live), up.why);
    out.live |= up.live;
  }
  return out;
}

// Registers still holding the value when `f` returns: live if one of f's direct callers
// (which may rely on -fipa-ra for f) reads them. Without direct callers the ABI holds.
Finding CallSiteCheck::live_after_return(const Function& f, uint64_t regs, int depth) {
  // A function this patch replaces too is never entered again (strict consistency: no thread is
  // in it either); its callers reach the replacement, which fix.so's compiler built knowingly.
  if (patched_.count(f.address) && p_.options.consistency == Consistency::strict) return {};
  auto key = std::make_tuple(f.address, regs, depth);
  if (auto it = after_return_.find(key); it != after_return_.end()) return it->second;
  Sites sites = direct_sites(f);
  Finding out;
  if (!sites.unsure.empty()) {
    out = {regs, fmt::format("a reference to {} at {:#x} {}", f.name, sites.unsure[0].first, sites.unsure[0].second)};
  } else if (!sites.confirmed.empty() && depth <= 0) {
    out = {regs, fmt::format("{}'s callers are more than {} levels up", f.name, kCallerDepth)};
  } else {
    for (auto& s : sites.confirmed) {
      ++transitive_;
      Finding one = live_at_site(s, regs, depth);
      if (one.live && out.why.empty()) out.why = one.why;
      out.live |= one.live;
    }
  }
  after_return_[key] = out;
  return out;
}

Result<void> CallSiteCheck::check(PlannedSwitch& s) {
  const Function& target = s.entry.target;
  const Function* repl = entry_at(kFixBase + s.entry.replacement_value);
  if (!repl) return {};  // the planner reports a missing replacement
  uint64_t before = clobbers(target.address, Side::compiler, kCalleeDepth);
  uint64_t after = clobbers(repl->address, Side::runtime, kCalleeDepth);
  uint64_t excess = after & ~before;
  if (!excess) {
    p_.notes.push_back({"abi", fmt::format("{}: the replacement changes no call-clobbered register the original "
                                           "preserves", target.name)});
    return {};
  }
  auto names = arch::register_names(excess);
  Sites sites = direct_sites(target);
  if (sites.confirmed.empty() && sites.unsure.empty()) {
    p_.notes.push_back({"abi", fmt::format("{}: no direct callers in {}, so none relies on it preserving {} (calls "
                                           "through the PLT, the GOT or a pointer rely on the ABI only)",
                                           target.name, target.object, names)});
    return {};
  }
  transitive_ = 0;
  sites_seen_ = 0;  // the budget is per patched function
  uint64_t live = 0;
  size_t keeping = 0;
  const Site* first = nullptr;
  std::string why;
  for (auto& site : sites.confirmed) {
    if (patched_.count(site.caller->address) && p_.options.consistency == Consistency::strict) continue;
    Finding f = live_at_site(site, excess, kCallerDepth);
    if (!f.live) continue;
    ++keeping;
    live |= f.live;
    if (!first) first = &site, why = f.why;
  }
  for (auto& [addr, reason] : sites.unsure) {
    ++keeping;
    live |= excess;
    if (!first && why.empty()) why = fmt::format("a reference to {} at {:#x} {}", target.name, addr, reason);
  }
  size_t n = sites.confirmed.size() + sites.unsure.size();
  std::string counted = fmt::format("{} call site{} checked{}", n, n == 1 ? "" : "s",
                                    transitive_ ? fmt::format(", and {} of their callers'", transitive_) : "");
  if (!live) {
    p_.notes.push_back({"abi", fmt::format("{}: {}, none keeps {} live", target.name, counted, names)});
    return {};
  }
  std::string island_why;
  if (preserve__supported(s, island_why)) {
    s.preserve = live;
    p_.notes.push_back({"abi", fmt::format("{}: {}; {} keep {} live: the jump goes through an island that "
                                           "preserves them", target.name, counted, keeping, arch::register_names(live))});
    return {};
  }
  std::string where = first ? fmt::format("{} ({} of {}): {}, the call at {:#x}: {}", arch::register_names(live),
                                          keeping, counted, describe(first->site), first->site, why)
                            : fmt::format("{} ({} of {}): {}", arch::register_names(live), keeping, counted, why);
  auto scan_code = code_of(*repl);
  auto scan = scan_code ? arch::scan_clobbers(scan_code->bytes, scan_code->address) : arch::ClobberScan{};
  bool leaf = scan_code && scan.calls.empty() && !scan.indirect_calls && !scan.indirect_jumps && !scan.undecodable;
  std::string caller = first ? first->caller->name : std::string("the caller");
  std::string hint;
  if (leaf && (live & ~arch::saved_by_gcc_flag()) == 0)
    hint = fmt::format("rebuild fix.so with `{}` (right only because the new {} calls no function), or replace {} "
                       "in fix.so as well",
                       arch::register_flags(live), target.name, caller);
  else
    hint = fmt::format("replace {} in fix.so as well (its copy is compiled knowing the new {}), or change the "
                       "replacement so it uses no more registers than the original; --no-abi-check only once you "
                       "have checked {} yourself",
                       caller, target.name, caller);
  return fail(fmt::format("the replacement of {} changes {}, which the original never does, and a direct caller "
                          "keeps {} (GCC's -fipa-ra, the default at -O2, lets it rely on the original preserving "
                          "them){}",
                          target.name, names, where, island_why.empty() ? "" : "; no preserving island: " + island_why),
              hint);
}

}  // namespace

Result<void> abi__check_call_sites(PreparedPatch& p, const ProcessMemory& memory) {
  auto fix_table = HOTFIX_TRY(SymbolTable::for_image(p.fix.bytes, p.options.library));
  auto fix_lib = HOTFIX_TRY(fixlib__read(p.fix));
  CallSiteCheck check(p, memory, fix_table, fix_lib);
  for (auto& s : p.switches) HOTFIX_CHECK(check.check(s));
  return {};
}

}  // namespace hotfix
