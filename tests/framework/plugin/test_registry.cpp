// Plugin discovery and refusal: good, wrong-ABI, duplicate, no-entry and
// not-a-library files in one folder; the good one loads, each other one is
// refused with a message naming the file and the reason. Then what is checked
// before dlopen: truncated and corrupt ELF files (made here from a real test
// plugin, cut or with one header field changed), folder entries that are not
// regular files, and files or folders that other users can write to.
#include <elf.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <optional>
#include <set>
#include <tuple>

#include "peftfw/error.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/persistence.hpp"
#include "peftfw/plugin/registry.hpp"

namespace fs = std::filesystem;
using peftfw::PluginRegistry;

namespace {
fs::path plugin_dir() {
  return fs::path(PEFTFW_TEST_PLUGIN_DIR);
}
const peftfw::RefusedPlugin* refused(const PluginRegistry& r, const std::string& file) {
  for (const auto& x : r.refused())
    if (x.file.filename() == file) return &x;
  return nullptr;
}
bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}
}  // namespace

TEST(Registry, LoadsGoodPluginsAndRefusesBadOnes) {
  PluginRegistry reg;
  reg.load_folder(plugin_dir());

  ASSERT_EQ(reg.loaded().size(), 1u);
  EXPECT_EQ(reg.loaded()[0].id, "test_good");
  EXPECT_EQ(reg.loaded()[0].kind, "persistence");
  EXPECT_EQ(reg.loaded()[0].version, "9.9.9");
  EXPECT_EQ(reg.persistence("test_good_format")->id(), "test_good_format");

  const auto* abi = refused(reg, "test_plugin_bad_abi.so");
  ASSERT_NE(abi, nullptr);
  EXPECT_NE(abi->reason.find("ABI version 999"), std::string::npos) << abi->reason;
  EXPECT_NE(abi->reason.find("ABI version 3"), std::string::npos) << abi->reason;

  const auto* dup = refused(reg, "test_plugin_good.so");
  const auto* dup2 = refused(reg, "test_plugin_duplicate.so");
  // Files load in name order: test_plugin_duplicate.so first, so test_plugin_good.so is the
  // duplicate. Exactly one of the two is refused for the id clash.
  ASSERT_TRUE((dup == nullptr) != (dup2 == nullptr));
  const auto* clash = dup ? dup : dup2;
  EXPECT_NE(clash->reason.find("'test_good' is already provided by"), std::string::npos)
      << clash->reason;

  const auto* none = refused(reg, "test_plugin_no_entry.so");
  ASSERT_NE(none, nullptr);
  EXPECT_NE(none->reason.find("does not export 'peftfw_plugin_entry_v1'"), std::string::npos);

  // A text file is refused from its first bytes, before dlopen sees it.
  const auto* text = refused(reg, "not_a_library.so");
  ASSERT_NE(text, nullptr);
  EXPECT_TRUE(contains(text->reason, "is not an ELF shared library")) << text->reason;
  EXPECT_TRUE(contains(text->reason, "found \"this is a text f")) << text->reason;
  EXPECT_EQ(reg.refused().size(), 4u);
}

TEST(Registry, LookupFailureListsWhatIsAvailable) {
  PluginRegistry reg;
  reg.load_folder(plugin_dir());
  try {
    reg.persistence("gguf");
    FAIL() << "expected InputError";
  } catch (const peftfw::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("available formats: test_good_format"), std::string::npos)
        << e.what();
  }
}

TEST(Registry, BuildPluginFolderHoldsTheGranitePlugin) {
  // The process-wide registry searches bin/plugins next to the executable.
  const auto& loaded = PluginRegistry::instance().loaded();
  bool found = false;
  for (const auto& p : loaded) found |= p.id == "granite_hybrid";
  EXPECT_TRUE(found);
  EXPECT_EQ(PluginRegistry::instance().architecture_for_model_type("granitemoehybrid")->id(),
            "granite_hybrid");
  // The build's own plugin folder passes the permission checks as built (umask 022).
  const fs::path build_plugins = fs::read_symlink("/proc/self/exe").parent_path() / "plugins";
  for (const auto& r : PluginRegistry::instance().refused())
    EXPECT_NE(r.file.parent_path(), build_plugins) << r.file << ": " << r.reason;
  for (const auto& r : PluginRegistry::instance().refused())
    EXPECT_NE(r.file, build_plugins) << r.reason;
}

