// What a plugin file or folder must pass before peftfw hands it to dlopen (see plugin_file.hpp).
//
// Before a file reaches dlopen it is examined with plain file I/O: what it is (a regular file,
// not a folder, pipe or broken link), who could have written it (ssh's rule for keys: only this
// user or root), and whether its ELF structure fits the file and this process. dlopen maps
// segments straight from the file, so a segment running past the end of a truncated copy is
// mapped anyway and the loader's first touch of a missing page kills the process with SIGBUS;
// checking every range against the file size first turns that into a refusal with a reason.
// The ELF checks guard against accidents (a copy cut short, a library built for another
// machine); a hostile library is kept out by the permission checks, not by them.
#include "plugin_file.hpp"

#include <elf.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

// The ELF header of the library this code is linked into, defined by the linker. Its class,
// byte order and machine are the running process's, which a plugin must share.
extern "C" const Elf64_Ehdr __ehdr_start __attribute__((visibility("hidden")));

namespace fs = std::filesystem;

namespace peftfw::plugin_file {

// ---- What a candidate file is, and who could have written it -----------------------------------

namespace {

static_assert(sizeof(void*) == 8, "the plugin file checks assume a 64-bit process (ELFCLASS64)");

constexpr const char* kRebuild =
    "; rebuild or reinstall the plugin (a copy may have been cut short)";

std::string num(uint64_t v) { return std::to_string(v); }

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string octal_mode(mode_t mode) {
  char buf[8];
  std::snprintf(buf, sizeof(buf), "%04o", static_cast<unsigned>(mode & 07777));
  return buf;
}

std::string quoted(const fs::path& p) { return "'" + p.string() + "'"; }

// True when [offset, offset + length) lies inside [0, size), computed without overflow.
bool within(uint64_t offset, uint64_t length, uint64_t size) {
  return offset <= size && length <= size - offset;
}

std::string file_type_name(mode_t mode) {
  if (S_ISDIR(mode)) return "a folder";
  if (S_ISFIFO(mode)) return "a named pipe (FIFO)";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISLNK(mode)) return "a symbolic link";
  if (S_ISREG(mode)) return "a regular file";
  return "a file of unknown type";
}

std::optional<std::string> user_name(uid_t uid) {
  std::vector<char> buf(16384);
  struct passwd pw {};
  struct passwd* found = nullptr;
  while (getpwuid_r(uid, &pw, buf.data(), buf.size(), &found) == ERANGE && buf.size() < (1u << 20))
    buf.resize(buf.size() * 2);
  if (!found) return std::nullopt;
  return std::string(pw.pw_name);
}

std::string user_label(uid_t uid) {
  auto name = user_name(uid);
  return name ? *name + " (uid " + num(uid) + ")" : "uid " + num(uid);
}

struct GroupInfo {
  std::string name;
  std::vector<std::string> members;
};

std::optional<GroupInfo> group_info(gid_t gid) {
  std::vector<char> buf(16384);
  struct group gr {};
  struct group* found = nullptr;
  while (getgrgid_r(gid, &gr, buf.data(), buf.size(), &found) == ERANGE && buf.size() < (1u << 20))
    buf.resize(buf.size() * 2);
  if (!found) return std::nullopt;
  GroupInfo info{gr.gr_name, {}};
  for (char** m = gr.gr_mem; m && *m; ++m) info.members.emplace_back(*m);
  return info;
}

// Debian and Ubuntu give every user a group of their own, named after them, and a umask of 002
// then makes new files group-writable. Like Debian's ssh, such a group counts as the owner alone.
bool is_owners_private_group(gid_t gid, uid_t owner) {
  auto user = user_name(owner);
  auto group = group_info(gid);
  if (!user || !group || group->name != *user) return false;
  for (const auto& m : group->members)
    if (m != *user) return false;
  return true;
}

// Who besides this user and root could change `st` (a plugin file or folder), e.g. "is writable
// by every user"; nullopt when nobody else could.
std::optional<std::string> writable_by_others(const struct stat& st) {
  const uid_t me = geteuid();
  if (st.st_uid != 0 && st.st_uid != me)
    return "is owned by " + user_label(st.st_uid) +
           (me == 0 ? ", not by root (you)" : ", not by you (" + user_label(me) + ") or root");
  if (st.st_mode & S_IWOTH) return "is writable by every user";
  if ((st.st_mode & S_IWGRP) && !is_owners_private_group(st.st_gid, st.st_uid)) {
    auto group = group_info(st.st_gid);
    return "is writable by the members of group " +
           (group ? group->name + " (gid " + num(st.st_gid) + ")" : "gid " + num(st.st_gid));
  }
  return std::nullopt;
}

// What to do about `path`, refused by writable_by_others.
std::string ownership_fix(const fs::path& path, const struct stat& st) {
  if (st.st_uid != 0 && st.st_uid != geteuid())
    return "`chown` it to yourself, or use a folder you own";
  return "`chmod go-w " + path.string() + "`";
}

class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// Reads exactly `n` bytes at `offset`; false on a short read or an I/O error.
bool read_exact(int fd, uint64_t offset, void* out, size_t n) {
  auto* p = static_cast<char*>(out);
  while (n > 0) {
    const ssize_t got = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    p += got;
    offset += static_cast<uint64_t>(got);
    n -= static_cast<size_t>(got);
  }
  return true;
}

// The first bytes of a file that is not ELF, as text a user can recognise.
std::string printable_prefix(const unsigned char* bytes, size_t n) {
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char c = bytes[i];
    if (c >= 0x20 && c < 0x7f && c != '\\' && c != '"') {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    }
  }
  return out;
}

