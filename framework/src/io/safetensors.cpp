// safetensors reading (mmap + full header validation), atomic writing, and the
// transformers checkpoint folder layout (single file or index + shards).
#include "peftfw/io/safetensors.hpp"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <numeric>
#include <set>
#include <stdexcept>
#include <tuple>
#include <utility>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"

namespace peftfw::io {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// The reference implementation refuses larger headers; so do we, so that a
// corrupt length cannot make us allocate or parse gigabytes.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DTypeInfo {
  DType dtype;
  const char* name;
  std::size_t size;
};

constexpr std::array<DTypeInfo, 10> kDTypes = {{
    {DType::F64, "F64", 8},
    {DType::F32, "F32", 4},
    {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2},
    {DType::I64, "I64", 8},
    {DType::I32, "I32", 4},
    {DType::I16, "I16", 2},
    {DType::I8, "I8", 1},
    {DType::U8, "U8", 1},
    {DType::BOOL, "BOOL", 1},
}};

const DTypeInfo& info(DType dtype) {
  for (const auto& i : kDTypes) {
    if (i.dtype == dtype) return i;
  }
  throw std::logic_error("peftfw::io: DType value out of range");
}

// A name from the file (tensor, dtype, shard) as messages quote it: cut to
// kMaxExcerptBytes, so that a 100 MB tensor name does not come back whole.
std::string in_quotes(const std::string& s) {
  const Excerpt e = make_excerpt(s);
  return "'" + e.text + "'" + e.note();
}

std::string offsets_to_string(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

// Byte count of a tensor, or nullopt if the arithmetic overflows.
std::optional<uint64_t> checked_nbytes(const std::vector<int64_t>& shape, DType dtype) {
  uint64_t n = info(dtype).size;
  for (const int64_t d : shape) {
    if (d < 0) return std::nullopt;
    const auto u = static_cast<uint64_t>(d);
    if (u != 0 && n > std::numeric_limits<uint64_t>::max() / u) return std::nullopt;
    n *= u;
  }
  return n;
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::string errno_text(int err) { return std::strerror(err); }

// Validates one header entry and returns it. `file` and `name` are for
// messages only.
struct ParsedEntry {
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin;
  uint64_t end;
};

ParsedEntry parse_entry(const std::string& file, const std::string& name, const json& value) {
  const std::string where = file + ": tensor " + in_quotes(name) + ": ";
  if (!value.is_object()) {
    throw InputError(where + "expected an object with dtype, shape and data_offsets, found " +
                     describe_json_value(value));
  }
  for (auto it = value.begin(); it != value.end(); ++it) {
    if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets") {
      throw InputError(where + "unexpected field " + in_quotes(it.key()) +
                       " (a safetensors entry has only dtype, shape and data_offsets)");
    }
  }
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!value.contains(field)) throw InputError(where + "missing field '" + field + "'");
  }

  const json& dtype_json = value["dtype"];
  if (!dtype_json.is_string()) {
    throw InputError(where + "dtype: expected a string, found " + describe_json_value(dtype_json));
  }
  const auto dtype = dtype_from_name(dtype_json.get<std::string>());
  if (!dtype) {
    throw InputError(where + "dtype " + in_quotes(dtype_json.get<std::string>()) +
                     " is not supported (supported: " + supported_dtype_names() + ")");
  }

  const json& shape_json = value["shape"];
  if (!shape_json.is_array()) {
    throw InputError(where + "shape: expected an array of non-negative integers, found " +
                     describe_json_value(shape_json));
  }
  std::vector<int64_t> shape;
  for (std::size_t i = 0; i < shape_json.size(); ++i) {
    const json& d = shape_json[i];
    if (!d.is_number_unsigned() ||
        d.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      throw InputError(where + "shape[" + std::to_string(i) +
                       "]: expected a non-negative integer, found " + describe_json_value(d));
    }
    shape.push_back(static_cast<int64_t>(d.get<uint64_t>()));
  }

  const json& off_json = value["data_offsets"];
  if (!off_json.is_array() || off_json.size() != 2) {
    throw InputError(where + "data_offsets: expected [begin, end], found " +
                     describe_json_value(off_json));
  }
  for (std::size_t i = 0; i < 2; ++i) {
    if (!off_json[i].is_number_unsigned()) {
      throw InputError(where + "data_offsets[" + std::to_string(i) +
                       "]: expected a non-negative integer, found " +
                       describe_json_value(off_json[i]));
    }
  }
  const auto begin = off_json[0].get<uint64_t>();
  const auto end = off_json[1].get<uint64_t>();
  if (begin > end) {
    throw InputError(where + "data_offsets " + offsets_to_string(begin, end) +
                     " end before they begin");
  }

  const auto needed = checked_nbytes(shape, *dtype);
  if (!needed) {
    throw InputError(where + "shape " + shape_to_string(shape) + " of " + dtype_name(*dtype) +
                     " overflows a 64-bit byte count");
  }
  if (*needed != end - begin) {
    throw InputError(where + "data_offsets " + offsets_to_string(begin, end) + " hold " +
                     std::to_string(end - begin) + " bytes but shape " + shape_to_string(shape) +
                     " of " + dtype_name(*dtype) + " needs " + std::to_string(*needed));
  }
  return {*dtype, std::move(shape), begin, end};
}