// ---- What is checked before dlopen ---------------------------------------------------------

namespace {

using Bytes = std::vector<char>;

Bytes read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_file(const fs::path& p, const Bytes& bytes, size_t n, fs::perms mode) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(n));
  out.close();
  fs::permissions(p, mode);
}

void write_file(const fs::path& p, const Bytes& bytes, fs::perms mode = fs::perms(0755)) {
  write_file(p, bytes, bytes.size(), mode);
}

// The real test plugin (id test_good) whose copies are cut or changed here.
Bytes good_plugin() { return read_bytes(plugin_dir() / "test_plugin_good.so"); }

// A fresh folder for one test, mode 0755 whatever the umask.
fs::path fresh_folder(const std::string& name) {
  const fs::path dir = fs::path(PEFTFW_TEST_BINARY_DIR) / "registry_files" / name;
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    // Folders made read-only or open by an earlier run: make them removable first.
    for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::end(it);
         it.increment(ec))
      if (it->is_directory(ec) && !it->is_symlink(ec))
        fs::permissions(it->path(), fs::perms(0755), ec);
    fs::remove_all(dir);
  }
  fs::create_directories(dir);
  fs::permissions(dir, fs::perms(0755));
  fs::permissions(dir.parent_path(), fs::perms(0755));
  return dir;
}

fs::path make_folder(const fs::path& dir, fs::perms mode = fs::perms(0755)) {
  fs::create_directory(dir);
  fs::permissions(dir, mode);
  return dir;
}

// The ELF header and program headers of a plugin image, edited in place.
template <typename T>
T get(const Bytes& b, uint64_t offset) {
  T value;
  std::memcpy(&value, b.data() + offset, sizeof(T));
  return value;
}
template <typename T>
void put(Bytes& b, uint64_t offset, const T& value) {
  std::memcpy(b.data() + offset, &value, sizeof(T));
}
Elf64_Ehdr header(const Bytes& b) { return get<Elf64_Ehdr>(b, 0); }
uint64_t phdr_offset(const Bytes& b, size_t i) {
  return header(b).e_phoff + i * sizeof(Elf64_Phdr);
}
Elf64_Phdr phdr(const Bytes& b, size_t i) { return get<Elf64_Phdr>(b, phdr_offset(b, i)); }
std::vector<size_t> phdrs_of_type(const Bytes& b, uint32_t type) {
  std::vector<size_t> out;
  for (size_t i = 0; i < header(b).e_phnum; ++i)
    if (phdr(b, i).p_type == type) out.push_back(i);
  return out;
}
Elf64_Shdr shdr(const Bytes& b, size_t i) {
  return get<Elf64_Shdr>(b, header(b).e_shoff + i * sizeof(Elf64_Shdr));
}
std::string section_name(const Bytes& b, size_t i) {
  const Elf64_Shdr names = shdr(b, header(b).e_shstrndx);
  return std::string(b.data() + names.sh_offset + shdr(b, i).sh_name);
}
// The file offset of a dynamic entry with `tag` (the first one).
std::optional<uint64_t> dynamic_entry(const Bytes& b, int64_t tag) {
  const Elf64_Phdr dyn = phdr(b, phdrs_of_type(b, PT_DYNAMIC).at(0));
  for (uint64_t off = dyn.p_offset; off + sizeof(Elf64_Dyn) <= dyn.p_offset + dyn.p_filesz;
       off += sizeof(Elf64_Dyn)) {
    const auto e = get<Elf64_Dyn>(b, off);
    if (e.d_tag == tag) return off;
    if (e.d_tag == DT_NULL) break;
  }
  return std::nullopt;
}

}  // namespace