std::string machine_name(unsigned machine) {
  std::string name;
  switch (machine) {
    case EM_X86_64: name = "x86-64"; break;
    case EM_386: name = "i386"; break;
    case EM_AARCH64: name = "AArch64"; break;
    case EM_ARM: name = "ARM"; break;
    case EM_RISCV: name = "RISC-V"; break;
    case EM_PPC64: name = "PowerPC 64"; break;
    case EM_S390: name = "s390"; break;
    default: name = "machine";
  }
  return name + " (e_machine " + num(machine) + ")";
}

std::string segment_name(size_t index, uint32_t type) {
  std::string name;
  switch (type) {
    case PT_LOAD: name = "PT_LOAD"; break;
    case PT_DYNAMIC: name = "PT_DYNAMIC"; break;
    case PT_INTERP: name = "PT_INTERP"; break;
    case PT_NOTE: name = "PT_NOTE"; break;
    case PT_PHDR: name = "PT_PHDR"; break;
    case PT_TLS: name = "PT_TLS"; break;
    case PT_GNU_EH_FRAME: name = "PT_GNU_EH_FRAME"; break;
    case PT_GNU_STACK: name = "PT_GNU_STACK"; break;
    case PT_GNU_RELRO: name = "PT_GNU_RELRO"; break;
#ifdef PT_GNU_PROPERTY
    case PT_GNU_PROPERTY: name = "PT_GNU_PROPERTY"; break;
#endif
    default: name = "type " + hex(type);
  }
  return "program header " + num(index) + " (" + name + ")";
}

// Checks one candidate's ELF structure against the file's size and this process, reading only
// headers and tables with pread. problem() is the first thing wrong, or nullopt.
class ElfCheck {
 public:
  ElfCheck(int fd, uint64_t size) : fd_(fd), size_(size) {}

  std::optional<std::string> problem() {
    if (auto p = header()) return p;
    if (auto p = segments()) return p;
    if (auto p = dynamic_section()) return p;
    return sections();
  }

 private:
  // Past the end of the file: the usual sign of a copy cut short.
  std::string cut(const std::string& what, uint64_t offset, uint64_t length) const {
    return "is truncated or corrupt: " + what + " needs " + num(length) + " bytes from byte " +
           num(offset) + ", but the file has only " + num(size_) + " bytes" + kRebuild;
  }
  std::string corrupt(const std::string& what) const {
    return "is a corrupt ELF file: " + what + kRebuild;
  }
  std::string unreadable() const {
    const int err = errno;
    return std::string("could not be read: ") + std::strerror(err) +
           "; check the disk and the file";
  }

