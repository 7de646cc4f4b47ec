#include "patch/registry.hpp"

#include <algorithm>
#include <charconv>
#include <limits>
#include <cstring>
#include <sstream>
#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/sha256.hpp"
#include "common/unique_fd.hpp"

#include "process/maps.hpp"
#include "patch/trust.hpp"
#include "process/memory.hpp"

namespace hotfix {

namespace {

constexpr char kMagic[8] = {'H', 'F', 'X', 'R', 'E', 'G', '0', '1'};
constexpr size_t kHeaderSize = 16;  // magic, u32 length, u32 checksum

uint32_t checksum(const uint8_t* p, size_t n) {  // FNV-1a: catches a torn or foreign write
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 16777619u;
  return h;
}

constexpr const char* kKeyPath = "/run/hotfix/key";

// The root-only key that authenticates registries: 32 random bytes in /run/hotfix/key (0600,
// in a 0700 directory), made on first use. /run is a tmpfs, so the key lasts as long as every
// process whose registry it signed. nullopt if it cannot be read (not root) or is not root's.
std::optional<std::vector<uint8_t>> registry_key() {
  ::mkdir("/run/hotfix", 0700);
  UniqueFd fd(::open(kKeyPath, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (fd) {
    std::vector<uint8_t> key(32);
    if (::getrandom(key.data(), key.size(), 0) != static_cast<ssize_t>(key.size()) ||
        ::write(fd.get(), key.data(), key.size()) != static_cast<ssize_t>(key.size())) {
      ::unlink(kKeyPath);
      return std::nullopt;
    }
    return key;
  }
  fd.reset(::open(kKeyPath, O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  struct stat st {};
  if (!fd || ::fstat(fd.get(), &st) != 0 || st.st_uid != 0 || (st.st_mode & 077) != 0 || st.st_size != 32)
    return std::nullopt;
  std::vector<uint8_t> key(32);
  if (::read(fd.get(), key.data(), key.size()) != static_cast<ssize_t>(key.size())) return std::nullopt;
  return key;
}

std::string mac_of(const std::vector<uint8_t>& key, const std::string& signed_text) {
  return hmac_sha256__hex(key, std::span(reinterpret_cast<const uint8_t*>(signed_text.data()), signed_text.size()));
}

std::string hex(const std::vector<uint8_t>& bytes) {
  std::string s;
  for (auto b : bytes) s += fmt::format("{:02x}", b);
  return s.empty() ? "-" : s;
}

// Parsing is defensive: the bytes come from the target's memory, which anything may have
// written. A bad field is an error naming it, never an exception.
bool parse_hex_bytes(const std::string& s, std::vector<uint8_t>& out) {
  out.clear();
  if (s == "-") return true;
  if (s.size() % 2 || s.size() > 64) return false;  // a few instruction bytes, never more
  for (size_t i = 0; i < s.size(); i += 2) {
    uint8_t b = 0;
    auto [p, ec] = std::from_chars(s.data() + i, s.data() + i + 2, b, 16);
    if (ec != std::errc{} || p != s.data() + i + 2) return false;
    out.push_back(b);
  }
  return true;
}

// Paths may hold spaces; keep every field one word.
std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '%' || c == ' ' || c == '\n' || c == '\t') out += fmt::format("%{:02x}", static_cast<unsigned char>(c));
    else out += c;
  }
  return out.empty() ? "-" : out;
}

bool parse_escaped(const std::string& s, std::string& out) {
  out.clear();
  if (s == "-") return true;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out += s[i];
      continue;
    }
    unsigned char c = 0;
    if (i + 2 >= s.size()) return false;  // '%' needs two hex digits
    auto [p, ec] = std::from_chars(s.data() + i + 1, s.data() + i + 3, c, 16);
    if (ec != std::errc{} || p != s.data() + i + 3) return false;
    out += static_cast<char>(c);
    i += 2;
  }
  return true;
}

// An unsigned number: decimal, or hex with "0x" (as encode_text writes them), within `max`.
template <typename T>
bool parse_number(const std::string& s, T& out, int base, uint64_t max = std::numeric_limits<T>::max()) {
  const char* b = s.data();
  const char* e = s.data() + s.size();
  if (base == 16) {
    if (s.size() < 3 || s[0] != '0' || (s[1] != 'x' && s[1] != 'X')) return s == "0" ? (out = 0, true) : false;
    b += 2;
  }
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(b, e, v, base);
  if (ec != std::errc{} || p != e || b == e || v > max) return false;
  out = static_cast<T>(v);
  return true;
}

std::string encode_text(const Registry& r) {
  std::string t = fmt::format("hotfix-registry 1\nnext_id {}\n", r.next_id);
  if (r.owner) t += fmt::format("owner {}\n", r.owner);
  if (r.pruned.count)  // released patches folded into one line (registry__compact)
    t += fmt::format("pruned {} {} {} {}\n", r.pruned.count, r.pruned.first_id, r.pruned.last_id,
                     r.pruned.last_reverted_ns);
  for (auto& p : r.patches) {
    t += fmt::format("patch {} {} {} {} {} {} {:#x} {:#x} {} {} {:#x} {:#x}{}\n", p.id, patch_state__name(p.state),
                     p.applied_ns, p.reverted_ns, escape(p.library), escape(p.loaded_copy), p.handle, p.load_base,
                     p.released ? 1 : 0, escape(p.consistency), p.counters, p.counters_len,
                     p.sha256.empty() ? "" : " " + p.sha256);  // a 14th word: older records have 13
    for (auto& f : p.functions)
      t += fmt::format("func {:#x} {:#x} {:#x} {} {} {}{}{}\n", f.old_address, f.new_address, f.island, hex(f.original),
                       hex(f.written), escape(f.mangled),
                       f.preserve || f.frame || f.trampoline ? fmt::format(" {:#x} {:#x}", f.preserve, f.frame) : "",
                       f.trampoline ? fmt::format(" {:#x} {:#x}", f.trampoline, f.trampoline_covered) : "");
    size_t recorded = std::min(p.uncovered.size(), kMaxRecordedUncovered);
    for (size_t i = 0; i < recorded; ++i) {
      auto& u = p.uncovered[i];
      t += fmt::format("uncov {} {} {} {} {}\n", u.kind, escape(u.function), escape(u.in), escape(u.file), u.line);
    }
    if (uint64_t more = p.uncovered_more + (p.uncovered.size() - recorded); more && recorded == kMaxRecordedUncovered)
      t += fmt::format("uncov-more {}\n", more);
  }
  for (auto& w : r.watches) {
    t += fmt::format("watch {} {} {:#x} {:#x}\n", w.owner, w.owner_start, w.counters, w.counters_len);
    for (auto& [address, length] : w.pages) t += fmt::format("wpage {:#x} {:#x}\n", address, length);
    for (auto& st : w.stubs)
      t += fmt::format("wstub {:#x} {:#x} {} {} {}\n", st.address, st.stub, hex(st.original), hex(st.written),
                       escape(st.name));
  }
  if (auto key = registry_key()) t += fmt::format("mac {}\n", mac_of(*key, t));
  return t + "end\n";
}

// Revert unlinks the loaded copy: a forged record must not name a host file. Copies of older builds live in
// kPatchDir/PID/, one plain name deep (no ".." or "." components).
bool is_patch_copy(const std::string& path) {
  if (path.empty()) return true;
  // A delivered memfd (patch/deliver.hpp) names no host file: revert never unlinks it.
  if (path.starts_with(kFixCopyPrefix)) return path.size() <= 4096 && path.find('/', 1) == std::string::npos;
  const std::string dir = kPatchDir;
  if (path.rfind(dir, 0) != 0 || path.size() > 4096) return false;
  std::string rest = path.substr(dir.size());
  auto slash = rest.find('/');
  if (slash == std::string::npos || slash == 0 || rest.find('/', slash + 1) != std::string::npos) return false;
  std::string pid_part = rest.substr(0, slash), name = rest.substr(slash + 1);
  if (!std::all_of(pid_part.begin(), pid_part.end(), [](char c) { return c >= '0' && c <= '9'; })) return false;
  return !name.empty() && name != "." && name != "..";
}

// Ids are small: a patch a minute for a century stays far below this.
constexpr uint32_t kMaxId = 1u << 24;

// Check the MAC (see Registry::authentic). The MAC line must be the last before "end".
void authenticate(Registry& r, const std::string& text, const std::optional<std::string>& mac) {
  auto at = text.rfind("\nmac ");
  if (!mac || at == std::string::npos || text.compare(at + 1, text.size() - at - 1, "mac " + *mac + "\nend\n") != 0) {
    r.authentic = false;
    r.authenticity = "it carries no MAC of root's hotfix-ctl";
    return;
  }
  auto key = registry_key();
  if (!key) {
    r.authentic = false;
    r.authenticity = fmt::format("its MAC cannot be checked: {} is not readable (run as root)", kKeyPath);
  } else if (mac_of(*key, text.substr(0, at + 1)) != *mac) {
    r.authentic = false;
    r.authenticity = "its MAC does not match what it says (it was rewritten after root's hotfix-ctl wrote it)";
  }
}

Result<Registry> decode_text(const std::string& text) {
  Registry r;
  std::istringstream in(text);
  std::string line;
  auto bad = [](const std::string& l, const std::string& field = {}) {
    std::string shown = l.size() > 80 ? l.substr(0, 80) + "..." : l;
    return fail(fmt::format("the target's hotfix registry is damaged{} near '{}'",
                            field.empty() ? "" : fmt::format(" (bad {})", field), shown),
                "list what it holds with `cat` on its /proc/PID/map_files entry");
  };
  if (!std::getline(in, line) || line != "hotfix-registry 1") return bad(line, "header");
  bool seen_next_id = false;
  std::optional<std::string> mac;  // the MAC line's value, over everything before it
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::vector<std::string> w;
    for (std::string word; f >> word;) w.push_back(word);
    const std::string kind = w.empty() ? "" : w[0];
    if (kind == "mac" && w.size() == 2 && !mac) {
      mac = w[1];
      continue;
    }
    if (kind == "end" && w.size() == 1) {
      authenticate(r, text, mac);
      uint32_t highest = 0;
      for (auto& p : r.patches) highest = std::max(highest, p.id);
      highest = std::max(highest, r.pruned.last_id);
      if (!seen_next_id || r.next_id <= highest) return bad(fmt::format("next_id {}", r.next_id), "next_id");
      return r;
    }
    if (kind == "next_id") {
      if (w.size() != 2 || !parse_number(w[1], r.next_id, 10, kMaxId) || r.next_id == 0) return bad(line, "next_id");
      seen_next_id = true;
    } else if (kind == "owner") {
      if (w.size() != 2 || !parse_number(w[1], r.owner, 10, 1u << 22) || r.owner <= 0) return bad(line, "owner");
    } else if (kind == "pruned") {
      auto& pr = r.pruned;
      if (w.size() != 5 || !parse_number(w[1], pr.count, 10, kMaxId) || !parse_number(w[2], pr.first_id, 10, kMaxId) ||
          !parse_number(w[3], pr.last_id, 10, kMaxId) || !parse_number(w[4], pr.last_reverted_ns, 10) ||
          pr.count == 0 || pr.first_id == 0 || pr.first_id > pr.last_id || pr.count > pr.last_id - pr.first_id + 1 ||
          !r.patches.empty())
        return bad(line, "pruned summary");
    } else if (kind == "patch") {
      if (w.size() != 13 && w.size() != 14) return bad(line, "patch record");
      PatchRecord p;
      int released = 0;
      if (!parse_number(w[1], p.id, 10, kMaxId) || p.id == 0) return bad(line, "patch id");
      if (w[2] != "active" && w[2] != "reverted") return bad(line, "state");
      p.state = w[2] == "active" ? PatchState::active : PatchState::reverted;
      if (!parse_number(w[3], p.applied_ns, 10) || !parse_number(w[4], p.reverted_ns, 10)) return bad(line, "time");
      if (!parse_escaped(w[5], p.library)) return bad(line, "library");
      if (!parse_escaped(w[6], p.loaded_copy) || !is_patch_copy(p.loaded_copy)) return bad(line, "loaded copy path");
      if (!parse_number(w[7], p.handle, 16)) return bad(line, "handle");
      if (!parse_number(w[8], p.load_base, 16)) return bad(line, "load base");
      if (!parse_number(w[9], released, 10, 1)) return bad(line, "released");
      if (!parse_escaped(w[10], p.consistency) || (p.consistency != "strict" && p.consistency != "entry"))
        return bad(line, "consistency");
      if (!parse_number(w[11], p.counters, 16) || !parse_number(w[12], p.counters_len, 16)) return bad(line, "counters");
      if (r.find(p.id)) return bad(line, "patch id (a duplicate)");
      if (!r.patches.empty() && p.id < r.patches.back().id) return bad(line, "patch id (out of order)");
      if (w.size() == 14 && (w[13].size() != 64 || !std::all_of(w[13].begin(), w[13].end(), [](char c) {
                               return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
                             })))
        return bad(line, "sha256");
      if (w.size() == 14) p.sha256 = w[13];
      p.released = released != 0;
      r.patches.push_back(std::move(p));
    } else if (kind == "func" && !r.patches.empty()) {
      if (w.size() != 7 && w.size() != 9 && w.size() != 11) return bad(line, "func record");
      FunctionRecord fr;
      if (!parse_number(w[1], fr.old_address, 16) || !parse_number(w[2], fr.new_address, 16)) return bad(line, "address");
      if (!parse_number(w[3], fr.island, 16)) return bad(line, "island");
      if (!parse_hex_bytes(w[4], fr.original)) return bad(line, "original bytes");
      if (!parse_hex_bytes(w[5], fr.written)) return bad(line, "written bytes");
      if (!parse_escaped(w[6], fr.mangled) || fr.mangled.empty()) return bad(line, "symbol");
      if (w.size() >= 9 && (!parse_number(w[7], fr.preserve, 16) || !parse_number(w[8], fr.frame, 16)))
        return bad(line, "preserving island");
      if (w.size() == 11 && (!parse_number(w[9], fr.trampoline, 16) || !parse_number(w[10], fr.trampoline_covered, 16) ||
                             !fr.trampoline || fr.trampoline_covered == 0 || fr.trampoline_covered > 64))
        return bad(line, "counting trampoline");
      r.patches.back().functions.push_back(std::move(fr));
    } else if (kind == "uncov" && !r.patches.empty()) {
      auto& patch = r.patches.back();
      UncoveredPlace u;
      if (w.size() != 6 || patch.uncovered.size() >= kMaxRecordedUncovered || patch.uncovered_more)
        return bad(line, "uncovered place");
      if (w[1] != "inlined" && w[1] != "clone" && w[1] != "alias") return bad(line, "uncovered kind");
      u.kind = w[1];
      if (!parse_escaped(w[2], u.function) || u.function.empty()) return bad(line, "uncovered function");
      if (!parse_escaped(w[3], u.in) || u.in.empty()) return bad(line, "uncovered place name");
      if (!parse_escaped(w[4], u.file)) return bad(line, "uncovered file");
      if (!parse_number(w[5], u.line, 10, 1u << 24)) return bad(line, "uncovered line");
      patch.uncovered.push_back(std::move(u));
    } else if (kind == "uncov-more" && !r.patches.empty()) {
      auto& patch = r.patches.back();
      if (w.size() != 2 || patch.uncovered.size() != kMaxRecordedUncovered || patch.uncovered_more ||
          !parse_number(w[1], patch.uncovered_more, 10, kMaxId) || patch.uncovered_more == 0)
        return bad(line, "uncovered count");
    } else if (kind == "watch") {
      WatchRecord wr;
      if (w.size() != 5 || !parse_number(w[1], wr.owner, 10, 1u << 22) || wr.owner == 0 ||
          !parse_number(w[2], wr.owner_start, 10) || !parse_number(w[3], wr.counters, 16) ||
          !parse_number(w[4], wr.counters_len, 16))
        return bad(line, "watch record");
      r.watches.push_back(std::move(wr));
    } else if (kind == "wpage" && !r.watches.empty()) {
      std::pair<uint64_t, uint64_t> page;
      if (w.size() != 3 || !parse_number(w[1], page.first, 16) || !parse_number(w[2], page.second, 16) ||
          page.first == 0 || page.second == 0 || page.second > (1u << 24))
        return bad(line, "watch page");
      r.watches.back().pages.push_back(page);
    } else if (kind == "wstub" && !r.watches.empty()) {
      WatchStubRecord st;
      if (w.size() != 6 || !parse_number(w[1], st.address, 16) || !parse_number(w[2], st.stub, 16) ||
          !parse_hex_bytes(w[3], st.original) || !parse_hex_bytes(w[4], st.written) || !parse_escaped(w[5], st.name) ||
          st.original.size() != st.written.size() || st.original.empty() || st.name.empty())
        return bad(line, "watch trampoline");
      r.watches.back().stubs.push_back(std::move(st));
    } else {
      return bad(line);
    }
  }
  return bad("<truncated>");
}

}  // namespace

