#include "observe/probe_safety.hpp"

#include "arch/arch.hpp"

#include <fcntl.h>
#include <gelf.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <mutex>
#include <set>

#include "common/unique_fd.hpp"
#include "process/memory.hpp"

namespace hotfix {

namespace {

constexpr size_t kCompared = 16;  // covers any jump a patcher writes at an entry

// What the ELF file at `path` says about return probes: its section names, and for Go the
// runtime's version symbol (a binary whose sections were renamed still has it in .symtab).
struct ObjectTraits {
  bool exception_tables = false;
  bool go = false;
};

bool is_symbol_table(const GElf_Shdr& shdr) { return shdr.sh_type == SHT_SYMTAB || shdr.sh_type == SHT_DYNSYM; }

bool has_symbol(Elf* elf, Elf_Scn* scn, const GElf_Shdr& shdr, const char* wanted) {
  Elf_Data* data = elf_getdata(scn, nullptr);
  if (!data || shdr.sh_entsize == 0) return false;
  for (size_t i = 0; i < shdr.sh_size / shdr.sh_entsize; ++i) {
    GElf_Sym sym;
    const char* name = gelf_getsym(data, static_cast<int>(i), &sym) ? elf_strptr(elf, shdr.sh_link, sym.st_name) : nullptr;
    if (name && std::strcmp(name, wanted) == 0) return true;
  }
  return false;
}

ObjectTraits read_traits(const std::string& path) {
  ObjectTraits t;
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return t;
  elf_version(EV_CURRENT);
  Elf* elf = elf_begin(fd.get(), ELF_C_READ, nullptr);
  if (!elf) return t;
  size_t shstrndx = 0;
  if (elf_getshdrstrndx(elf, &shstrndx) == 0)
    for (Elf_Scn* scn = nullptr; (scn = elf_nextscn(elf, scn));) {
      GElf_Shdr shdr;
      if (!gelf_getshdr(scn, &shdr)) continue;
      const char* name = elf_strptr(elf, shstrndx, shdr.sh_name);
      if (name && std::strcmp(name, ".gcc_except_table") == 0) t.exception_tables = true;
      if (name && std::strcmp(name, ".go.buildinfo") == 0) t.go = true;
      if (!t.go && is_symbol_table(shdr)) t.go = has_symbol(elf, scn, shdr, "runtime.buildVersion");
    }
  elf_end(elf);
  return t;
}

// Objects are read once per process: watch '*' asks for every function of every object.
ObjectTraits traits_of(const std::string& path) {
  static std::mutex lock;
  static std::map<std::string, ObjectTraits> cache;
  std::lock_guard guard(lock);
  auto it = cache.find(path);
  if (it == cache.end()) it = cache.emplace(path, read_traits(path)).first;
  return it->second;
}

}  // namespace

std::optional<std::vector<uint8_t>> probe__file_bytes(pid_t pid, const Function& fn, size_t n) {
  UniqueFd fd(::open(fmt::format("/proc/{}/root{}", pid, fn.object).c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return std::nullopt;
  std::vector<uint8_t> out(n);
  ssize_t got = ::pread(fd.get(), out.data(), n, static_cast<off_t>(fn.offset));
  if (got <= 0) return std::nullopt;
  out.resize(static_cast<size_t>(got));
  return out;
}

std::optional<size_t> probe__breakpoint_offset(std::span<const uint8_t> live, std::span<const uint8_t> file) {
  const uint8_t trap = arch::trap_instruction()[0];
  std::optional<size_t> first;
  for (size_t i = 0; i < std::min(live.size(), file.size()); ++i) {
    if (live[i] == file[i]) continue;
    if (live[i] != trap) return std::nullopt;  // another change than a breakpoint
    if (!first) first = i;
  }
  return first;
}

Result<void> probe__check_entries(pid_t pid, const std::vector<Function>& functions) {
  auto mem = HOTFIX_TRY(ProcessMemory::open(pid));
  for (auto& f : functions) {
    size_t n = std::min<uint64_t>(kCompared, std::max<uint64_t>(f.size, 1));
    auto live = mem.read(f.address, n);
    auto file = probe__file_bytes(pid, f, n);
    if (!live || !file || file->size() != n) continue;  // cannot compare (file replaced on disk): the attach itself will tell
    // Breakpoints where the file has other bytes, the rest the file's: other uprobes (bpftrace,
    // a second watch), on the entry or on a later instruction. The kernel shares one breakpoint
    // among the uprobes of an offset and single-steps the file's instruction, which ends where
    // the next (file's or breakpoint) instruction begins: a probe more there is safe.
    if (*live != *file && !probe__breakpoint_offset(*live, *file))
      return fail(fmt::format("{} in pid {} no longer holds its file's code at its entry (it is patched); a uprobe "
                              "there would execute the file's instruction and crash the process",
                              f.name, pid),
                  "watch the replacement instead (`hotfix-ctl watch` does this for hotfix patches), or revert first");
  }
  return {};
}

std::vector<std::string> probe__objects_with_exceptions(const std::vector<Function>& functions) {
  std::set<std::string> objects, risky;
  for (auto& f : functions) objects.insert(f.object);
  for (auto& o : objects)
    if (traits_of(o).exception_tables) risky.insert(o);
  return {risky.begin(), risky.end()};
}

bool probe__is_go_object(const std::string& object) { return traits_of(object).go; }

ReturnProbeRisk probe__return_risk(const std::string& object) {
  auto t = traits_of(object);
  if (t.go) return ReturnProbeRisk::go;  // first: a cgo binary may hold exception tables too
  return t.exception_tables ? ReturnProbeRisk::cxx_exceptions : ReturnProbeRisk::none;
}

std::vector<std::string> probe__go_objects(const std::vector<Function>& functions) {
  std::set<std::string> objects, go;
  for (auto& f : functions) objects.insert(f.object);
  for (auto& o : objects)
    if (traits_of(o).go) go.insert(o);
  return {go.begin(), go.end()};
}

}  // namespace hotfix