void validate_for_write(const std::string& path, const std::vector<NamedTensorBytes>& tensors) {
  std::set<std::string> seen;
  for (const auto& t : tensors) {
    const std::string where = path + ": cannot write tensor " + in_quotes(t.name) + ": ";
    if (t.name == "__metadata__") {
      throw InputError(where + "the name '__metadata__' is reserved by the format");
    }
    if (!seen.insert(t.name).second) throw InputError(where + "the name occurs twice");
    const auto needed = checked_nbytes(t.shape, t.dtype);
    if (!needed) {
      throw InputError(where + "shape " + shape_to_string(t.shape) +
                       " has a negative dimension or overflows a 64-bit byte count");
    }
    if (*needed != t.nbytes) {
      throw InputError(where + "shape " + shape_to_string(t.shape) + " of " +
                       dtype_name(t.dtype) + " needs " + std::to_string(*needed) +
                       " bytes but " + std::to_string(t.nbytes) + " were given");
    }
    if (t.nbytes > 0 && t.data == nullptr) throw InputError(where + "data pointer is null");
  }
}

// Header bytes (JSON + space padding to a multiple of 8) and the data order.
std::string build_header(const std::string& path, const std::vector<NamedTensorBytes>& tensors,
                         const std::map<std::string, std::string>& metadata,
                         std::vector<std::size_t>& order) {
  order.resize(tensors.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  // Largest elements first keeps every tensor aligned to its element size,
  // since the data section itself starts at a multiple of 8.
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const std::size_t sa = dtype_size(tensors[a].dtype), sb = dtype_size(tensors[b].dtype);
    if (sa != sb) return sa > sb;
    return tensors[a].name < tensors[b].name;
  });
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const std::size_t i : order) {
    const auto& t = tensors[i];
    header[t.name] = {{"dtype", dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.nbytes}}};
    offset += t.nbytes;
  }
  std::string text;
  try {
    text = header.dump(-1, ' ', false, json::error_handler_t::strict);
  } catch (const json::type_error& e) {
    throw InputError(path + ": a tensor name or metadata string is not valid UTF-8: " +
                     std::string(e.what()));
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  return text;
}

bool is_regular_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string join_path(const std::string& folder, const std::string& name) {
  return (fs::path(folder) / name).string();
}

std::string shard_file_name(std::size_t i, std::size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i, n);
  return buf;
}

// "model-<5 digits>-of-<5 digits>.safetensors", the names shard_file_name makes.
bool is_shard_file_name(const std::string& name) {
  const std::string pattern = "model-#####-of-#####.safetensors";
  if (name.size() != pattern.size()) return false;
  for (std::size_t i = 0; i < name.size(); ++i) {
    const bool ok = pattern[i] == '#' ? (name[i] >= '0' && name[i] <= '9') : name[i] == pattern[i];
    if (!ok) return false;
  }
  return true;
}