const char* patch_state__name(PatchState s) { return s == PatchState::active ? "active" : "reverted"; }

PatchRecord* Registry::find(uint32_t id) {
  auto it = std::find_if(patches.begin(), patches.end(), [&](auto& p) { return p.id == id; });
  return it == patches.end() ? nullptr : &*it;
}

const WatchStubRecord* Registry::watch_stub_at(uint64_t address) const {
  for (auto& w : watches)
    for (auto& st : w.stubs)
      if (st.address == address) return &st;
  return nullptr;
}

bool Registry::was_pruned(uint32_t id) const {
  if (!pruned.count || id < pruned.first_id || id > pruned.last_id || id >= next_id) return false;
  return std::none_of(patches.begin(), patches.end(), [&](auto& p) { return p.id == id; });
}

void registry__compact(Registry& r, size_t keep) {
  size_t released = std::count_if(r.patches.begin(), r.patches.end(), [](auto& p) { return p.released; });
  if (released <= keep) return;
  size_t drop = released - keep;  // the oldest ones: patches are in id order
  std::vector<PatchRecord> kept;
  for (auto& p : r.patches) {
    if (!p.released || drop == 0) {
      kept.push_back(std::move(p));
      continue;
    }
    --drop;
    auto& s = r.pruned;
    s.first_id = s.count ? std::min(s.first_id, p.id) : p.id;
    s.last_id = std::max(s.last_id, p.id);
    s.last_reverted_ns = std::max(s.last_reverted_ns, p.reverted_ns);
    ++s.count;
  }
  r.patches = std::move(kept);
}

