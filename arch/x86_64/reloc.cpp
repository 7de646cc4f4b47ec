// Which x86-64 dynamic relocations the binder can redo by hand (see arch.hpp).
#include <elf.h>

#include "arch/arch.hpp"

namespace hotfix::arch {

RelocKind reloc_kind(uint32_t type) {
  switch (type) {
    case R_X86_64_GLOB_DAT:   // GOT entry of a variable or of a -fno-plt call
    case R_X86_64_JUMP_SLOT:  // PLT's GOT slot
      return RelocKind::got;
    case R_X86_64_64:  // an absolute pointer in data, e.g. `int* p = &counter;`
      return RelocKind::absolute64;
    default:
      return RelocKind::unsupported;
  }
}

bool reloc_is_irelative(uint32_t type) { return type == R_X86_64_IRELATIVE; }

std::string reloc_name(uint32_t type) {
  switch (type) {
    case R_X86_64_GLOB_DAT: return "R_X86_64_GLOB_DAT";
    case R_X86_64_JUMP_SLOT: return "R_X86_64_JUMP_SLOT";
    case R_X86_64_64: return "R_X86_64_64";
    case R_X86_64_PC32: return "R_X86_64_PC32";
    case R_X86_64_COPY: return "R_X86_64_COPY";
    case R_X86_64_DTPMOD64: return "R_X86_64_DTPMOD64 (thread-local)";
    case R_X86_64_DTPOFF64: return "R_X86_64_DTPOFF64 (thread-local)";
    case R_X86_64_TPOFF64: return "R_X86_64_TPOFF64 (thread-local)";
    case R_X86_64_IRELATIVE: return "R_X86_64_IRELATIVE";
    default: return "relocation type " + std::to_string(type);
  }
}

}  // namespace hotfix::arch