  std::optional<std::string> header() {
    if (size_ == 0)
      return std::string("is empty (0 bytes), expected an ELF shared library") + kRebuild;
    unsigned char ident[EI_NIDENT] = {};
    const size_t n = static_cast<size_t>(std::min<uint64_t>(size_, EI_NIDENT));
    if (!read_exact(fd_, 0, ident, n)) return unreadable();
    if (std::memcmp(ident, ELFMAG, std::min<size_t>(n, SELFMAG)) != 0)
      return "is not an ELF shared library: expected the bytes \"\\x7fELF\" at its start, "
             "found \"" +
             printable_prefix(ident, n) +
             "\"; only shared libraries built as in docs/writing_plugins.md can be plugins";
    if (n < EI_NIDENT)  // also a cut inside the magic bytes
      return "is truncated: " + num(size_) + " bytes, shorter than the " + num(EI_NIDENT) +
             "-byte ELF identification" + kRebuild;
    const unsigned char* own = __ehdr_start.e_ident;
    if (ident[EI_CLASS] != own[EI_CLASS])
      return std::string("is a ") + (ident[EI_CLASS] == ELFCLASS32 ? "32-bit" : "unknown-class") +
             " ELF file (EI_CLASS " + num(ident[EI_CLASS]) + "), but this peftfw is 64-bit " +
             "(EI_CLASS " + num(own[EI_CLASS]) +
             "); build the plugin for the same machine as peftfw";
    if (ident[EI_DATA] != own[EI_DATA])
      return "has byte order EI_DATA " + num(ident[EI_DATA]) + " (" +
             (ident[EI_DATA] == ELFDATA2MSB ? "big-endian" : "not little-endian") +
             "), but this peftfw's is EI_DATA " + num(own[EI_DATA]) +
             "; build the plugin for the same machine as peftfw";
    if (ident[EI_VERSION] != EV_CURRENT)
      return corrupt("ELF identification version " + num(ident[EI_VERSION]) + ", expected " +
                     num(EV_CURRENT));
    if (ident[EI_OSABI] != ELFOSABI_SYSV && ident[EI_OSABI] != ELFOSABI_GNU)
      return "is built for OS ABI " + num(ident[EI_OSABI]) + ", expected " + num(ELFOSABI_SYSV) +
             " (System V) or " + num(ELFOSABI_GNU) +
             " (GNU/Linux); build the plugin on this system";
    if (size_ < sizeof(Elf64_Ehdr))
      return "is truncated: " + num(size_) + " bytes, shorter than the " +
             num(sizeof(Elf64_Ehdr)) + "-byte ELF header" + kRebuild;
    if (!read_exact(fd_, 0, &eh_, sizeof(eh_))) return unreadable();
    if (eh_.e_type != ET_DYN) {
      std::string found = eh_.e_type == ET_EXEC  ? "an executable (ET_EXEC)"
                          : eh_.e_type == ET_REL ? "an object file (ET_REL)"
                          : eh_.e_type == ET_CORE ? "a core dump (ET_CORE)"
                                                  : "of ELF type " + num(eh_.e_type);
      return "is " + found +
             ", not a shared library (ET_DYN); build plugins with add_library(NAME MODULE ...)";
    }
    if (eh_.e_machine != __ehdr_start.e_machine)
      return "is built for " + machine_name(eh_.e_machine) + ", but this peftfw runs on " +
             machine_name(__ehdr_start.e_machine) + "; build the plugin for this machine";
    if (eh_.e_version != EV_CURRENT)
      return corrupt("ELF version " + num(eh_.e_version) + ", expected " + num(EV_CURRENT));
    if (eh_.e_ehsize != sizeof(Elf64_Ehdr))
      return corrupt("ELF header size " + num(eh_.e_ehsize) + ", expected " +
                     num(sizeof(Elf64_Ehdr)));
    return std::nullopt;
  }

