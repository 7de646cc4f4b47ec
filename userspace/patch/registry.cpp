#include "patch/registry.hpp"

#include <algorithm>
#include <cstring>
#include <sstream>

#include "process/maps.hpp"
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

std::string hex(const std::vector<uint8_t>& bytes) {
  std::string s;
  for (auto b : bytes) s += fmt::format("{:02x}", b);
  return s.empty() ? "-" : s;
}

std::vector<uint8_t> unhex(const std::string& s) {
  std::vector<uint8_t> out;
  if (s == "-") return out;
  for (size_t i = 0; i + 1 < s.size(); i += 2) out.push_back(static_cast<uint8_t>(std::stoul(s.substr(i, 2), nullptr, 16)));
  return out;
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

std::string unescape(const std::string& s) {
  if (s == "-") return {};
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size()) {
      out += static_cast<char>(std::stoi(s.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

std::string encode_text(const Registry& r) {
  std::string t = fmt::format("hotfix-registry 1\nnext_id {}\n", r.next_id);
  for (auto& p : r.patches) {
    t += fmt::format("patch {} {} {} {} {} {} {:#x} {:#x} {} {} {:#x} {:#x}\n", p.id, patch_state__name(p.state),
                     p.applied_ns, p.reverted_ns, escape(p.library), escape(p.loaded_copy), p.handle, p.load_base,
                     p.released ? 1 : 0, escape(p.consistency), p.counters, p.counters_len);
    for (auto& f : p.functions)
      t += fmt::format("func {:#x} {:#x} {:#x} {} {} {}\n", f.old_address, f.new_address, f.island, hex(f.original),
                       hex(f.written), escape(f.mangled));
  }
  return t + "end\n";
}

Result<Registry> decode_text(const std::string& text) {
  Registry r;
  std::istringstream in(text);
  std::string line;
  auto bad = [](const std::string& l) { return fail(fmt::format("the target's hotfix registry is damaged near '{}'", l),
                                                     "list what it holds with `cat` on its /proc/PID/map_files entry"); };
  if (!std::getline(in, line) || line != "hotfix-registry 1") return bad(line);
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::string kind;
    f >> kind;
    if (kind == "end") return r;
    if (kind == "next_id") {
      f >> r.next_id;
    } else if (kind == "patch") {
      PatchRecord p;
      std::string state, lib, copy, handle, base, consistency, counters, counters_len;
      int released = 0;
      f >> p.id >> state >> p.applied_ns >> p.reverted_ns >> lib >> copy >> handle >> base >> released >> consistency >>
          counters >> counters_len;
      if (!f) return bad(line);
      p.state = state == "active" ? PatchState::active : PatchState::reverted;
      p.library = unescape(lib), p.loaded_copy = unescape(copy), p.consistency = unescape(consistency);
      p.handle = std::stoull(handle, nullptr, 16), p.load_base = std::stoull(base, nullptr, 16);
      p.released = released != 0;
      p.counters = std::stoull(counters, nullptr, 16), p.counters_len = std::stoull(counters_len, nullptr, 16);
      r.patches.push_back(std::move(p));
    } else if (kind == "func" && !r.patches.empty()) {
      FunctionRecord fr;
      std::string old_a, new_a, island, orig, written, mangled;
      f >> old_a >> new_a >> island >> orig >> written >> mangled;
      if (!f) return bad(line);
      fr.old_address = std::stoull(old_a, nullptr, 16), fr.new_address = std::stoull(new_a, nullptr, 16);
      fr.island = std::stoull(island, nullptr, 16);
      fr.original = unhex(orig), fr.written = unhex(written), fr.mangled = unescape(mangled);
      r.patches.back().functions.push_back(std::move(fr));
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

const PatchRecord* Registry::top_at(uint64_t old_address) const {
  const PatchRecord* top = nullptr;  // patches are kept in id order: the last active one is on top
  for (auto& p : patches) {
    if (p.state != PatchState::active) continue;
    for (auto& f : p.functions)
      if (f.old_address == old_address) top = &p;
  }
  return top;
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
  if (!at) return Registry{};
  auto mem = HOTFIX_TRY(ProcessMemory::open(pid));
  auto head = HOTFIX_TRY(mem.read(*at, kHeaderSize));
  if (std::memcmp(head.data(), kMagic, 8) != 0) return registry__decode(head);
  uint32_t len;
  std::memcpy(&len, head.data() + 8, 4);
  if (len > kRegistrySize - kHeaderSize) return fail("the target's hotfix registry claims an impossible length");
  return registry__decode(HOTFIX_TRY(mem.read(*at, kHeaderSize + len)));
}

Result<void> registry__write(const ProcessMemory& mem, uint64_t address, const Registry& r) {
  auto bytes = registry__encode(r);
  if (bytes.size() > kRegistrySize) return fail("the hotfix registry is full", "revert and release old patches first");
  return mem.write(address, bytes);
}

}  // namespace hotfix

#include "symbols/symbols.hpp"

namespace hotfix {

std::vector<Function> registry__live_functions(const Registry& r, const SymbolTable& table,
                                               std::vector<Function> functions, const std::string& patch_dir,
                                               std::vector<std::string>* notes) {
  std::vector<Function> out;
  for (auto& f : functions) {
    if (f.object.rfind(patch_dir, 0) == 0) continue;  // a fix copy's own symbol
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
    if (notes) notes->push_back(fmt::format("{} is patched (patch {}): watching its replacement in {}", f.name, top->id, repl->object));
    out.push_back(std::move(live));
  }
  return out;
}

}  // namespace hotfix
