// Wire format: every message is one frame = a fixed 40-byte header + `length` payload bytes.
// Little-endian (x86-64/aarch64 hosts). Everything a peer sends is validated before use; a frame
// that fails validation drops that connection only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace mooncake::transfer {

constexpr uint32_t kFrameMagic = 0x4554434DU;  // "MCTE"
constexpr uint8_t kWireVersion = 1;

enum FrameType : uint8_t {
  kBanner = 1,     // acceptor -> dialer right after accept: name + nonce
  kHello = 2,      // dialer -> acceptor: identity + HMAC proof of the secret
  kHelloAck = 3,   // acceptor -> dialer: status + identity + HMAC proof
  kHeartbeat = 4,  // no payload
  kBye = 5,        // graceful close, no payload
  kPing = 6,       // req = probe id
  kPong = 7,       // req = probe id
  kNotify = 8,     // a = tag, b = sender sequence number, payload = user bytes
  kWrite = 9,      // req, a = segment id, b = offset, payload = data chunk; flag LAST on the final chunk
  kWriteAck = 10,  // req
  kReadReq = 11,   // req, a = segment id, b = offset, payload = u64 length
  kReadResp = 12,  // req, b = offset inside the read, payload = data chunk; flag LAST on the final chunk
  kError = 13,     // req, a = error code, payload = message
  kRingOffer = 14,   // a = ring bytes, payload = u32 memfd number + memfd name (same-host notify ring)
  kRingAccept = 15,  // a = 0 accepted, 1 refused
  kUcxInfoReq = 16,   // req, a = segment id: asks for the owner's UCX worker address and the segment's rkey
  kUcxInfoResp = 17,  // req, payload = transport_ucx.cc's segment information (or an ERROR frame instead)
  kFrameTypeEnd = 18,
};

enum FrameFlags : uint16_t { kFlagLast = 1 };

// Error codes carried by kError frames.
enum RemoteError : uint32_t { kErrBadSegment = 1, kErrOutOfBounds = 2, kErrBadRequest = 3 };

#pragma pack(push, 1)
struct FrameHeader {
  uint32_t magic;
  uint8_t version;
  uint8_t type;
  uint16_t flags;
  uint32_t length;    // payload bytes after the header
  uint32_t reserved;  // must be 0
  uint64_t req;
  uint64_t a;
  uint64_t b;
};
#pragma pack(pop)
static_assert(sizeof(FrameHeader) == 40, "frame header is 40 bytes on the wire");

constexpr uint32_t kMaxHandshakePayload = 4096;
constexpr uint32_t kMaxNotifyPayload = 64u << 20;  // 64 MiB per notify
constexpr uint32_t kMaxChunkPayload = 16u << 20;   // largest data chunk accepted
constexpr uint32_t kChunkBytes = 4u << 20;         // data chunk size we send
constexpr uint32_t kMaxErrorPayload = 4096;
constexpr uint32_t kMaxUcxInfoPayload = 64u << 10;

inline FrameHeader make_header(uint8_t type, uint16_t flags, uint32_t length, uint64_t req = 0,
                               uint64_t a = 0, uint64_t b = 0) {
  return FrameHeader{kFrameMagic, kWireVersion, type, flags, length, 0, req, a, b};
}

const char* frame_type_name(uint8_t type);

// Returns nullptr if the header is acceptable in this connection phase, else the reason.
const char* validate_header(const FrameHeader& h, bool established);

// Bounds-checked little-endian payload encoding (handshake messages).
class Writer {
 public:
  void u8(uint8_t v) { buf_.push_back(static_cast<char>(v)); }
  void u32(uint32_t v) { buf_.append(reinterpret_cast<const char*>(&v), 4); }
  void u64(uint64_t v) { buf_.append(reinterpret_cast<const char*>(&v), 8); }
  void str(const std::string& s);  // u16 length + bytes (truncates nothing: caller limits size)
  void raw(const std::string& s) { buf_.append(s); }
  std::string& data() { return buf_; }

 private:
  std::string buf_;
};

class Reader {
 public:
  Reader(const void* p, size_t n) : p_(static_cast<const uint8_t*>(p)), n_(n) {}
  uint8_t u8();
  uint32_t u32();
  uint64_t u64();
  std::string str(size_t max_len);
  std::string raw(size_t n);
  bool ok() const { return ok_; }
  bool at_end() const { return pos_ == n_; }

 private:
  bool need(size_t k);
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
  bool ok_ = true;
};

constexpr size_t kNonceBytes = 16;
constexpr size_t kMaxNameBytes = 256;

enum HelloStatus : uint32_t {
  kHelloOk = 0,
  kHelloBadSecret = 1,
  kHelloDuplicate = 2,
  kHelloDeadName = 3,
  kHelloBadRequest = 4,
  kHelloClosing = 5,
};

struct BannerMsg {
  std::string name;
  std::string nonce;  // kNonceBytes
};

struct HelloMsg {
  std::string name;
  std::string host_id;
  uint32_t pid = 0;
  std::string endpoint;
  std::string nonce;  // kNonceBytes
  std::string mac;    // 32 bytes: HMAC(secret, "mooncake-hello" | banner nonce | name)
  uint32_t doorbell_fd = UINT32_MAX;  // same-host notify doorbell (memfd number), or none
  std::string doorbell_name;
};

struct HelloAckMsg {
  uint32_t status = kHelloOk;
  std::string name;
  std::string host_id;
  uint32_t pid = 0;
  std::string endpoint;
  std::string mac;  // 32 bytes: HMAC(secret, "mooncake-ack" | hello nonce | name); empty unless ok
  std::string message;
  uint32_t doorbell_fd = UINT32_MAX;
  std::string doorbell_name;
};

std::string encode(const BannerMsg& m);
std::string encode(const HelloMsg& m);
std::string encode(const HelloAckMsg& m);
bool decode(const std::string& p, BannerMsg& m);
bool decode(const std::string& p, HelloMsg& m);
bool decode(const std::string& p, HelloAckMsg& m);

}  // namespace mooncake::transfer