void remove_file(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    throw RuntimeError(path + ": cannot remove stale checkpoint file: " + errno_text(errno));
  }
}

}  // namespace

// ---- dtypes and views ---------------------------------------------------------------------------

std::size_t dtype_size(DType dtype) { return info(dtype).size; }

const char* dtype_name(DType dtype) { return info(dtype).name; }

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& i : kDTypes) {
    if (name == i.name) return i.dtype;
  }
  return std::nullopt;
}

std::string supported_dtype_names() {
  std::string out;
  for (const auto& i : kDTypes) {
    if (!out.empty()) out += ", ";
    out += i.name;
  }
  return out;
}

int64_t TensorView::numel() const {
  // A zero anywhere makes the product 0, however large the other dimensions
  // ([2^62, 4, 0] is a valid empty tensor whose partial product overflows).
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
  int64_t n = 1;
  for (const int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) {
      throw std::overflow_error("TensorView::numel: shape " + shape_to_string(shape) +
                                " has a negative dimension or overflows int64");
    }
  }
  return n;
}

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

// ---- SafetensorsFile ----------------------------------------------------------------------------

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept { *this = std::move(other); }

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    map_size_ = std::exchange(other.map_size_, 0);
    data_section_ = std::exchange(other.data_section_, nullptr);
    entries_ = std::move(other.entries_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

SafetensorsFile::~SafetensorsFile() { unmap(); }

void SafetensorsFile::unmap() noexcept {
  if (map_ != nullptr) ::munmap(map_, map_size_);
  map_ = nullptr;
  map_size_ = 0;
  data_section_ = nullptr;
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile file;
  file.path_ = path;

  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT || err == ENOTDIR) throw InputError(path + ": no such file");
    throw RuntimeError(path + ": cannot open: " + errno_text(err));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw RuntimeError(path + ": cannot stat: " + errno_text(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw InputError(path + ": not a regular file");
  }
  const auto file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    file.parse(nullptr, file_size);  // throws: too short (an empty file cannot be mapped)
  }
  void* map = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping keeps the file open
  if (map == MAP_FAILED) throw RuntimeError(path + ": mmap failed: " + errno_text(map_err));
  file.map_ = map;
  file.map_size_ = file_size;
  file.parse(static_cast<const uint8_t*>(map), file_size);
  return file;
}

SafetensorsFile SafetensorsFile::from_bytes(const std::string& name, const uint8_t* bytes,
                                            std::size_t size) {
  SafetensorsFile file;
  file.path_ = name;
  file.parse(bytes, size);
  return file;
}

