#include "observe/probe_safety.hpp"

#include <fcntl.h>
#include <gelf.h>
#include <unistd.h>

#include <cstring>
#include <set>

#include "common/unique_fd.hpp"
#include "process/memory.hpp"

namespace hotfix {

namespace {

constexpr size_t kCompared = 16;  // covers any jump a patcher writes at an entry

bool has_section(const std::string& path, const char* wanted) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return false;
  elf_version(EV_CURRENT);
  Elf* elf = elf_begin(fd.get(), ELF_C_READ, nullptr);
  if (!elf) return false;
  size_t shstrndx = 0;
  bool found = false;
  if (elf_getshdrstrndx(elf, &shstrndx) == 0)
    for (Elf_Scn* scn = nullptr; !found && (scn = elf_nextscn(elf, scn));) {
      GElf_Shdr shdr;
      const char* name = gelf_getshdr(scn, &shdr) ? elf_strptr(elf, shstrndx, shdr.sh_name) : nullptr;
      found = name && std::strcmp(name, wanted) == 0;
    }
  elf_end(elf);
  return found;
}

}  // namespace

Result<void> probe__check_entries(pid_t pid, const std::vector<Function>& functions) {
  auto mem = HOTFIX_TRY(ProcessMemory::open(pid));
  for (auto& f : functions) {
    size_t n = std::min<uint64_t>(kCompared, std::max<uint64_t>(f.size, 1));
    auto live = mem.read(f.address, n);
    UniqueFd fd(::open(f.object.c_str(), O_RDONLY | O_CLOEXEC));
    std::vector<uint8_t> file(n);
    if (!live || !fd || ::pread(fd.get(), file.data(), n, static_cast<off_t>(f.offset)) != static_cast<ssize_t>(n))
      continue;  // cannot compare (file replaced on disk): the attach itself will tell
    if (*live != file)
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
    if (has_section(o, ".gcc_except_table")) risky.insert(o);
  return {risky.begin(), risky.end()};
}

}  // namespace hotfix