  std::optional<std::string> segments() {
    if (eh_.e_phentsize != sizeof(Elf64_Phdr))
      return corrupt("program header entry size " + num(eh_.e_phentsize) + ", expected " +
                     num(sizeof(Elf64_Phdr)));
    if (eh_.e_phnum == 0) return corrupt("no program headers, so nothing of it can be loaded");
    if (eh_.e_phnum == PN_XNUM)
      return corrupt("extended program header numbering (PN_XNUM), which the loader does not take");
    const uint64_t table = uint64_t{eh_.e_phnum} * sizeof(Elf64_Phdr);
    if (!within(eh_.e_phoff, table, size_))
      return cut("its program header table (" + num(eh_.e_phnum) + " entries)", eh_.e_phoff,
                 table);
    ph_.resize(eh_.e_phnum);
    if (!read_exact(fd_, eh_.e_phoff, ph_.data(), table)) return unreadable();
    uint64_t previous_end = 0;
    for (size_t i = 0; i < ph_.size(); ++i) {
      const Elf64_Phdr& p = ph_[i];
      if (p.p_type == PT_NULL) continue;
      const std::string what = segment_name(i, p.p_type);
      if (!within(p.p_offset, p.p_filesz, size_)) return cut(what, p.p_offset, p.p_filesz);
      if (p.p_memsz > UINT64_MAX - p.p_vaddr)
        return corrupt(what + " has an address range that overflows (address " + hex(p.p_vaddr) +
                       ", " + num(p.p_memsz) + " bytes)");
      if (p.p_type != PT_LOAD) continue;
      if (p.p_filesz > p.p_memsz)
        return corrupt(what + " holds " + num(p.p_filesz) + " bytes of the file but only " +
                       num(p.p_memsz) + " bytes of memory");
      if (p.p_align > 1 && ((p.p_align & (p.p_align - 1)) != 0 ||
                            (p.p_vaddr - p.p_offset) % p.p_align != 0))
        return corrupt(what + " has address " + hex(p.p_vaddr) + " and file offset " +
                       hex(p.p_offset) + ", which do not agree modulo its alignment " +
                       hex(p.p_align));
      // The loader reserves the range from the first PT_LOAD to the end of the last one and maps
      // each segment into it at a fixed address: out of order, one could land outside.
      if (!loads_.empty() && p.p_vaddr < previous_end)
        return corrupt(what + " starts at address " + hex(p.p_vaddr) +
                       ", inside or before the loadable segment before it (which ends at " +
                       hex(previous_end) + "); loadable segments must ascend without overlap");
      previous_end = p.p_vaddr + p.p_memsz;
      loads_.push_back(i);
    }
    if (loads_.empty()) return corrupt("no loadable segment (PT_LOAD)");
    return std::nullopt;
  }

  // The file offset of the addresses [vaddr, vaddr + length) when one loadable segment holds all
  // of them in its part backed by the file.
  std::optional<uint64_t> file_offset(uint64_t vaddr, uint64_t length) const {
    for (size_t i : loads_) {
      const Elf64_Phdr& p = ph_[i];
      if (vaddr >= p.p_vaddr && within(vaddr - p.p_vaddr, length, p.p_filesz))
        return p.p_offset + (vaddr - p.p_vaddr);
    }
    return std::nullopt;
  }

  std::optional<std::string> outside(const std::string& what, uint64_t vaddr,
                                     uint64_t length) const {
    if (file_offset(vaddr, length)) return std::nullopt;
    return corrupt(what + " (" + num(length) + " bytes at address " + hex(vaddr) +
                   ") lies outside the file contents of every loadable segment");
  }