const PatchRecord* Registry::top_at(uint64_t old_address) const {
  const PatchRecord* top = nullptr;  // patches are kept in id order: the last active one is on top
  for (auto& p : patches) {
    if (p.state != PatchState::active) continue;
    for (auto& f : p.functions)
      if (f.old_address == old_address) top = &p;
  }
  return top;
}

FunctionRecord* Registry::record_above(uint32_t below, uint64_t old_address) {
  FunctionRecord* best = nullptr;
  uint32_t best_id = UINT32_MAX;
  for (auto& p : patches) {
    if (p.state != PatchState::active || p.id <= below || p.id >= best_id) continue;
    for (auto& f : p.functions)
      if (f.old_address == old_address) best = &f, best_id = p.id;
  }
  return best;
}

std::vector<uint8_t> registry__encode(const Registry& r) {
  std::string text = encode_text(r);
  std::vector<uint8_t> out(kHeaderSize + text.size());
  uint32_t len = static_cast<uint32_t>(text.size());
  uint32_t sum = checksum(reinterpret_cast<const uint8_t*>(text.data()), text.size());
  std::memcpy(out.data(), kMagic, 8);
  std::memcpy(out.data() + 8, &len, 4);
  std::memcpy(out.data() + 12, &sum, 4);
  std::memcpy(out.data() + kHeaderSize, text.data(), text.size());
  return out;
}