TEST(RegistryFiles, TruncatedPluginIsRefusedAtEverySizeAndTheRestLoad) {
  // dlopen maps segments past the end of a cut file and dies of SIGBUS touching them; every
  // prefix of a real plugin must instead be refused with a reason, before dlopen.
  const Bytes full = good_plugin();
  ASSERT_GT(full.size(), 8192u);
  const Elf64_Ehdr eh = header(full);
  std::set<size_t> sizes = {0,  1,  4,  16, 63, 64, 65, eh.e_phoff + sizeof(Elf64_Phdr) - 1,
                            full.size() / 2, full.size() - 1, eh.e_shoff, eh.e_shoff + 1};
  for (size_t i = 0; i < eh.e_phnum; ++i) {
    const Elf64_Phdr p = phdr(full, i);
    if (p.p_filesz == 0) continue;
    sizes.insert(p.p_offset + 1);
    sizes.insert(p.p_offset + p.p_filesz - 1);
  }
  for (size_t s = 4096; s < full.size(); s += 4096) sizes.insert(s);
  for (size_t s = full.size() - 64; s < full.size(); ++s) sizes.insert(s);

  const fs::path dir = fresh_folder("truncated");
  for (size_t s : sizes) {
    ASSERT_LT(s, full.size());
    write_file(dir / ("cut_" + std::to_string(1000000000 + s) + ".so"), full, s, fs::perms(0755));
  }
  write_file(dir / "whole.so", full);

  PluginRegistry reg;
  reg.load_folder(dir);
  ASSERT_EQ(reg.loaded().size(), 1u);
  EXPECT_EQ(reg.loaded()[0].file.filename(), "whole.so");
  EXPECT_EQ(reg.refused().size(), sizes.size());
  std::map<size_t, std::string> reasons;
  for (const auto& r : reg.refused()) {
    const std::string name = r.file.filename().string();
    ASSERT_EQ(name.rfind("cut_", 0), 0u) << name << ": " << r.reason;
    reasons[std::stoull(name.substr(4)) - 1000000000] = r.reason;
  }
  for (size_t s : sizes) {
    ASSERT_TRUE(reasons.count(s)) << "a copy cut at " << s << " bytes was not refused";
    const std::string& why = reasons[s];
    if (s == 0) {
      EXPECT_TRUE(contains(why, "is empty (0 bytes)")) << why;
    } else {
      EXPECT_TRUE(contains(why, "truncated")) << s << " bytes: " << why;
      EXPECT_TRUE(contains(why, "rebuild or reinstall the plugin")) << s << " bytes: " << why;
    }
  }
  EXPECT_TRUE(contains(reasons[64], "its program header table")) << reasons[64];
  EXPECT_TRUE(contains(reasons[full.size() - 1], "its section header table"))
      << reasons[full.size() - 1];
  EXPECT_TRUE(contains(reasons[full.size() - 1],
                       "but the file has only " + std::to_string(full.size() - 1) + " bytes"))
      << reasons[full.size() - 1];
}