  std::optional<std::string> dynamic_section() {
    const Elf64_Phdr* dyn = nullptr;
    for (const auto& p : ph_) {
      if (p.p_type != PT_DYNAMIC) continue;
      if (dyn) return corrupt("more than one dynamic section (PT_DYNAMIC)");
      dyn = &p;
    }
    if (!dyn)
      return "has no dynamic section (PT_DYNAMIC), so it is not a shared library; build plugins "
             "with add_library(NAME MODULE ...)";
    if (auto p = outside("its dynamic section", dyn->p_vaddr, dyn->p_filesz)) return p;
    // Real dynamic sections hold a few dozen entries; a huge one is a corrupt size.
    constexpr uint64_t kMaxEntries = 1 << 16;
    const uint64_t count = dyn->p_filesz / sizeof(Elf64_Dyn);
    if (count > kMaxEntries)
      return corrupt("a dynamic section of " + num(count) + " entries (at most " +
                     num(kMaxEntries) + " expected)");
    std::vector<Elf64_Dyn> entries(count);
    if (!read_exact(fd_, dyn->p_offset, entries.data(), count * sizeof(Elf64_Dyn)))
      return unreadable();

    std::optional<uint64_t> strtab, strsz, symtab;
    std::vector<std::pair<const char*, uint64_t>> names;  // string-table offsets
    struct Table {
      int64_t address_tag, size_tag;
      const char* name;
      std::optional<uint64_t> address, size;
    };
    std::vector<Table> tables = {
        {DT_RELA, DT_RELASZ, "its relocation table (DT_RELA)", {}, {}},
        {DT_REL, DT_RELSZ, "its relocation table (DT_REL)", {}, {}},
        {DT_JMPREL, DT_PLTRELSZ, "its PLT relocation table (DT_JMPREL)", {}, {}},
#ifdef DT_RELR
        {DT_RELR, DT_RELRSZ, "its relative relocation table (DT_RELR)", {}, {}},
#endif
        {DT_INIT_ARRAY, DT_INIT_ARRAYSZ, "its constructor table (DT_INIT_ARRAY)", {}, {}},
        {DT_FINI_ARRAY, DT_FINI_ARRAYSZ, "its destructor table (DT_FINI_ARRAY)", {}, {}},
        {DT_PREINIT_ARRAY, DT_PREINIT_ARRAYSZ, "its DT_PREINIT_ARRAY table", {}, {}},
        {DT_HASH, -1, "its symbol hash table (DT_HASH)", {}, uint64_t{8}},
        {DT_GNU_HASH, -1, "its symbol hash table (DT_GNU_HASH)", {}, uint64_t{16}},
        {DT_VERSYM, -1, "its symbol versions (DT_VERSYM)", {}, uint64_t{2}},
        {DT_VERDEF, -1, "its version definitions (DT_VERDEF)", {}, uint64_t{sizeof(Elf64_Verdef)}},
        {DT_VERNEED, -1, "its version needs (DT_VERNEED)", {}, uint64_t{sizeof(Elf64_Verneed)}},
        {DT_INIT, -1, "its initialisation function (DT_INIT)", {}, uint64_t{1}},
        {DT_FINI, -1, "its finalisation function (DT_FINI)", {}, uint64_t{1}},
    };
    bool terminated = false;
    for (const auto& e : entries) {
      if (e.d_tag == DT_NULL) {
        terminated = true;
        break;
      }
      const uint64_t v = e.d_un.d_val;
      switch (e.d_tag) {
        case DT_STRTAB: strtab = v; break;
        case DT_STRSZ: strsz = v; break;
        case DT_SYMTAB: symtab = v; break;
        case DT_NEEDED: names.emplace_back("DT_NEEDED", v); break;
        case DT_SONAME: names.emplace_back("DT_SONAME", v); break;
        case DT_RPATH: names.emplace_back("DT_RPATH", v); break;
        case DT_RUNPATH: names.emplace_back("DT_RUNPATH", v); break;
        default:
          for (auto& t : tables) {
            if (e.d_tag == t.address_tag) t.address = v;
            if (e.d_tag == t.size_tag) t.size = v;
          }
      }
    }
    if (!terminated) return corrupt("its dynamic section has no DT_NULL entry to end it");
    if (!strtab || !strsz || *strsz == 0 || !symtab)
      return corrupt("its dynamic section names no symbol table and string table "
                     "(DT_SYMTAB, DT_STRTAB, DT_STRSZ), so it cannot export a plugin entry point");
    if (auto p = outside("its string table (DT_STRTAB)", *strtab, *strsz)) return p;
    if (auto p = outside("its symbol table (DT_SYMTAB)", *symtab, sizeof(Elf64_Sym))) return p;
    char last = 1;
    if (!read_exact(fd_, *file_offset(*strtab, *strsz) + *strsz - 1, &last, 1)) return unreadable();
    if (last != '\0') return corrupt("its string table (DT_STRTAB) does not end with a NUL byte");
    for (const auto& [tag, offset] : names)
      if (offset >= *strsz)
        return corrupt(std::string("its ") + tag + " entry points to byte " + num(offset) +
                       " of a " + num(*strsz) + "-byte string table");
    for (const auto& t : tables) {
      if (!t.address) continue;
      if (auto p = outside(t.name, *t.address, t.size.value_or(0))) return p;
    }
    return std::nullopt;
  }