Result<Registry> registry__decode(const std::vector<uint8_t>& bytes) {
  if (bytes.size() < kHeaderSize || std::memcmp(bytes.data(), kMagic, 8) != 0) {
    // A fresh registry mapping is all zeros until the first write.
    if (bytes.size() >= 8 && std::all_of(bytes.begin(), bytes.begin() + 8, [](uint8_t b) { return b == 0; }))
      return Registry{};
    return fail("the target's hotfix registry has a bad header", "it was overwritten; run `hotfix-ctl gc` after restarting");
  }
  uint32_t len, sum;
  std::memcpy(&len, bytes.data() + 8, 4);
  std::memcpy(&sum, bytes.data() + 12, 4);
  if (kHeaderSize + len > bytes.size() || checksum(bytes.data() + kHeaderSize, len) != sum)
    return fail("the target's hotfix registry fails its checksum (a write was torn or foreign)",
                "inspect it with `cat` on its /proc/PID/map_files entry");
  return decode_text(std::string(bytes.begin() + kHeaderSize, bytes.begin() + kHeaderSize + len));
}

Result<void> registry__require_authentic(const Registry& r, pid_t pid) {
  if (r.authentic) return {};
  return fail(fmt::format("refusing to act on the hotfix registry of pid {}: {} -- tampering, or a registry not "
                          "written by this host's hotfix-ctl; nothing was done", pid, r.authenticity),
              "whoever runs as the target's user can rewrite it: restart the process to be rid of its patches, and "
              "check what else ran as that user");
}

