// The in-target registry's serialised form: what one hotfix-ctl writes, the next one reads.
#include <catch2/catch.hpp>

#include "patch/registry.hpp"

using namespace hotfix;

namespace {
Registry sample() {
  Registry r;
  r.next_id = 3;
  PatchRecord p;
  p.id = 2;
  p.state = PatchState::active;
  p.applied_ns = 1764180000123456789ull;
  p.library = "/tmp/my fixes/fix 100%.so";
  p.loaded_copy = "/run/hotfix/42/2-fix.so";
  p.handle = 0x5555deadbeef;
  p.load_base = 0x7f0000000000;
  p.consistency = "strict";
  p.functions.push_back({"_ZN7pricing12vip_discountERKNS_8CustomerE", 0x401000, 0x7f0000001100, 0,
                         {0xf3, 0x0f, 0x1e, 0xfa, 0x55}, {0xe9, 1, 2, 3, 4}});
  r.patches.push_back(p);
  return r;
}
}  // namespace

TEST_CASE("registry round-trips through its serialised form") {
  auto bytes = registry__encode(sample());
  auto back = registry__decode(bytes);
  REQUIRE(back);
  REQUIRE(back->next_id == 3);
  REQUIRE(back->patches.size() == 1);
  auto& p = back->patches[0];
  CHECK(p.library == "/tmp/my fixes/fix 100%.so");
  CHECK(p.applied_ns == 1764180000123456789ull);
  CHECK(p.handle == 0x5555deadbeef);
  REQUIRE(p.functions.size() == 1);
  CHECK(p.functions[0].original == std::vector<uint8_t>{0xf3, 0x0f, 0x1e, 0xfa, 0x55});
  CHECK(p.functions[0].mangled == "_ZN7pricing12vip_discountERKNS_8CustomerE");
  CHECK(back->top_at(0x401000)->id == 2);
  CHECK(back->top_at(0x401001) == nullptr);
}

TEST_CASE("a torn registry write is detected, a fresh mapping reads as empty") {
  auto bytes = registry__encode(sample());
  bytes[bytes.size() / 2] ^= 0x20;
  CHECK_FALSE(registry__decode(bytes));
  auto empty = registry__decode(std::vector<uint8_t>(64, 0));
  REQUIRE(empty);
  CHECK(empty->patches.empty());
}
