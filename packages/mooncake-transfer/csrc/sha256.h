// SHA-256 and HMAC-SHA256 (FIPS 180-4 / RFC 2104), used only for the secret handshake so the
// group secret never crosses the wire. Small and dependency free on purpose.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace mooncake::transfer {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t len);
  void finish(uint8_t out[32]);

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  uint64_t total_ = 0;
  size_t used_ = 0;
};

// HMAC-SHA256(key, msg) as 32 raw bytes.
std::string hmac_sha256(const std::string& key, const std::string& msg);

// Constant-time equality for MACs.
bool equal_ct(const std::string& a, const std::string& b);

}  // namespace mooncake::transfer
