// The provenance stamp: which build of which object a fix library was built for. Written by
// `hotfix-ctl build` (and hotfix_add_patch) as an ELF note in fix.so -- section
// `.note.hotfix.target`, owner "hotfix", type kStampNoteType, descriptor
// "build-id=HEX\0object=PATH\0" -- and checked by `patch` (patch/provenance.hpp).
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/error.hpp"

namespace hotfix {

constexpr const char* kStampNoteName = "hotfix";
constexpr uint32_t kStampNoteType = 0x48460001;  // "HF" + 1: the target object's build
constexpr const char* kStampSection = ".note.hotfix.target";

struct Stamp {
  std::string build_id;  // hex
  std::string object;    // the target object's path when fix.so was built
};

// A C/C++ source (one top-level asm statement, valid in both) that puts the stamp note into
// whatever it is linked into.
std::string stamp__source(const Stamp& s);

// The stamps in ELF bytes (fix.so as read once); empty when it has none.
Result<std::vector<Stamp>> stamp__read(std::span<const uint8_t> elf_bytes);

}  // namespace hotfix