void SafetensorsFile::parse(const uint8_t* bytes, uint64_t file_size) {
  const std::string& path = path_;
  if (file_size < 8) {
    throw InputError(path + ": file is " + std::to_string(file_size) +
                     " bytes, shorter than the 8-byte header length that starts a safetensors "
                     "file (truncated or not a safetensors file)");
  }
  const uint64_t header_len = read_u64_le(bytes);
  if (header_len > kMaxHeaderBytes) {
    throw InputError(path + ": header length " + std::to_string(header_len) +
                     " exceeds the format's limit of " + std::to_string(kMaxHeaderBytes) +
                     " bytes (corrupt or not a safetensors file)");
  }
  if (header_len > file_size - 8) {
    throw InputError(path + ": header length " + std::to_string(header_len) + " but only " +
                     std::to_string(file_size - 8) +
                     " bytes follow the length prefix (file truncated?)");
  }
  const uint64_t data_size = file_size - 8 - header_len;
  data_section_ = bytes + 8 + header_len;

  // Duplicate tensor names would silently shadow each other in a map, so the
  // parse callback records them (depth 1 = keys of the top-level object).
  std::string duplicate;
  std::set<std::string> seen;
  const json::parser_callback_t check_keys = [&](int depth, json::parse_event_t event,
                                                 json& parsed) {
    if (event == json::parse_event_t::key && depth == 1 && duplicate.empty() &&
        !seen.insert(parsed.get<std::string>()).second) {
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  json header;
  const auto* header_begin = reinterpret_cast<const char*>(bytes + 8);
  // nlohmann's lexer stops at a NUL byte and skips a UTF-8 BOM; the reference
  // parser rejects both, and so must we or garbage after a NUL goes unseen.
  if (const void* nul = std::memchr(header_begin, '\0', header_len)) {
    throw InputError(path + ": header contains a NUL byte at offset " +
                     std::to_string(static_cast<const char*>(nul) - header_begin) +
                     " (corrupt or not a safetensors file)");
  }
  if (header_len >= 3 && std::memcmp(header_begin, "\xEF\xBB\xBF", 3) == 0) {
    throw InputError(path + ": header starts with a UTF-8 byte order mark, which the format "
                            "does not allow");
  }
  try {
    header = json::parse(header_begin, header_begin + header_len, check_keys);
  } catch (const json::exception& e) {
    // nlohmann's text is "[json.exception.parse_error.101] parse error at ...", or
    // "[json.exception.out_of_range.406] number overflow parsing '1e999'".
    // Its "last read" excerpt may be binary garbage: show non-ASCII as \xNN.
    std::string what = e.what();
    const auto bracket = what.find("] ");
    if (bracket != std::string::npos) what = what.substr(bracket + 2);
    what = excerpt(what);
    std::string detail;
    for (const char c : what) {
      const auto u = static_cast<unsigned char>(c);
      if (u < 0x80) {
        detail.push_back(c);
      } else {
        char hex[8];
        std::snprintf(hex, sizeof hex, "\\x%02X", u);
        detail += hex;
      }
    }
    throw InputError(path + ": header is not valid JSON (" + detail +
                     "; corrupt or not a safetensors file)");
  }
  if (!header.is_object()) {
    throw InputError(path + ": header must be a JSON object, found " +
                     describe_json_value(header));
  }
  if (!duplicate.empty()) {
    throw InputError(path + ": header lists " +
                     (duplicate == "__metadata__" ? std::string("key ") : std::string("tensor ")) +
                     in_quotes(duplicate) + " more than once");
  }

  std::vector<std::pair<std::string, ParsedEntry>> parsed;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (it->is_null()) continue;  // the reference reader treats null as absent
      if (!it->is_object()) {
        throw InputError(path + ": __metadata__: expected an object of strings, found " +
                         describe_json_value(*it));
      }
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) {
          throw InputError(path + ": __metadata__ key " + in_quotes(m.key()) +
                           ": expected a string, found " + describe_json_value(*m));
        }
        metadata_[m.key()] = m->get<std::string>();
      }
      continue;
    }
    ParsedEntry entry = parse_entry(path, it.key(), *it);
    if (entry.end > data_size) {
      throw InputError(path + ": tensor " + in_quotes(it.key()) + ": data_offsets " +
                       offsets_to_string(entry.begin, entry.end) + " reach beyond the " +
                       std::to_string(data_size) + "-byte data section (file truncated?)");
    }
    parsed.emplace_back(it.key(), std::move(entry));
  }

  // Like the reference reader: sorted by offsets, the tensors must tile the
  // data section exactly, with no overlap, gap or trailing bytes.
  std::sort(parsed.begin(), parsed.end(), [](const auto& a, const auto& b) {
    return std::tie(a.second.begin, a.second.end, a.first) <
           std::tie(b.second.begin, b.second.end, b.first);
  });
  uint64_t covered = 0;
  const std::string* previous = nullptr;
  for (const auto& [name, e] : parsed) {
    if (e.begin < covered) {
      throw InputError(path + ": tensor " + in_quotes(name) + ": data_offsets " +
                       offsets_to_string(e.begin, e.end) + " overlap tensor " +
                       in_quotes(*previous) + ", which ends at " + std::to_string(covered));
    }
    if (e.begin > covered) {
      throw InputError(path + ": tensor " + in_quotes(name) + ": data_offsets " +
                       offsets_to_string(e.begin, e.end) + " leave a gap of " +
                       std::to_string(e.begin - covered) + " bytes after " +
                       (previous ? "tensor " + in_quotes(*previous) : std::string("the header")) +
                       ", which ends at " + std::to_string(covered) +
                       " (tensors must be contiguous)");
    }
    covered = e.end;
    previous = &name;
  }
  if (covered != data_size) {
    throw InputError(path + ": data section is " + std::to_string(data_size) +
                     " bytes but the tensors cover only " + std::to_string(covered) + " (" +
                     std::to_string(data_size - covered) + " unaccounted bytes at the end)");
  }

  for (auto& [name, e] : parsed) {
    entries_.emplace(name, Entry{e.dtype, std::move(e.shape),
                                      static_cast<std::size_t>(e.begin),
                                      static_cast<std::size_t>(e.end)});
  }
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& [name, e] : entries_) out.push_back(name);
  return out;
}