TEST(RegistryFiles, CorruptOrForeignElfHeadersAreRefusedWithTheReason) {
  const Bytes good = good_plugin();
  const Elf64_Ehdr eh = header(good);
  const std::vector<size_t> loads = phdrs_of_type(good, PT_LOAD);
  ASSERT_GE(loads.size(), 2u);
  const size_t dyn_index = phdrs_of_type(good, PT_DYNAMIC).at(0);

  struct Case {
    std::string name, expected;
    std::function<void(Bytes&)> change;
  };
  const uint16_t other_machine = eh.e_machine == EM_AARCH64 ? EM_X86_64 : EM_AARCH64;
  const std::string other_machine_name = eh.e_machine == EM_AARCH64 ? "x86-64" : "AArch64";
  std::vector<Case> cases = {
      {"magic", "is not an ELF shared library", [](Bytes& b) { b[3] = 'G'; }},
      {"class32", "is a 32-bit ELF file", [](Bytes& b) { b[EI_CLASS] = ELFCLASS32; }},
      {"big_endian", "big-endian", [](Bytes& b) { b[EI_DATA] = ELFDATA2MSB; }},
      {"os_abi", "is built for OS ABI 9", [](Bytes& b) { b[EI_OSABI] = ELFOSABI_FREEBSD; }},
      {"machine", "is built for " + other_machine_name,
       [&](Bytes& b) { put(b, offsetof(Elf64_Ehdr, e_machine), other_machine); }},
      {"executable", "is an executable (ET_EXEC), not a shared library",
       [](Bytes& b) { put<Elf64_Half>(b, offsetof(Elf64_Ehdr, e_type), ET_EXEC); }},
      {"object", "is an object file (ET_REL)",
       [](Bytes& b) { put<Elf64_Half>(b, offsetof(Elf64_Ehdr, e_type), ET_REL); }},
      {"phentsize", "program header entry size 32",
       [](Bytes& b) { put<Elf64_Half>(b, offsetof(Elf64_Ehdr, e_phentsize), 32); }},
      {"phoff", "its program header table",
       [](Bytes& b) { put<Elf64_Off>(b, offsetof(Elf64_Ehdr, e_phoff), UINT64_MAX - 8); }},
      {"load_offset_overflows", "program header " + std::to_string(loads[1]) + " (PT_LOAD)",
       [&](Bytes& b) {
         put<Elf64_Off>(b, phdr_offset(b, loads[1]) + offsetof(Elf64_Phdr, p_offset),
                        UINT64_MAX - 16);
       }},
      {"load_filesz_past_end", "but the file has only " + std::to_string(good.size()) + " bytes",
       [&](Bytes& b) {
         put<Elf64_Xword>(b, phdr_offset(b, loads[1]) + offsetof(Elf64_Phdr, p_filesz),
                          b.size());
       }},
      {"load_filesz_above_memsz", "bytes of the file but only", [&](Bytes& b) {
         const Elf64_Phdr p = phdr(b, loads[0]);
         put<Elf64_Xword>(b, phdr_offset(b, loads[0]) + offsetof(Elf64_Phdr, p_memsz),
                          p.p_filesz - 1);
       }},
      {"load_alignment", "modulo its alignment", [&](Bytes& b) {
         put<Elf64_Xword>(b, phdr_offset(b, loads[1]) + offsetof(Elf64_Phdr, p_align), 3);
       }},
      {"loads_out_of_order", "loadable segments must ascend", [&](Bytes& b) {
         // Keep the address congruent to the offset, but move it into the first segment.
         const Elf64_Phdr p = phdr(b, loads[1]);
         const uint64_t moved = phdr(b, loads[0]).p_vaddr + p.p_vaddr % p.p_align;
         ASSERT_LT(moved, phdr(b, loads[0]).p_vaddr + phdr(b, loads[0]).p_memsz);
         put<Elf64_Addr>(b, phdr_offset(b, loads[1]) + offsetof(Elf64_Phdr, p_vaddr), moved);
       }},
      {"no_dynamic", "has no dynamic section (PT_DYNAMIC)", [&](Bytes& b) {
         put<Elf64_Word>(b, phdr_offset(b, dyn_index) + offsetof(Elf64_Phdr, p_type), PT_NULL);
       }},
      {"dynamic_outside", "its dynamic section", [&](Bytes& b) {
         const Elf64_Phdr last = phdr(b, loads.back());
         put<Elf64_Addr>(b, phdr_offset(b, dyn_index) + offsetof(Elf64_Phdr, p_vaddr),
                         last.p_vaddr + last.p_memsz + 0x100000);
       }},
      {"dynamic_unterminated", "no DT_NULL entry", [&](Bytes& b) {
         const Elf64_Phdr d = phdr(b, dyn_index);
         const uint64_t null_at = *dynamic_entry(b, DT_NULL);
         put<Elf64_Xword>(b, phdr_offset(b, dyn_index) + offsetof(Elf64_Phdr, p_filesz),
                          null_at - d.p_offset);
       }},
      {"strtab_outside", "its string table (DT_STRTAB)", [&](Bytes& b) {
         put<Elf64_Addr>(b, *dynamic_entry(b, DT_STRTAB) + offsetof(Elf64_Dyn, d_un),
                         uint64_t{1} << 40);
       }},
      {"needed_past_strtab", "its DT_NEEDED entry points to byte", [&](Bytes& b) {
         put<Elf64_Xword>(b, *dynamic_entry(b, DT_NEEDED) + offsetof(Elf64_Dyn, d_un),
                          uint64_t{1} << 32);
       }},
      {"shoff", "its section header table", [](Bytes& b) {
         put<Elf64_Off>(b, offsetof(Elf64_Ehdr, e_shoff), b.size() - 8);
       }},
      {"comment_section", "section", [&](Bytes& b) {
         for (size_t i = 1; i < header(b).e_shnum; ++i)
           if (section_name(b, i) == ".comment") {
             put<Elf64_Off>(b, header(b).e_shoff + i * sizeof(Elf64_Shdr) +
                                   offsetof(Elf64_Shdr, sh_offset),
                            b.size());
             return;
           }
         FAIL() << "the test plugin has no .comment section";
       }},
  };

  const fs::path dir = fresh_folder("corrupt");
  PluginRegistry reg;
  for (auto& c : cases) {
    Bytes b = good;
    c.change(b);
    ASSERT_FALSE(::testing::Test::HasFatalFailure()) << c.name;
    const fs::path file = dir / (c.name + ".so");
    write_file(file, b);
    EXPECT_FALSE(reg.load_file(file)) << c.name;
    ASSERT_EQ(reg.refused().size(), static_cast<size_t>(&c - cases.data()) + 1) << c.name;
    const auto& r = reg.refused().back();
    EXPECT_EQ(r.file, file);
    EXPECT_TRUE(contains(r.reason, c.expected)) << c.name << ": " << r.reason;
  }
  EXPECT_TRUE(contains(refused(reg, "comment_section.so")->reason, "'.comment'"))
      << refused(reg, "comment_section.so")->reason;
  EXPECT_TRUE(reg.loaded().empty());
  // The unchanged image loads: the refusals above come from the changes.
  write_file(dir / "unchanged.so", good);
  EXPECT_TRUE(reg.load_file(dir / "unchanged.so"));
}

