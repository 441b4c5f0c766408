// safetensors files and Hugging Face checkpoint folders, without LibTorch.
//
// Reading memory-maps the file and validates the whole header up front, the
// way the reference Rust crate does (100 MB header limit, offsets contiguous
// and covering the data section exactly, shape x dtype == byte length), so a
// TensorView handed out later is always in bounds. Writing is atomic: the file
// appears at its final path complete or not at all.
//
// Checkpoint folders follow transformers' layout: either one
// `model.safetensors`, or `model-0000i-of-0000N.safetensors` shards listed in
// `model.safetensors.index.json`.
//
// Conversion to and from torch tensors lives in tensor_bridge.hpp so that this
// part builds without LibTorch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace peftfw::io {

// Element types peftfw reads and writes. Names in files are the enumerator
// names ("F32", "BF16", ...). Other safetensors types (U16, F8_E4M3, ...) are
// rejected with an error that lists these.
enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
std::optional<DType> dtype_from_name(std::string_view name);
// "F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL", for error messages.
std::string supported_dtype_names();

// A tensor inside a mapped file. `data` points into the mapping and lives as
// long as the SafetensorsFile (or Checkpoint) it came from. Data is
// little-endian, row-major, and aligned only as well as the writer chose.
struct TensorView {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  std::size_t nbytes = 0;

  int64_t numel() const;
};

// "[2, 3]", for messages.
std::string shape_to_string(const std::vector<int64_t>& shape);

// A read-only, memory-mapped, fully validated safetensors file.
// Throws InputError for a malformed file (message names the path and the
// tensor), InputError for a missing file, RuntimeError for other I/O failures.
// As with any mmap reader, another process truncating the file while it is
// mapped makes reads fault; peftfw's writers never modify a file in place
// (they rename a new file over it), so overwriting a file that is open for
// reading is safe.
class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);
  // The same checks on a file's bytes already in memory (the fuzz target's
  // entry point). `bytes` are not copied: they must outlive the result and its
  // views. `name` names the file in messages.
  static SafetensorsFile from_bytes(const std::string& name, const uint8_t* bytes,
                                    std::size_t size);

  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  // Tensor names sorted by name.
  std::vector<std::string> names() const;
  std::size_t size() const { return entries_.size(); }
  bool has(const std::string& name) const;
  // Throws InputError naming the file and the missing tensor.
  TensorView view(const std::string& name) const;
  // The "__metadata__" map; empty when the file has none.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    std::size_t begin;  // offsets into the data section
    std::size_t end;
  };

  SafetensorsFile() = default;
  void unmap() noexcept;
  // Validates the whole file (length prefix, header, offsets) and fills
  // data_section_, entries_ and metadata_.
  void parse(const uint8_t* bytes, uint64_t size);

  std::string path_;
  void* map_ = nullptr;
  std::size_t map_size_ = 0;
  const uint8_t* data_section_ = nullptr;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// One tensor to write. `data` must hold `nbytes` bytes in the file's layout
// (little-endian, row-major) until the write returns; `owner` optionally keeps
// the memory alive (the torch bridge stores the contiguous tensor there).
struct NamedTensorBytes {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  std::size_t nbytes = 0;
  std::shared_ptr<const void> owner;
};

// Writes a safetensors file atomically (see AtomicFileWriter). The header has
// sorted keys and is space-padded to a multiple of 8 bytes; data is ordered by
// element size (largest first), then name, as the reference writer does, so
// every tensor is aligned to its element size within the file. Throws
// InputError for inconsistent tensors (duplicate name, nbytes != shape x
// dtype), RuntimeError for I/O failures. Never leaves a partial file at `path`.
void write_safetensors(const std::string& path, const std::vector<NamedTensorBytes>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes `contents` to `path` atomically.
void write_file_atomic(const std::string& path, std::string_view contents);

// Streams bytes to `<path>.tmp.<pid>`; commit() fsyncs, renames over `path`
// and fsyncs the directory. If commit() is not reached (exception, early
// return) the temporary file is removed and `path` is untouched.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::string path);
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  ~AtomicFileWriter();

  void write(const void* data, std::size_t n);
  void commit();
  const std::string& temp_path() const { return temp_path_; }

 private:
  void flush_buffer();
  void write_raw(const uint8_t* data, std::size_t n);
  [[noreturn]] void fail(const std::string& what, int err);

  std::string path_;
  std::string temp_path_;
  int fd_ = -1;
  bool committed_ = false;
  std::vector<uint8_t> buffer_;
};

// File names of the transformers checkpoint layout.
inline constexpr const char* kSingleCheckpointFile = "model.safetensors";
inline constexpr const char* kCheckpointIndexFile = "model.safetensors.index.json";
// transformers' default max_shard_size ("5GB").
inline constexpr uint64_t kDefaultMaxShardBytes = 5'000'000'000ULL;

// `model.safetensors.index.json`: {"metadata": {"total_size": N},
// "weight_map": {tensor: shard file}}. load() checks the JSON shape, that shard
// names are plain file names, and that every shard exists beside the index.
class CheckpointIndex {
 public:
  static CheckpointIndex load(const std::string& index_path);

  const std::string& path() const { return path_; }
  // Folder holding the index and its shards.
  const std::string& folder() const { return folder_; }
  // Informational: transformers writes the sum of tensor bytes, but hub
  // checkpoints are not consistent about it, so it is not checked.
  std::optional<uint64_t> total_size() const { return total_size_; }
  const std::map<std::string, std::string>& weight_map() const { return weight_map_; }
  // Distinct shard file names, sorted.
  std::vector<std::string> shard_files() const;

 private:
  std::string path_;
  std::string folder_;
  std::optional<uint64_t> total_size_;
  std::map<std::string, std::string> weight_map_;
};

// A checkpoint opened for reading: one file or all shards of an index, with
// name -> (file, view) lookup. For shards, open() checks that every tensor of
// the index is in its named shard and that no shard holds a tensor the index
// does not map to it.
class Checkpoint {
 public:
  // `path` may be a folder (model.safetensors or model.safetensors.index.json
  // inside; both present is an error), a .safetensors file, or an index file.
  static Checkpoint open(const std::string& path);

  const std::string& path() const { return path_; }
  bool sharded() const { return index_.has_value(); }
  const std::optional<CheckpointIndex>& index() const { return index_; }
  const std::vector<SafetensorsFile>& files() const { return files_; }

  std::vector<std::string> names() const;  // sorted
  std::size_t size() const { return location_.size(); }
  bool has(const std::string& name) const;
  TensorView view(const std::string& name) const;
  const SafetensorsFile& file_of(const std::string& name) const;

 private:
  Checkpoint() = default;
  std::size_t locate(const std::string& name) const;

  std::string path_;
  std::optional<CheckpointIndex> index_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, std::size_t> location_;  // name -> index into files_
};

// Writes a checkpoint folder (created if missing) the way transformers'
// save_pretrained does: tensors are packed in the given order into shards of
// at most `max_shard_bytes` tensor bytes (a larger tensor gets a shard of its
// own). One shard is written as `model.safetensors`; several as
// `model-00001-of-0000N.safetensors` plus the index, written last. Every file
// gets `metadata`. Afterwards, checkpoint files of an earlier save that the
// new layout does not use are removed, so the folder opens unambiguously.
// Returns the file names written (index last).
std::vector<std::string> write_checkpoint(const std::string& folder,
                                          const std::vector<NamedTensorBytes>& tensors,
                                          const std::map<std::string, std::string>& metadata = {},
                                          uint64_t max_shard_bytes = kDefaultMaxShardBytes);

}  // namespace peftfw::io