bool SafetensorsFile::has(const std::string& name) const { return entries_.count(name) > 0; }

TensorView SafetensorsFile::view(const std::string& name) const {
  const auto it = entries_.find(name);
  if (it == entries_.end()) {
    throw InputError(path_ + ": no tensor named " + in_quotes(name) + " (the file has " +
                     std::to_string(entries_.size()) + " tensors)");
  }
  const Entry& e = it->second;
  return TensorView{e.dtype, e.shape, data_section_ + e.begin, e.end - e.begin};
}

// ---- writing ------------------------------------------------------------------------------------

AtomicFileWriter::AtomicFileWriter(std::string path)
    : path_(std::move(path)), temp_path_(path_ + ".tmp." + std::to_string(::getpid())) {
  fd_ = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd_ < 0) {
    const int err = errno;
    std::string hint;
    if (err == ENOENT) hint = " (does the folder exist?)";
    throw RuntimeError(path_ + ": cannot create temporary file " + temp_path_ + ": " +
                       errno_text(err) + hint);
  }
  buffer_.reserve(1 << 20);
}

AtomicFileWriter::~AtomicFileWriter() {
  if (committed_) return;
  if (fd_ >= 0) ::close(fd_);
  ::unlink(temp_path_.c_str());
}

void AtomicFileWriter::fail(const std::string& what, int err) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  ::unlink(temp_path_.c_str());
  throw RuntimeError(path_ + ": " + what + ": " + errno_text(err));
}

void AtomicFileWriter::write_raw(const uint8_t* data, std::size_t n) {
  constexpr std::size_t kMaxChunk = std::size_t{1} << 30;
  while (n > 0) {
    const ssize_t written = ::write(fd_, data, std::min(n, kMaxChunk));
    if (written < 0) {
      if (errno == EINTR) continue;
      fail("write to " + temp_path_ + " failed", errno);
    }
    data += written;
    n -= static_cast<std::size_t>(written);
  }
}

void AtomicFileWriter::flush_buffer() {
  write_raw(buffer_.data(), buffer_.size());
  buffer_.clear();
}

void AtomicFileWriter::write(const void* data, std::size_t n) {
  if (committed_ || fd_ < 0) throw std::logic_error("AtomicFileWriter::write after commit");
  const auto* bytes = static_cast<const uint8_t*>(data);
  if (buffer_.size() + n > buffer_.capacity()) flush_buffer();
  if (n >= buffer_.capacity()) {
    write_raw(bytes, n);
  } else {
    buffer_.insert(buffer_.end(), bytes, bytes + n);
  }
}