TEST(RegistryFiles, EveryOddEntryOfAPluginFolderIsListedWithItsReason) {
  const fs::path root = fresh_folder("odd_entries");
  const fs::path dir = make_folder(root / "plugins");
  const fs::path elsewhere = make_folder(root / "elsewhere");
  write_file(elsewhere / "real_plugin.so", good_plugin());
  fs::create_symlink(elsewhere / "real_plugin.so", dir / "link.so");  // loads, through the link
  make_folder(dir / "x.so");
  ASSERT_EQ(::mkfifo((dir / "pipe.so").c_str(), 0644), 0);
  fs::create_symlink(dir / "missing_target.so", dir / "dangling.so");
  fs::create_symlink(dir / "loop.so", dir / "loop.so");
  write_file(dir / "empty.so", Bytes{});
  write_file(dir / "libextra.so.1", good_plugin());
  write_file(dir / "README.txt", Bytes{'h', 'i', '\n'}, fs::perms(0644));

  PluginRegistry reg;
  reg.load_folder(dir);
  ASSERT_EQ(reg.loaded().size(), 1u);
  EXPECT_EQ(reg.loaded()[0].file, dir / "link.so");

  const std::map<std::string, std::string> expected = {
      {"x.so", "is a folder, not a shared library"},
      {"pipe.so", "is a named pipe (FIFO), not a regular file"},
      {"dangling.so", "is a broken symbolic link: it points to '" +
                          (dir / "missing_target.so").string() + "', which does not exist"},
      {"loop.so", "symbolic link that never reaches a file"},
      {"empty.so", "is empty (0 bytes)"},
      {"libextra.so.1", "only names ending in '.so' are plugin files"},
  };
  std::set<std::string> listed;
  for (const auto& r : reg.refused()) listed.insert(r.file.filename().string());
  std::set<std::string> wanted;
  for (const auto& [name, why] : expected) wanted.insert(name);
  EXPECT_EQ(listed, wanted);  // README.txt is no plugin candidate: not listed
  for (const auto& [name, why] : expected) {
    const auto* r = refused(reg, name);
    ASSERT_NE(r, nullptr) << name;
    EXPECT_EQ(r->file, dir / name);
    EXPECT_TRUE(contains(r->reason, why)) << name << ": " << r->reason;
  }
}

