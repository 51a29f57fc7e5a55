#include "frame.h"

#include <cstring>

#include "common.h"

namespace mooncake::transfer {

std::string format_error(const ErrorInfo& e) {
  switch (e.kind) {
    case ErrKind::kPeerDead:
      return "peer '" + e.peer + "' is dead: " + e.reason;
    case ErrKind::kTimeout:
      return e.peer.empty() ? "timed out: " + e.reason : "timed out (peer '" + e.peer + "'): " + e.reason;
    default:
      return e.peer.empty() ? e.reason : "peer '" + e.peer + "': " + e.reason;
  }
}

std::string errno_str(int err) {
  char buf[128];
  // GNU strerror_r returns a char* that may or may not be buf.
  const char* s = strerror_r(err, buf, sizeof(buf));
  return std::string(s) + " (errno " + std::to_string(err) + ")";
}

const char* frame_type_name(uint8_t type) {
  static const char* names[] = {"?",         "BANNER", "HELLO",   "HELLO_ACK", "HEARTBEAT",
                                "BYE",       "PING",   "PONG",    "NOTIFY",    "WRITE",
                                "WRITE_ACK", "READ_REQ", "READ_RESP", "ERROR", "RING_OFFER", "RING_ACCEPT",
                                "UCX_INFO_REQ", "UCX_INFO_RESP"};
  return type < kFrameTypeEnd ? names[type] : "?";
}

const char* validate_header(const FrameHeader& h, bool established) {
  if (h.magic != kFrameMagic) return "bad magic";
  if (h.version != kWireVersion) return "unsupported wire version";
  if (h.reserved != 0) return "reserved field not zero";
  if (h.type == 0 || h.type >= kFrameTypeEnd) return "unknown frame type";
  if (h.flags & ~uint16_t(kFlagLast)) return "unknown flags";
  const uint32_t n = h.length;
  switch (h.type) {
    case kBanner:
    case kHelloAck:
      return "handshake frame not expected here";  // dialers read these synchronously
    case kHello:
      if (established) return "HELLO on an established connection";
      return (n == 0 || n > kMaxHandshakePayload) ? "bad HELLO length" : nullptr;
    default:
      break;
  }
  if (!established) return "frame before handshake";
  switch (h.type) {
    case kHeartbeat:
    case kBye:
    case kPing:
    case kPong:
    case kWriteAck:
      return n == 0 ? nullptr : "control frame with payload";
    case kNotify:
      return n > kMaxNotifyPayload ? "notify payload too large" : nullptr;
    case kWrite:
    case kReadResp:
      return (n == 0 || n > kMaxChunkPayload) ? "bad data chunk length" : nullptr;
    case kReadReq:
      return n == 8 ? nullptr : "bad READ_REQ length";
    case kError:
      return n > kMaxErrorPayload ? "error payload too large" : nullptr;
    case kRingOffer:
      return (n == 0 || n > kMaxHandshakePayload) ? "bad RING_OFFER length" : nullptr;
    case kRingAccept:
      return n == 0 ? nullptr : "RING_ACCEPT with payload";
    case kUcxInfoReq:
      return n == 0 ? nullptr : "UCX_INFO_REQ with payload";
    case kUcxInfoResp:
      return (n == 0 || n > kMaxUcxInfoPayload) ? "bad UCX_INFO_RESP length" : nullptr;
    default:
      return "unexpected frame type";
  }
}

void Writer::str(const std::string& s) {
  uint16_t n = static_cast<uint16_t>(s.size() > 0xFFFF ? 0xFFFF : s.size());
  buf_.append(reinterpret_cast<const char*>(&n), 2);
  buf_.append(s.data(), n);
}

bool Reader::need(size_t k) {
  if (!ok_ || n_ - pos_ < k) {
    ok_ = false;
    return false;
  }
  return true;
}
uint8_t Reader::u8() {
  if (!need(1)) return 0;
  return p_[pos_++];
}
uint32_t Reader::u32() {
  uint32_t v = 0;
  if (!need(4)) return 0;
  std::memcpy(&v, p_ + pos_, 4);
  pos_ += 4;
  return v;
}
uint64_t Reader::u64() {
  uint64_t v = 0;
  if (!need(8)) return 0;
  std::memcpy(&v, p_ + pos_, 8);
  pos_ += 8;
  return v;
}
std::string Reader::str(size_t max_len) {
  if (!need(2)) return {};
  uint16_t n;
  std::memcpy(&n, p_ + pos_, 2);
  pos_ += 2;
  if (n > max_len || !need(n)) {
    ok_ = false;
    return {};
  }
  std::string s(reinterpret_cast<const char*>(p_ + pos_), n);
  pos_ += n;
  return s;
}
std::string Reader::raw(size_t n) {
  if (!need(n)) return {};
  std::string s(reinterpret_cast<const char*>(p_ + pos_), n);
  pos_ += n;
  return s;
}

std::string encode(const BannerMsg& m) {
  Writer w;
  w.str(m.name);
  w.raw(m.nonce);
  return std::move(w.data());
}

std::string encode(const HelloMsg& m) {
  Writer w;
  w.str(m.name);
  w.str(m.host_id);
  w.u32(m.pid);
  w.str(m.endpoint);
  w.raw(m.nonce);
  w.raw(m.mac);
  w.u32(m.doorbell_fd);
  w.str(m.doorbell_name);
  return std::move(w.data());
}

std::string encode(const HelloAckMsg& m) {
  Writer w;
  w.u32(m.status);
  w.str(m.name);
  w.str(m.host_id);
  w.u32(m.pid);
  w.str(m.endpoint);
  w.u8(static_cast<uint8_t>(m.mac.size()));
  w.raw(m.mac);
  w.str(m.message);
  w.u32(m.doorbell_fd);
  w.str(m.doorbell_name);
  return std::move(w.data());
}

bool decode(const std::string& p, BannerMsg& m) {
  Reader r(p.data(), p.size());
  m.name = r.str(kMaxNameBytes);
  m.nonce = r.raw(kNonceBytes);
  return r.ok() && r.at_end() && !m.name.empty();
}

bool decode(const std::string& p, HelloMsg& m) {
  Reader r(p.data(), p.size());
  m.name = r.str(kMaxNameBytes);
  m.host_id = r.str(512);
  m.pid = r.u32();
  m.endpoint = r.str(512);
  m.nonce = r.raw(kNonceBytes);
  m.mac = r.raw(32);
  m.doorbell_fd = r.u32();
  m.doorbell_name = r.str(256);
  return r.ok() && r.at_end() && !m.name.empty();
}

bool decode(const std::string& p, HelloAckMsg& m) {
  Reader r(p.data(), p.size());
  m.status = r.u32();
  m.name = r.str(kMaxNameBytes);
  m.host_id = r.str(512);
  m.pid = r.u32();
  m.endpoint = r.str(512);
  uint8_t mac_len = r.u8();
  if (mac_len != 0 && mac_len != 32) return false;
  m.mac = r.raw(mac_len);
  m.message = r.str(1024);
  m.doorbell_fd = r.u32();
  m.doorbell_name = r.str(256);
  return r.ok() && r.at_end();
}

}  // namespace mooncake::transfer