  // The loader does not read section headers, but they sit at the end of the file, so a table
  // past the end is the plainest sign of a copy cut short by a few bytes.
  std::optional<std::string> sections() {
    if (eh_.e_shoff == 0) return std::nullopt;  // stripped of section headers: nothing to check
    if (eh_.e_shentsize != sizeof(Elf64_Shdr))
      return corrupt("section header entry size " + num(eh_.e_shentsize) + ", expected " +
                     num(sizeof(Elf64_Shdr)));
    uint64_t count = eh_.e_shnum;
    if (count == 0) {  // more than SHN_LORESERVE sections: the count is in section 0's sh_size
      Elf64_Shdr first{};
      if (!within(eh_.e_shoff, sizeof(first), size_))
        return cut("its section header table", eh_.e_shoff, sizeof(first));
      if (!read_exact(fd_, eh_.e_shoff, &first, sizeof(first))) return unreadable();
      count = first.sh_size;
    }
    if (count > size_ / sizeof(Elf64_Shdr) ||
        !within(eh_.e_shoff, count * sizeof(Elf64_Shdr), size_))
      return cut("its section header table (" + num(count) + " entries)", eh_.e_shoff,
                 count > UINT64_MAX / sizeof(Elf64_Shdr) ? UINT64_MAX
                                                         : count * sizeof(Elf64_Shdr));
    std::vector<Elf64_Shdr> sh(count);
    if (!read_exact(fd_, eh_.e_shoff, sh.data(), count * sizeof(Elf64_Shdr))) return unreadable();
    const uint64_t names = eh_.e_shstrndx == SHN_XINDEX && count > 0 ? sh[0].sh_link
                                                                      : eh_.e_shstrndx;
    for (size_t i = 0; i < sh.size(); ++i) {
      const Elf64_Shdr& s = sh[i];
      if (s.sh_type == SHT_NULL || s.sh_type == SHT_NOBITS) continue;
      if (!within(s.sh_offset, s.sh_size, size_))
        return cut("section " + num(i) + section_name(sh, names, s.sh_name), s.sh_offset,
                   s.sh_size);
    }
    return std::nullopt;
  }

  // " '.text'" when the section name table can be read, else "".
  std::string section_name(const std::vector<Elf64_Shdr>& sh, uint64_t names,
                           uint32_t offset) const {
    if (names == SHN_UNDEF || names >= sh.size()) return "";
    const Elf64_Shdr& table = sh[names];
    if (!within(table.sh_offset, table.sh_size, size_) || offset >= table.sh_size) return "";
    char buf[64] = {};
    const uint64_t n = std::min<uint64_t>(sizeof(buf) - 1, table.sh_size - offset);
    if (!read_exact(fd_, table.sh_offset + offset, buf, n)) return "";
    return " '" + std::string(buf, strnlen(buf, n)) + "'";
  }

  int fd_;
  uint64_t size_;
  Elf64_Ehdr eh_{};
  std::vector<Elf64_Phdr> ph_;
  std::vector<size_t> loads_;  // indexes into ph_ of the PT_LOAD segments, ascending addresses
};

}  // namespace