TEST(RegistryFiles, UnreadablePluginFileIsListed) {
  if (::geteuid() == 0) GTEST_SKIP() << "root reads every file (tests/cli/test_plugin_files.py "
                                        "checks this case as an unprivileged user)";
  const fs::path dir = fresh_folder("unreadable");
  write_file(dir / "secret.so", good_plugin(), fs::perms(0000));
  PluginRegistry reg;
  reg.load_folder(dir);
  EXPECT_TRUE(reg.loaded().empty());
  ASSERT_EQ(reg.refused().size(), 1u);
  EXPECT_TRUE(contains(reg.refused()[0].reason, "cannot be read: Permission denied (mode 0000"))
      << reg.refused()[0].reason;
  fs::permissions(dir / "secret.so", fs::perms(0644));
}

TEST(RegistryFiles, APathEntryThatIsAFileIsRefusedAndAMissingFolderIsNot) {
  PluginRegistry reg;
  reg.load_folder(plugin_dir() / "test_plugin_good.so");
  reg.load_folder(plugin_dir() / "no_such_folder");
  ASSERT_EQ(reg.refused().size(), 1u);
  EXPECT_EQ(reg.refused()[0].file, plugin_dir() / "test_plugin_good.so");
  EXPECT_TRUE(contains(reg.refused()[0].reason, "is a regular file, not a folder"))
      << reg.refused()[0].reason;
  EXPECT_TRUE(reg.loaded().empty());
}

TEST(RegistryFiles, PluginFilesAndFoldersOthersCanWriteAreRefusedWithPathAndMode) {
  const fs::path root = fresh_folder("writable");
  const Bytes plugin = good_plugin();

  // A plugin file anyone can write; its neighbour with the same bytes and mode 0755 loads.
  const fs::path dir = make_folder(root / "plugins");
  write_file(dir / "a_open.so", plugin, fs::perms(0666));
  write_file(dir / "b_closed.so", plugin, fs::perms(0755));
  // A link to a file anyone can write: the file that would be loaded is named.
  const fs::path elsewhere = make_folder(root / "elsewhere");
  write_file(elsewhere / "target.so", plugin, fs::perms(0777));
  fs::create_symlink(elsewhere / "target.so", dir / "c_link.so");
  // A link into a folder anyone can write: the file itself could be replaced.
  const fs::path open_elsewhere = make_folder(root / "open_elsewhere", fs::perms(0777));
  write_file(open_elsewhere / "target.so", plugin, fs::perms(0755));
  fs::create_symlink(open_elsewhere / "target.so", dir / "d_link.so");
  {
    PluginRegistry reg;
    reg.load_folder(dir);
    ASSERT_EQ(reg.loaded().size(), 1u);
    EXPECT_EQ(reg.loaded()[0].file.filename(), "b_closed.so");
    ASSERT_EQ(reg.refused().size(), 3u);
    const auto* open = refused(reg, "a_open.so");
    ASSERT_NE(open, nullptr);
    EXPECT_TRUE(contains(open->reason, (dir / "a_open.so").string() +
                                           " is writable by every user (mode 0666)"))
        << open->reason;
    EXPECT_TRUE(contains(open->reason, "chmod go-w")) << open->reason;
    const auto* link = refused(reg, "c_link.so");
    ASSERT_NE(link, nullptr);
    EXPECT_TRUE(contains(link->reason, (elsewhere / "target.so").string() +
                                           " is writable by every user (mode 0777)"))
        << link->reason;
    const auto* in_open = refused(reg, "d_link.so");
    ASSERT_NE(in_open, nullptr);
    EXPECT_TRUE(contains(in_open->reason, "its folder " + open_elsewhere.string() +
                                              " is writable by every user (mode 0777)"))
        << in_open->reason;
  }

  // A plugin folder anyone can write, with or without the sticky bit (like /tmp), is refused
  // as a whole: anyone could have put any of its files there.
  const std::vector<std::tuple<std::string, unsigned, std::string>> open_folders = {
      {"open_folder", 0777, "0777"}, {"sticky_folder", 01777, "1777"}};
  for (const auto& [name, mode, shown] : open_folders) {
    const fs::path folder = make_folder(root / name);
    write_file(folder / "plugin.so", plugin, fs::perms(0755));
    ASSERT_EQ(::chmod(folder.c_str(), mode), 0);
    PluginRegistry reg;
    reg.load_folder(folder);
    EXPECT_TRUE(reg.loaded().empty()) << name;
    ASSERT_EQ(reg.refused().size(), 1u) << name;
    EXPECT_EQ(reg.refused()[0].file, folder);
    EXPECT_TRUE(contains(reg.refused()[0].reason, "plugin folder " + folder.string() +
                                                      " is writable by every user (mode " +
                                                      shown + ")"))
        << reg.refused()[0].reason;
    EXPECT_TRUE(contains(reg.refused()[0].reason, "nothing in it is loaded"))
        << reg.refused()[0].reason;
    ASSERT_EQ(::chmod(folder.c_str(), 0755), 0);
  }
}

