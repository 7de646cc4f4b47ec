#include "patch/abi_check.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>

#include "arch/arch.hpp"
#include "common/unique_fd.hpp"
#include "patch/engine.hpp"
#include "process/memory.hpp"

namespace hotfix {

namespace {

constexpr uint64_t kMaxBody = 1 << 16;  // longer bodies are read in part: the rest counts as unknown

const Function* replacement_in(const SymbolTable& fix, const std::string& symbol) {
  for (auto& f : fix.functions())
    if (f.mangled == symbol || std::find(f.aliases.begin(), f.aliases.end(), symbol) != f.aliases.end()) return &f;
  return nullptr;
}

std::optional<arch::CodeAt> file_code(const std::string& path, const Function& f) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd || f.size == 0) return std::nullopt;
  std::vector<uint8_t> bytes(std::min(f.size, kMaxBody));
  if (::pread(fd.get(), bytes.data(), bytes.size(), static_cast<off_t>(f.offset)) != static_cast<ssize_t>(bytes.size()))
    return std::nullopt;
  return arch::CodeAt{std::move(bytes), f.address};
}

// The code of a fix.so function from the bytes that were checked (not from the file again).
std::optional<arch::CodeAt> image_code(std::span<const uint8_t> image, const Function& f) {
  if (f.size == 0 || f.offset >= image.size()) return std::nullopt;
  auto len = std::min<uint64_t>({f.size, kMaxBody, image.size() - f.offset});
  return arch::CodeAt{std::vector<uint8_t>(image.begin() + f.offset, image.begin() + f.offset + len), f.address};
}

std::optional<arch::CodeAt> live_code(const ProcessMemory& mem, const Function& f) {
  if (f.size == 0) return std::nullopt;
  auto bytes = mem.read(f.address, std::min(f.size, kMaxBody));
  if (!bytes) return std::nullopt;
  return arch::CodeAt{std::move(*bytes), f.address};
}

}  // namespace

Result<void> abi__check_replacement(const AbiCheckInput& in) {
  const Function* repl = replacement_in(in.fix, in.replacement);
  auto old_code = live_code(in.memory, in.original);
  auto fix_code = [&](const Function& f) {
    return in.fix_bytes.empty() ? file_code(f.object, f) : image_code(in.fix_bytes, f);
  };
  std::optional<arch::CodeAt> new_code = repl ? fix_code(*repl) : std::nullopt;
  if (!old_code || !new_code) return {};  // nothing to compare: the planner reports missing pieces

  auto live_callee = [&](uint64_t entry) -> std::optional<arch::CodeAt> {
    const Function* f = in.target.function_at(entry);
    return f && f->address == entry ? live_code(in.memory, *f) : std::nullopt;
  };
  auto fix_callee = [&](uint64_t entry) -> std::optional<arch::CodeAt> {
    const Function* f = in.fix.function_at(entry);
    return f && f->address == entry ? fix_code(*f) : std::nullopt;
  };
  auto before = arch::clobbered_registers(old_code->bytes, old_code->address, live_callee);
  auto after = arch::clobbered_registers(new_code->bytes, new_code->address, fix_callee);
  uint64_t excess = arch::clobber_excess(before, after);
  if (!excess) return {};
  return fail(fmt::format("the replacement of {} changes {}, which the original never does: callers compiled with "
                          "GCC's -fipa-ra (the default at -O2) may keep live values there across the call",
                          in.original.name, arch::register_names(excess)),
              fmt::format("rebuild fix.so with `{}` so the replacement preserves them, or pass --no-abi-check if no "
                          "caller of it was compiled in the same file with optimisation",
                          arch::preserve_flags(excess)));
}

Result<void> abi__check_call_sites(PreparedPatch& p, const ProcessMemory& memory) {
  auto fix_table = HOTFIX_TRY(SymbolTable::for_image(p.fix.bytes, p.options.library));
  for (auto& s : p.switches)
    HOTFIX_CHECK(abi__check_replacement({p.table, memory, s.entry.target, fix_table, s.entry.replacement, p.fix.bytes}));
  return {};
}

}  // namespace hotfix