std::optional<std::string> check_candidate(const fs::path& file) {
  struct stat st {};
  if (::lstat(file.c_str(), &st) != 0) {
    const int err = errno;
    return std::string("cannot be examined: ") + std::strerror(err);
  }
  if (S_ISLNK(st.st_mode)) {
    std::error_code ec;
    const fs::path target = fs::read_symlink(file, ec);
    if (::stat(file.c_str(), &st) != 0) {
      const int err = errno;
      if (err == ENOENT)
        return "is a broken symbolic link: it points to " + quoted(target) +
               ", which does not exist; fix or remove the link";
      if (err == ELOOP)
        return "is a symbolic link that never reaches a file (a loop, via " + quoted(target) +
               "); fix or remove the link";
      return "is a symbolic link to " + quoted(target) + ", which cannot be examined: " +
             std::strerror(err);
    }
  }
  if (S_ISDIR(st.st_mode))
    return "is a folder, not a shared library: a plugin is one '.so' file; rename the folder or "
           "move it out of the plugin folder";
  if (!S_ISREG(st.st_mode))
    return "is " + file_type_name(st.st_mode) +
           ", not a regular file: only regular '.so' files are loaded; remove it from the plugin "
           "folder";

  // Who could have written it: the file that would be loaded (a link's target) and the folder
  // holding that file, since whoever can write the folder can replace the file.
  std::error_code ec;
  const fs::path real = fs::canonical(file, ec);
  if (ec) return "cannot be resolved to a real path: " + ec.message();
  if (auto who = writable_by_others(st)) {
    const bool owned_by_other = st.st_uid != 0 && st.st_uid != geteuid();
    return real.string() + " " + *who + " (mode " + octal_mode(st.st_mode) +
           "): someone else could change the code peftfw would run, so it is not loaded; " +
           (owned_by_other
                ? std::string("use your own copy of it")
                : "if its content is what you built, `chmod go-w " + real.string() + "`");
  }
  struct stat folder {};
  if (::stat(real.parent_path().c_str(), &folder) == 0) {
    if (auto who = writable_by_others(folder))
      return "its folder " + real.parent_path().string() + " " + *who + " (mode " +
             octal_mode(folder.st_mode) +
             "): someone else could replace the file, so it is not loaded; " +
             ownership_fix(real.parent_path(), folder);
  }

  // O_NONBLOCK: should the entry turn into a FIFO after the stat above, open must not hang.
  FileDescriptor fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
  const int open_error = errno;
  if (fd.get() < 0)
    return std::string("cannot be read: ") + std::strerror(open_error) + " (mode " +
           octal_mode(st.st_mode) + ", owner " + user_label(st.st_uid) +
           "); make it readable (`chmod u+r " + real.string() + "`) or remove it";
  struct stat opened {};
  if (::fstat(fd.get(), &opened) != 0 || !S_ISREG(opened.st_mode) || opened.st_dev != st.st_dev ||
      opened.st_ino != st.st_ino)
    return "changed while it was being checked; try again";
  return ElfCheck(fd.get(), static_cast<uint64_t>(opened.st_size)).problem();
}

std::optional<std::string> check_folder(const fs::path& folder, bool& missing) {
  missing = false;
  struct stat st {};
  if (::stat(folder.c_str(), &st) != 0) {
    const int err = errno;
    missing = err == ENOENT || err == ENOTDIR;
    if (missing) return std::nullopt;
    return std::string("plugin folder cannot be examined: ") + std::strerror(err);
  }
  if (!S_ISDIR(st.st_mode))
    return "is " + file_type_name(st.st_mode) +
           ", not a folder: PEFTFW_PLUGIN_PATH lists folders (':'-separated); name the folder that "
           "holds the plugin, not the file";
  // Whoever can write the folder can add a plugin to it, so an open folder (like /tmp) is
  // refused as a whole rather than file by file.
  if (auto who = writable_by_others(st)) {
    // A sticky shared folder like /tmp is open by design: suggest a private folder inside it.
    const bool shared = (st.st_mode & S_ISVTX) && (st.st_mode & (S_IWOTH | S_IWGRP));
    return "plugin folder " + folder.string() + " " + *who + " (mode " + octal_mode(st.st_mode) +
        "): someone else could put a plugin there, so nothing in it is loaded; " +
        (shared ? "make a folder of your own in it (`mkdir -m 755 " +
                      (folder / "peftfw_plugins").string() +
                      "`) and list that in PEFTFW_PLUGIN_PATH"
                : "keep plugins where only you or root can write: " + ownership_fix(folder, st));
  }
  return std::nullopt;
}

}  // namespace peftfw::plugin_file