void AtomicFileWriter::commit() {
  if (committed_ || fd_ < 0) throw std::logic_error("AtomicFileWriter::commit twice");
  flush_buffer();
  if (::fsync(fd_) != 0) fail("fsync of " + temp_path_ + " failed", errno);
  const int fd = std::exchange(fd_, -1);
  if (::close(fd) != 0) fail("close of " + temp_path_ + " failed", errno);
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0) {
    fail("cannot rename " + temp_path_ + " into place", errno);
  }
  committed_ = true;
  // Persist the rename itself. Some file systems cannot fsync a directory
  // (EINVAL); the data is written either way, so only real failures count.
  std::string dir = fs::path(path_).parent_path().string();
  if (dir.empty()) dir = ".";
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    const int rc = ::fsync(dir_fd);
    const int err = errno;
    ::close(dir_fd);
    if (rc != 0 && err != EINVAL && err != EROFS) {
      throw RuntimeError(dir + ": fsync of the folder failed after writing " + path_ + ": " +
                         errno_text(err));
    }
  }
}

void write_file_atomic(const std::string& path, std::string_view contents) {
  AtomicFileWriter writer(path);
  writer.write(contents.data(), contents.size());
  writer.commit();
}

void write_safetensors(const std::string& path, const std::vector<NamedTensorBytes>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  validate_for_write(path, tensors);
  std::vector<std::size_t> order;
  const std::string header = build_header(path, tensors, metadata, order);

  AtomicFileWriter writer(path);
  uint8_t len[8];
  uint64_t n = header.size();
  for (auto& b : len) {
    b = static_cast<uint8_t>(n & 0xff);
    n >>= 8;
  }
  writer.write(len, sizeof len);
  writer.write(header.data(), header.size());
  for (const std::size_t i : order) writer.write(tensors[i].data, tensors[i].nbytes);
  writer.commit();
}

// ---- checkpoint folders -------------------------------------------------------------------------

CheckpointIndex CheckpointIndex::load(const std::string& index_path) {
  const JsonConfig config = JsonConfig::load(index_path);
  CheckpointIndex index;
  index.path_ = index_path;
  index.folder_ = fs::path(index_path).parent_path().string();
  if (index.folder_.empty()) index.folder_ = ".";

  if (const auto metadata = config.optional_child("metadata")) {
    if (!metadata->is_unset("total_size")) {
      const json& total = metadata->raw()["total_size"];
      // Some writers store it as a float; accept integral values.
      if (total.is_number_unsigned()) {
        index.total_size_ = total.get<uint64_t>();
      } else if (total.is_number_float() && total.get<double>() >= 0 &&
                 total.get<double>() < 1.8e19 &&
                 std::floor(total.get<double>()) == total.get<double>()) {
        index.total_size_ = static_cast<uint64_t>(total.get<double>());
      } else {
        throw InputError(index_path + ": field 'metadata.total_size': expected a non-negative "
                                      "integer, found " +
                         describe_json_value(total));
      }
    }
  }

  const JsonConfig weight_map = config.child("weight_map");
  const json& raw = weight_map.raw();
  if (raw.empty()) throw InputError(index_path + ": field 'weight_map' is empty");
  for (auto it = raw.begin(); it != raw.end(); ++it) {
    const std::string field = "weight_map." + excerpt(it.key());
    if (!it->is_string()) {
      throw InputError(index_path + ": field '" + field + "': expected a shard file name, found " +
                       describe_json_value(*it));
    }
    const auto shard = it->get<std::string>();
    if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos) {
      throw InputError(index_path + ": field '" + field + "': shard " + in_quotes(shard) +
                       " must be a plain file name inside the checkpoint folder");
    }
    index.weight_map_[it.key()] = shard;
  }

  std::string missing;
  for (const auto& shard : index.shard_files()) {
    if (is_regular_file(join_path(index.folder_, shard))) continue;
    const auto example = std::find_if(index.weight_map_.begin(), index.weight_map_.end(),
                                      [&](const auto& kv) { return kv.second == shard; });
    missing += (missing.empty() ? "" : ", ") + in_quotes(shard) + " (holds " +
               in_quotes(example->first) + ", ...)";
  }
  if (!missing.empty()) {
    throw InputError(index_path + ": shard files listed in weight_map do not exist in " +
                     index.folder_ + ": " + missing + " (incomplete download?)");
  }
  return index;
}