namespace {
// A group the current user may give files to that is not the user's own private group, so that
// its members are other people.
std::optional<gid_t> shared_group() {
  if (::geteuid() == 0) {
    if (const struct group* g = ::getgrnam("users")) return g->gr_gid;
    return std::nullopt;
  }
  const struct passwd* me = ::getpwuid(::geteuid());
  std::vector<gid_t> groups(static_cast<size_t>(std::max(::getgroups(0, nullptr), 0)));
  groups.resize(static_cast<size_t>(std::max(::getgroups(static_cast<int>(groups.size()),
                                                         groups.data()), 0)));
  for (gid_t g : groups) {
    const struct group* gr = ::getgrgid(g);
    if (gr && me && std::string(gr->gr_name) != me->pw_name) return g;
  }
  return std::nullopt;
}
}  // namespace

TEST(RegistryFiles, GroupWritablePluginIsRefusedUnlessTheGroupIsTheOwnersOwn) {
  const fs::path dir = fresh_folder("group_writable");
  const Bytes plugin = good_plugin();

  // The owner's own group (Debian's user private groups, umask 002): nobody else is in it.
  const struct passwd* me = ::getpwuid(::geteuid());
  ASSERT_NE(me, nullptr);
  const struct group* own = ::getgrgid(me->pw_gid);
  const bool private_group =
      own && std::string(own->gr_name) == me->pw_name &&
      (own->gr_mem[0] == nullptr ||
       (std::string(own->gr_mem[0]) == me->pw_name && own->gr_mem[1] == nullptr));
  if (private_group) {
    write_file(dir / "mine.so", plugin, fs::perms(0775));
    ASSERT_EQ(::chown((dir / "mine.so").c_str(), ::geteuid(), me->pw_gid), 0);
    PluginRegistry reg;
    EXPECT_TRUE(reg.load_file(dir / "mine.so"))
        << (reg.refused().empty() ? "" : reg.refused()[0].reason);
  }

  const auto group = shared_group();
  if (!group) GTEST_SKIP() << "no group to hand the file to that has other members";
  write_file(dir / "shared.so", plugin, fs::perms(0775));
  ASSERT_EQ(::chown((dir / "shared.so").c_str(), ::geteuid(), *group), 0);
  PluginRegistry reg;
  EXPECT_FALSE(reg.load_file(dir / "shared.so"));
  ASSERT_EQ(reg.refused().size(), 1u);
  EXPECT_TRUE(contains(reg.refused()[0].reason,
                       (dir / "shared.so").string() + " is writable by the members of group " +
                           ::getgrgid(*group)->gr_name))
      << reg.refused()[0].reason;
  EXPECT_TRUE(contains(reg.refused()[0].reason, "(mode 0775)")) << reg.refused()[0].reason;
}

