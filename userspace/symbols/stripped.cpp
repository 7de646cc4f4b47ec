// See stripped.hpp.
#include "symbols/stripped.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <gelf.h>
#include <libelf.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>

#include "common/spawn.hpp"
#include "common/unique_fd.hpp"

namespace hotfix {

namespace {

// dpkg-query's stdout ("" on any failure).
std::string dpkg_query_owner(const std::string& path) {
  auto c = spawn__capture({"dpkg-query", "-S", path});
  return c.exited_zero ? c.out : "";
}

bool has_symtab(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return true;  // unreadable: no claim about it
  elf_version(EV_CURRENT);
  Elf* elf = elf_begin(fd.get(), ELF_C_READ_MMAP, nullptr);
  if (!elf) return true;
  bool found = false;
  for (Elf_Scn* scn = nullptr; !found && (scn = elf_nextscn(elf, scn));) {
    GElf_Shdr shdr;
    found = gelf_getshdr(scn, &shdr) && shdr.sh_type == SHT_SYMTAB;
  }
  elf_end(elf);
  return found;
}

}  // namespace

std::string symbols__owning_package(const std::string& path) {
  std::string out = dpkg_query_owner(path);
  if (out.empty() && path.starts_with("/usr/")) out = dpkg_query_owner(path.substr(4));
  auto colon = out.find(':');  // "coreutils: /bin/sleep" (or "pkg:amd64: /path")
  if (colon == std::string::npos) return "";
  std::string pkg = out.substr(0, colon);
  return pkg.find_first_of(" ,\n") == std::string::npos ? pkg : "";
}

std::string symbols__stripped_hint(const SymbolTable& table) {
  if (!table.pid()) return "";
  std::error_code ec;
  auto exe = std::filesystem::read_symlink(fmt::format("/proc/{}/exe", table.pid()), ec).string();
  if (ec) return "";
  const ObjectInfo* info = nullptr;
  for (auto& o : table.objects())
    if (o.path == exe) info = &o;
  if (!info || !info->debug_file.empty()) return "";
  // Read through the process's root: the program may live in another mount namespace.
  if (has_symtab(fmt::format("/proc/{}/root{}", table.pid(), exe))) return "";
  const char* env = std::getenv("HOTFIX_DEBUG_ROOT");
  std::string root = env && *env ? env : "/usr/lib/debug";
  std::string where = info->build_id.size() > 2
                          ? fmt::format("{}/.build-id/{}/{}.debug", root, info->build_id.substr(0, 2),
                                        info->build_id.substr(2))
                          : root + "/.build-id/";
  std::string package = symbols__owning_package(exe);
  std::string get = package.empty()
                        ? fmt::format("no Debian package owns it: rebuild it with -g and keep its symbols, or put its "
                                      "debug file at {}",
                                      where)
                        : fmt::format("install {}-dbgsym (the debug symbols of package {}, from the debian-debug "
                                      "archive), which puts its debug file at {}",
                                      package, package, where);
  return fmt::format("{} is stripped (no .symtab) and no debug file was found for it: {}; set HOTFIX_DEBUG_ROOT=DIR "
                     "to look for debug files under DIR instead of {}",
                     exe, get, root);
}

}  // namespace hotfix