std::optional<uint64_t> registry__locate(pid_t pid) {
  auto maps = process__read_maps(pid);
  if (!maps) return std::nullopt;
  for (auto& m : *maps)
    if (m.path.find(std::string("/memfd:") + kRegistryName) == 0) return m.start;
  return std::nullopt;
}

Result<Registry> registry__read(pid_t pid) {
  HOTFIX_CHECK(process__check_alive(pid));
  auto at = registry__locate(pid);
  // Unreadable maps or memory hide the registry: say so, never "no patches".
  if (!at) {
    HOTFIX_CHECK(hotfix_state__readable(pid));
    return Registry{};
  }
  auto opened = ProcessMemory::open(pid);
  if (!opened) HOTFIX_CHECK(hotfix_state__readable(pid));
  auto mem = HOTFIX_TRY(std::move(opened));
  auto head = HOTFIX_TRY(mem.read(*at, kHeaderSize));
  if (std::memcmp(head.data(), kMagic, 8) != 0) return registry__decode(head);
  uint32_t len;
  std::memcpy(&len, head.data() + 8, 4);
  if (len > kRegistrySize - kHeaderSize) return fail("the target's hotfix registry claims an impossible length");
  return registry__decode(HOTFIX_TRY(mem.read(*at, kHeaderSize + len)));
}

