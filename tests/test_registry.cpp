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

namespace {

PatchRecord cycle_record(uint32_t id, bool released) {
  PatchRecord p = sample().patches[0];
  p.id = id;
  p.state = PatchState::reverted;
  p.released = released;
  p.reverted_ns = 1764180000000000000ull + id;
  p.loaded_copy = "/run/hotfix/42/" + std::to_string(id) + "-fix.so";
  return p;
}

// The header hotfix writes (magic, length, FNV-1a of the text) around any text.
std::vector<uint8_t> framed(const std::string& text) {
  uint32_t h = 2166136261u;
  for (unsigned char c : text) h = (h ^ c) * 16777619u;
  std::vector<uint8_t> out = {'H', 'F', 'X', 'R', 'E', 'G', '0', '1'};
  uint32_t len = static_cast<uint32_t>(text.size());
  for (uint32_t v : {len, h})
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
  out.insert(out.end(), text.begin(), text.end());
  return out;
}

std::string text_of(const Registry& r) {
  auto bytes = registry__encode(r);
  return std::string(bytes.begin() + 16, bytes.end());
}

}  // namespace

TEST_CASE("compaction keeps the registry's size bounded over thousands of patches", "[registry][compact]") {
  Registry r;
  size_t at_1100 = 0;
  for (uint32_t id = 1; id <= 5000; ++id) {  // what 5000 patch/revert cycles leave, compacted at every write
    r.patches.push_back(cycle_record(id, true));
    r.next_id = id + 1;
    registry__compact(r);
    if (id == 1100) at_1100 = registry__encode(r).size();  // ids have 4 digits from here on
  }
  auto bytes = registry__encode(r);
  // 3,900 patches later: the same records' worth of bytes (only numbers change), not 3,900 records' worth.
  CHECK(bytes.size() <= at_1100 + 16);
  CHECK(bytes.size() < 8 * 1024);
  CHECK(r.patches.size() == kKeptReleased);
  CHECK(r.pruned.count == 5000 - kKeptReleased);
  CHECK(r.pruned.first_id == 1);
  CHECK(r.pruned.last_id == 5000 - kKeptReleased);
  CHECK(r.pruned.last_reverted_ns == 1764180000000000000ull + 5000 - kKeptReleased);
  CHECK(r.was_pruned(1));
  CHECK(r.was_pruned(5000 - kKeptReleased));
  CHECK_FALSE(r.was_pruned(5000 - kKeptReleased + 1));  // kept in full
  CHECK_FALSE(r.was_pruned(5001));                      // never issued

  auto back = registry__decode(bytes);
  REQUIRE(back);
  CHECK(back->next_id == 5001);
  CHECK(back->pruned.count == r.pruned.count);
  CHECK(back->pruned.last_id == r.pruned.last_id);
  REQUIRE(back->patches.size() == kKeptReleased);
  CHECK(back->patches.front().id == 5001 - kKeptReleased);
  CHECK(text_of(*back) == text_of(r));
}

TEST_CASE("compaction never drops active or held patches, and ids stay monotonic", "[registry][compact]") {
  Registry r;
  PatchRecord active = sample().patches[0];
  active.id = 1;
  r.patches.push_back(active);
  r.patches.push_back(cycle_record(2, false));  // reverted, memory held: a later revert releases it
  for (uint32_t id = 3; id <= 200; ++id) r.patches.push_back(cycle_record(id, true));
  r.next_id = 201;
  registry__compact(r);
  REQUIRE(r.patches.size() == 2 + kKeptReleased);
  CHECK(r.patches[0].id == 1);
  CHECK(r.patches[0].state == PatchState::active);
  CHECK(r.patches[1].id == 2);
  CHECK_FALSE(r.patches[1].released);
  CHECK(r.patches[2].id == 201 - kKeptReleased);
  CHECK(r.pruned.count == 198 - kKeptReleased);
  CHECK(r.pruned.first_id == 3);
  CHECK_FALSE(r.was_pruned(1));
  CHECK_FALSE(r.was_pruned(2));
  CHECK(r.top_at(0x401000)->id == 1);

  // A text whose next_id lags behind its records (or its summary) is refused: an id is never issued twice.
  auto text = text_of(r);
  auto at = text.find("next_id 201");
  REQUIRE(at != std::string::npos);
  text.replace(at, 11, "next_id 5");
  auto back = registry__decode(framed(text));
  REQUIRE_FALSE(back);
  CHECK(back.error().line().find("next_id") != std::string::npos);
  CHECK(registry__decode(framed(text_of(r))));
}