std::vector<std::string> CheckpointIndex::shard_files() const {
  std::set<std::string> shards;
  for (const auto& [name, shard] : weight_map_) shards.insert(shard);
  return {shards.begin(), shards.end()};
}

Checkpoint Checkpoint::open(const std::string& path) {
  Checkpoint ckpt;
  ckpt.path_ = path;
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw InputError(path + ": checkpoint path does not exist");
  }

  std::string single;
  std::string index_path;
  if (S_ISDIR(st.st_mode)) {
    const std::string single_candidate = join_path(path, kSingleCheckpointFile);
    const std::string index_candidate = join_path(path, kCheckpointIndexFile);
    const bool has_single = is_regular_file(single_candidate);
    const bool has_index = is_regular_file(index_candidate);
    if (has_single && has_index) {
      throw InputError(path + ": checkpoint folder has both " + kSingleCheckpointFile + " and " +
                       kCheckpointIndexFile +
                       "; it is ambiguous which one holds the weights (remove the stale one)");
    }
    if (!has_single && !has_index) {
      std::vector<std::string> found;
      std::error_code ec;
      for (const auto& entry : fs::directory_iterator(path, ec)) {
        const std::string name = entry.path().filename().string();
        const std::string ext = entry.path().extension().string();
        if (ext == ".safetensors" || ext == ".bin" || ext == ".pt" || ext == ".pth" ||
            ext == ".gguf" || ext == ".json") {
          found.push_back(name);
        }
      }
      std::sort(found.begin(), found.end());
      std::string listing;
      for (const auto& f : found) listing += (listing.empty() ? "" : ", ") + f;
      throw InputError(path + ": checkpoint folder has neither " + kSingleCheckpointFile +
                       " nor " + kCheckpointIndexFile + " (found: " +
                       (listing.empty() ? std::string("no weight files") : listing) +
                       "); peftfw reads safetensors checkpoints in the transformers layout");
    }
    if (has_single) {
      single = single_candidate;
    } else {
      index_path = index_candidate;
    }
  } else if (fs::path(path).extension() == ".json") {
    index_path = path;
  } else {
    single = path;
  }

  if (!single.empty()) {
    ckpt.files_.push_back(SafetensorsFile::open(single));
    for (const auto& name : ckpt.files_[0].names()) ckpt.location_[name] = 0;
    return ckpt;
  }

  ckpt.index_ = CheckpointIndex::load(index_path);
  const CheckpointIndex& index = *ckpt.index_;
  std::map<std::string, std::size_t> shard_slot;
  for (const auto& shard : index.shard_files()) {
    shard_slot[shard] = ckpt.files_.size();
    ckpt.files_.push_back(SafetensorsFile::open(join_path(index.folder(), shard)));
  }

  // Collect every disagreement between the index and the shards, so one run
  // shows the whole problem.
  std::vector<std::string> problems;
  std::size_t problem_count = 0;
  const auto report = [&](std::string problem) {
    if (problems.size() < 10) problems.push_back(std::move(problem));
    ++problem_count;
  };
  for (const auto& [name, shard] : index.weight_map()) {
    const std::size_t slot = shard_slot.at(shard);
    if (!ckpt.files_[slot].has(name)) {
      report("tensor " + in_quotes(name) + " is mapped to " + in_quotes(shard) +
             " but that shard does not contain it");
    } else {
      ckpt.location_[name] = slot;
    }
  }
  for (const auto& [shard, slot] : shard_slot) {
    for (const auto& name : ckpt.files_[slot].names()) {
      const auto it = index.weight_map().find(name);
      if (it == index.weight_map().end()) {
        report("shard " + in_quotes(shard) + " contains tensor " + in_quotes(name) +
               ", which weight_map does not list");
      } else if (it->second != shard) {
        report("shard " + in_quotes(shard) + " contains tensor " + in_quotes(name) +
               ", which weight_map assigns to " + in_quotes(it->second));
      }
    }
  }
  if (problem_count > 0) {
    std::string message = index_path + ": index and shards disagree (" +
                          std::to_string(problem_count) + " problem" +
                          (problem_count == 1 ? "" : "s") + "):";
    for (const auto& p : problems) message += "\n  " + p;
    if (problem_count > problems.size()) {
      message += "\n  ... and " + std::to_string(problem_count - problems.size()) + " more";
    }
    throw InputError(message);
  }
  return ckpt;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(location_.size());
  for (const auto& [name, slot] : location_) out.push_back(name);
  return out;
}