Result<void> registry__write(const ProcessMemory& mem, uint64_t address, const Registry& r) {
  Registry compacted = r;
  registry__compact(compacted);
  compacted.owner = mem.pid();  // whoever writes a registry writes it for the process it is mapped in
  auto bytes = registry__encode(compacted);
  if (bytes.size() > kRegistrySize) {
    size_t held = std::count_if(compacted.patches.begin(), compacted.patches.end(), [](auto& p) { return !p.released; });
    return fail(fmt::format("the hotfix registry is full: {} active or held patch(es) need {} bytes, more than its {}",
                            held, bytes.size(), kRegistrySize),
                "revert patches that are no longer needed (`hotfix-ctl revert --pid PID --id N`)");
  }
  return mem.write(address, bytes);
}

}  // namespace hotfix

#include "symbols/symbols.hpp"

namespace hotfix {

namespace {

std::string without_deleted(std::string path) {
  const std::string tag = " (deleted)";
  if (path.ends_with(tag)) path.resize(path.size() - tag.size());
  return path;
}

}  // namespace

std::set<std::string> registry__fix_copies(const Registry& r, const SymbolTable& table, const std::string& patch_dir) {
  std::set<std::string> out;
  for (auto& o : table.objects()) {
    std::string path = without_deleted(o.path);
    bool copy = (!patch_dir.empty() && path.rfind(patch_dir, 0) == 0) || path.rfind("/memfd:hotfix", 0) == 0;
    for (auto& p : r.patches) {
      if (p.released) continue;  // unloaded: its name and address may belong to another object now
      copy = copy || (!p.loaded_copy.empty() && path == p.loaded_copy) || (p.load_base && o.load_bias == p.load_base);
    }
    if (copy) out.insert(o.path);
  }
  return out;
}

std::vector<Function> registry__live_functions(const Registry& r, const SymbolTable& table,
                                               std::vector<Function> functions, const std::string& patch_dir,
                                               std::vector<std::string>* notes) {
  std::vector<Function> out;
  auto copies = registry__fix_copies(r, table, patch_dir);
  for (auto& f : functions) {
    if (copies.count(f.object)) continue;  // a fix copy's own symbol
    const PatchRecord* top = r.top_at(f.address);
    const FunctionRecord* rec = nullptr;
    if (top)
      for (auto& fr : top->functions)
        if (fr.old_address == f.address) rec = &fr;
    const Function* repl = rec ? table.function_at(rec->new_address) : nullptr;
    if (!repl) {
      out.push_back(f);
      continue;
    }
    Function live = *repl;
    live.name = f.name;
    if (uint64_t skip = rec->probe_address() - rec->new_address) {  // its entry holds a trampoline's jump
      live.address += skip, live.offset += skip, live.size = live.size > skip ? live.size - skip : 1;
      live.past_entry = true;
    }
    if (notes) notes->push_back(fmt::format("{} is patched (patch {}): watching its replacement in {}", f.name, top->id, repl->object));
    out.push_back(std::move(live));
  }
  return out;
}

}  // namespace hotfix