TEST_CASE("the decoder never throws: a bad line or summary is an error naming it", "[registry][decode]") {
  const std::string good = text_of(sample());
  for (std::string bad : {"patch 2 active 12 0 /x /run/hotfix/42/2-fix.so 0xZZ 0x0 0 strict 0x0 0x0",
                          "func 0x1 0x2 0x0 f30 e9 name", "what is this"}) {
    INFO(bad);
    std::string text = good;
    text.insert(text.find("end\n"), bad + "\n");
    auto r = registry__decode(framed(text));
    REQUIRE_FALSE(r);
    CHECK(r.error().line().find("damaged") != std::string::npos);
  }
  // A summary must come before the records, be consistent, and keep next_id above its ids.
  auto with_summary = [&](const std::string& line) {
    std::string text = good;
    text.insert(text.find("patch "), line + "\n");
    return registry__decode(framed(text));
  };
  auto ok = with_summary("pruned 1 1 1 7");
  REQUIRE(ok);
  CHECK(ok->pruned.count == 1);
  CHECK(ok->was_pruned(1));
  for (std::string bad : {"pruned -1 1 1 7", "pruned 5 1 2 7", "pruned 1 2 1 7", "pruned 1 1 9 7", "pruned 1 1"}) {
    INFO(bad);
    auto r = with_summary(bad);
    REQUIRE_FALSE(r);
    CHECK((r.error().line().find("pruned summary") != std::string::npos ||
           r.error().line().find("next_id") != std::string::npos));
  }
  uint32_t seed = 12345;
  for (int round = 0; round < 2000; ++round) {  // every mutation of the text decodes or fails cleanly
    std::string text = good;
    for (int k = 0; k < 4; ++k) {
      seed = seed * 1103515245u + 12345u;
      text[(seed >> 8) % text.size()] = static_cast<char>(seed >> 24);
    }
    CHECK_NOTHROW(registry__decode(framed(text)));
  }
}

TEST_CASE("a patch's uncovered places round-trip, capped and strictly parsed", "[registry][coverage]") {
  Registry r = sample();
  auto& p = r.patches[0];
  p.uncovered.push_back({"tax", "inlined", "checkout_a", "cov target.c", 22});
  p.uncovered.push_back({"scale", "clone", "scale.constprop.0", "", 0});
  p.uncovered.push_back({"price", "alias", "price_alias", "cov_target.c", 27});
  auto back = registry__decode(registry__encode(r));
  REQUIRE(back);
  REQUIRE(back->authentic);  // the new lines are under the MAC like every other line
  CHECK(back->patches[0].uncovered == p.uncovered);
  CHECK(back->patches[0].uncovered_more == 0);

  // More than the registry keeps: the rest is a count, and the decoder takes exactly that shape.
  for (int i = 0; i < 300; ++i) p.uncovered.push_back({"tax", "inlined", fmt::format("caller_{}", i), "a.c", 1});
  back = registry__decode(registry__encode(r));
  REQUIRE(back);
  CHECK(back->patches[0].uncovered.size() == kMaxRecordedUncovered);
  CHECK(back->patches[0].uncovered_more == 303 - kMaxRecordedUncovered);

  const std::string good = text_of(sample());
  auto with_line = [&](const std::string& line) {
    std::string text = good;
    text.insert(text.find("mac ") == std::string::npos ? text.find("end\n") : text.find("mac "), line + "\n");
    return registry__decode(framed(text));
  };
  auto ok = with_line("uncov inlined tax checkout_a a.c 12");
  REQUIRE(ok);
  CHECK(ok->patches[0].uncovered.size() == 1);
  for (std::string bad : {"uncov inline tax checkout_a a.c 12", "uncov inlined tax checkout_a a.c", "uncov inlined - x a.c 1",
                          "uncov clone tax - a.c 1", "uncov alias tax x a.c -3", "uncov alias tax x a.c 99999999999",
                          "uncov-more 5", "uncov alias tax x a.c 1 extra"}) {
    INFO(bad);
    auto r2 = with_line(bad);
    REQUIRE_FALSE(r2);
    CHECK(r2.error().line().find("damaged") != std::string::npos);
  }
  // Before any patch record an uncovered place belongs to nothing.
  std::string text = good;
  text.insert(text.find("patch "), "uncov inlined tax checkout_a a.c 12\n");
  CHECK_FALSE(registry__decode(framed(text)));
}

TEST_CASE("the fix's sha256 and the owner pid round-trip; records without them still decode", "[registry][targets]") {
  Registry r = sample();
  r.owner = 4242;
  r.patches[0].sha256 = std::string(64, 'a');
  auto back = registry__decode(registry__encode(r));
  REQUIRE(back);
  CHECK(back->owner == 4242);
  CHECK(back->patches[0].sha256 == std::string(64, 'a'));

  auto older = registry__decode(registry__encode(sample()));  // 13-word patch lines, no owner line
  REQUIRE(older);
  CHECK(older->owner == 0);
  CHECK(older->patches[0].sha256.empty());

  r.patches[0].sha256 = "not-a-digest";
  auto bad = registry__decode(registry__encode(r));
  REQUIRE_FALSE(bad);
  CHECK(bad.error().what.find("sha256") != std::string::npos);
}