bool Checkpoint::has(const std::string& name) const { return location_.count(name) > 0; }

std::size_t Checkpoint::locate(const std::string& name) const {
  const auto it = location_.find(name);
  if (it == location_.end()) {
    throw InputError(path_ + ": checkpoint has no tensor named " + in_quotes(name) + " (it has " +
                     std::to_string(location_.size()) + " tensors)");
  }
  return it->second;
}

TensorView Checkpoint::view(const std::string& name) const {
  return files_[locate(name)].view(name);
}

const SafetensorsFile& Checkpoint::file_of(const std::string& name) const {
  return files_[locate(name)];
}

std::vector<std::string> write_checkpoint(const std::string& folder,
                                          const std::vector<NamedTensorBytes>& tensors,
                                          const std::map<std::string, std::string>& metadata,
                                          uint64_t max_shard_bytes) {
  if (max_shard_bytes == 0) {
    throw InputError(folder + ": max shard size must be positive, got 0");
  }
  validate_for_write(folder, tensors);
  std::error_code ec;
  fs::create_directories(folder, ec);
  if (ec) throw RuntimeError(folder + ": cannot create checkpoint folder: " + ec.message());

  // Greedy packing in the caller's order, as transformers does: a tensor that
  // does not fit starts a new shard; one larger than the limit sits alone.
  std::vector<std::vector<NamedTensorBytes>> shards;
  uint64_t current = 0;
  for (const auto& t : tensors) {
    if (shards.empty() || (!shards.back().empty() && current + t.nbytes > max_shard_bytes)) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(t);
    current += t.nbytes;
  }
  if (shards.empty()) shards.emplace_back();  // an empty checkpoint is one empty file

  std::vector<std::string> written;
  if (shards.size() == 1) {
    write_safetensors(join_path(folder, kSingleCheckpointFile), shards[0], metadata);
    written.push_back(kSingleCheckpointFile);
  } else {
    json weight_map = json::object();
    uint64_t total = 0;
    for (std::size_t i = 0; i < shards.size(); ++i) {
      const std::string name = shard_file_name(i + 1, shards.size());
      write_safetensors(join_path(folder, name), shards[i], metadata);
      for (const auto& t : shards[i]) {
        weight_map[t.name] = name;
        total += t.nbytes;
      }
      written.push_back(name);
    }
    // The index goes last: until it is in place, a reader sees the old
    // checkpoint (or none), never an index naming missing shards.
    const json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    write_file_atomic(join_path(folder, kCheckpointIndexFile), index.dump(2) + "\n");
    written.push_back(kCheckpointIndexFile);
  }

  // Remove files of an earlier save that would make the folder ambiguous.
  const std::set<std::string> keep(written.begin(), written.end());
  std::vector<std::string> stale;
  for (const auto& entry : fs::directory_iterator(folder, ec)) {
    const std::string name = entry.path().filename().string();
    if (keep.count(name)) continue;
    if (name == kSingleCheckpointFile || name == kCheckpointIndexFile || is_shard_file_name(name)) {
      stale.push_back(entry.path().string());
    }
  }
  if (ec) throw RuntimeError(folder + ": cannot list checkpoint folder: " + ec.message());
  for (const auto& path : stale) remove_file(path);
  return written;
}

}  // namespace peftfw::io