TEST(RegistryFiles, PluginOwnedByAnotherUserIsRefused) {
  if (::geteuid() != 0) GTEST_SKIP() << "only root can give a file to another user";
  const struct passwd* nobody = ::getpwnam("nobody");
  ASSERT_NE(nobody, nullptr);
  const fs::path root = fresh_folder("other_owner");
  const fs::path dir = make_folder(root / "plugins");
  write_file(dir / "theirs.so", good_plugin(), fs::perms(0755));
  ASSERT_EQ(::chown((dir / "theirs.so").c_str(), nobody->pw_uid, nobody->pw_gid), 0);
  const fs::path folder = make_folder(root / "their_folder");
  write_file(folder / "plugin.so", good_plugin(), fs::perms(0755));
  ASSERT_EQ(::chown(folder.c_str(), nobody->pw_uid, nobody->pw_gid), 0);

  PluginRegistry reg;
  reg.load_folder(dir);
  reg.load_folder(folder);
  EXPECT_TRUE(reg.loaded().empty());
  ASSERT_EQ(reg.refused().size(), 2u);
  const std::string owner = "is owned by nobody (uid " + std::to_string(nobody->pw_uid) + ")";
  EXPECT_EQ(reg.refused()[0].file, dir / "theirs.so");
  EXPECT_TRUE(contains(reg.refused()[0].reason, (dir / "theirs.so").string() + " " + owner))
      << reg.refused()[0].reason;
  EXPECT_TRUE(contains(reg.refused()[0].reason, "(mode 0755)")) << reg.refused()[0].reason;
  EXPECT_EQ(reg.refused()[1].file, folder);
  EXPECT_TRUE(contains(reg.refused()[1].reason, "plugin folder " + folder.string() + " " + owner))
      << reg.refused()[1].reason;
}

// Adapter interface v2: an adapter plugin built outside the tree (the worked example of
// docs/writing_plugins.md) joins the recipe schema with its method and own section; a plugin
// whose method another plugin already provides is refused with the reason.
TEST(Registry, AdapterPluginJoinsTheRecipeSchema) {
  PluginRegistry reg;
  for (const auto& folder : peftfw::default_plugin_folders()) reg.load_folder(folder);
  const fs::path dir = PEFTFW_TEST_ADAPTER_DIR;
  ASSERT_TRUE(reg.load_file(dir / "ok" / "ln_tuning.so"));
  EXPECT_FALSE(reg.load_file(dir / "clash" / "ln_tuning_clash.so"));
  const auto* clash = refused(reg, "ln_tuning_clash.so");
  ASSERT_NE(clash, nullptr);
  EXPECT_TRUE(contains(clash->reason, "method 'lora' is already provided by adapter plugin 'lora'")) << clash->reason;

  const auto& schema = reg.recipe_schema();
  const auto* method = schema.find_key("adapter", "method");
  ASSERT_NE(method, nullptr);
  EXPECT_EQ(method->choices.front(), "none");
  EXPECT_NE(std::find(method->choices.begin(), method->choices.end(), "ln_tuning"), method->choices.end());
  EXPECT_NE(std::find(method->choices.begin(), method->choices.end(), "dora"), method->choices.end());
  ASSERT_TRUE(method->default_value.has_value());
  EXPECT_EQ(std::get<std::string>(*method->default_value), "lora");  // the lora plugin's flagged default
  EXPECT_TRUE(contains(method->doc, "ln_tuning: trains the weights of the norm layers")) << method->doc;
  // The lora plugin's keys follow method in [adapter]; [ln_tuning] follows [adapter].
  const auto* adapter = schema.find_section("adapter");
  ASSERT_NE(adapter, nullptr);
  ASSERT_GE(adapter->keys.size(), 2u);
  EXPECT_EQ(adapter->keys[1].name, "r");
  std::vector<std::string> order;
  for (const auto& s : schema.sections) order.push_back(s.name);
  const auto at = std::find(order.begin(), order.end(), "adapter");
  ASSERT_NE(at, order.end());
  // Plugin sections sit between [adapter] and the next built-in section, [ssm].
  const auto ln = std::find(order.begin(), order.end(), "ln_tuning");
  const auto ssm = std::find(order.begin(), order.end(), "ssm");
  ASSERT_NE(ln, order.end());
  EXPECT_TRUE(at < ln && ln < ssm) << "ln_tuning at " << (ln - order.begin()) << ", adapter at "
                                   << (at - order.begin()) << ", ssm at " << (ssm - order.begin());
  ASSERT_NE(schema.find_key("ln_tuning", "final_norm"), nullptr);
  // The built-in schema alone has method "none" and no LoRA keys: the framework names no method.
  const auto* builtin = peftfw::recipe::builtin_schema().find_key("adapter", "method");
  ASSERT_NE(builtin, nullptr);
  EXPECT_EQ(builtin->choices, std::vector<std::string>{"none"});
  EXPECT_EQ(peftfw::recipe::builtin_schema().find_key("adapter", "r"), nullptr);
}
