// One TCP connection to a peer: an ordered send queue (writev, zero-copy for data payloads) and a
// receive state machine that parses frames and lets the engine choose where each payload lands
// (straight into a registered segment or a read's destination: no staging copy for large data).
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "batch.h"
#include "frame.h"

namespace mooncake::transfer {

struct Peer;

// A request waiting for the peer's answer.
struct Pending {
  enum Kind : uint8_t { kWrite, kRead, kPing, kUcxInfo } kind = kWrite;
  std::shared_ptr<Batch> batch;
  std::shared_ptr<std::string> reply;  // kUcxInfo: the owner's answer
  uint8_t* dst = nullptr;  // kRead: where the data goes
  uint64_t len = 0;
  int64_t t0 = 0;  // kPing: send time
};

struct SendItem {
  FrameHeader hdr{};
  const uint8_t* data = nullptr;  // payload (points into `owned` when copied)
  size_t len = 0;
  std::string owned;
  std::shared_ptr<void> keep;  // keeps a segment in use while its bytes are queued
  size_t sent = 0;             // bytes of header+payload already written
};

// Where the payload of the frame being received goes.
struct RecvTarget {
  uint8_t* ptr = nullptr;  // write straight here
  bool discard = false;    // read and drop (bad request: the connection stays)
  std::shared_ptr<void> keep;
};

class Connection;

class FrameHandler {
 public:
  virtual ~FrameHandler() = default;
  // Called with a validated header; a payload is collected into a buffer unless target says otherwise.
  virtual bool on_header(Connection& c, const FrameHeader& h, RecvTarget& t, std::string& why) = 0;
  // Called when the whole payload has arrived (`payload` holds it if it was collected).
  virtual bool on_frame(Connection& c, const FrameHeader& h, std::string& payload, std::string& why) = 0;
};

class Connection {
 public:
  Connection(int fd, int epfd, bool dialed, std::string remote);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  int fd() const { return fd_; }
  bool dialed() const { return dialed_; }
  const std::string& remote() const { return remote_; }

  // Queues frames in order and writes what the socket takes now. Unsent payload bytes are copied
  // when `copy_rest` (the caller's buffer may go away), else stay referenced until written.
  // Returns false when the connection is closed.
  bool send(SendItem* items, size_t n, bool copy_rest);
  // I/O thread, on EPOLLOUT. Returns false on a socket error.
  bool flush();
  bool send_queue_empty();

  // I/O thread: reads and dispatches frames; false when the connection must be dropped (`why`).
  // `eof` tells an orderly close from an error.
  bool on_readable(FrameHandler& h, std::string& why, bool& eof);

  bool add_pending(uint64_t req, Pending p);  // false when closed
  // TCP writes sent but not acknowledged yet (a same-host ring notify must not overtake them).
  int writes_inflight() const { return writes_inflight_.load(std::memory_order_acquire); }
  bool find_pending(uint64_t req, Pending* out);
  bool take_pending(uint64_t req, Pending* out);
  // Marks closed, drops queued sends and hands back every pending request (to be failed).
  std::vector<Pending> shut(bool shutdown_socket);
  bool closed() const { return closed_.load(std::memory_order_acquire); }
  // Any thread: stop accepting new requests and shut the socket down so the I/O thread sees EOF
  // and closes the connection (it alone fails pending requests: it may be writing into them).
  void request_close();
  // Closes the fd (I/O thread, after removing it from epoll).
  void close_fd();

  std::atomic<int64_t> last_rx{0};
  std::atomic<int64_t> last_tx{0};

  // Handshake / identity (guarded by the engine mutex).
  std::shared_ptr<Peer> peer;
  bool established = false;
  int64_t hs_deadline = 0;
  std::string banner_nonce;
  bool got_bye = false;
  bool quiet_drop = false;  // refused as a normal race (duplicate dial, closing): a debug line
  uint64_t last_err_req = 0;  // one ERROR per failed request, no ACK after it
  uint32_t cur_err = 0;       // error code of the WRITE frame being received (I/O thread)

 private:
  bool flush_locked();
  void set_out_locked(bool on);

  int fd_;
  int epfd_;
  bool dialed_;
  std::string remote_;
  std::atomic<bool> closed_{false};

  std::mutex send_mu_;
  std::deque<SendItem> sendq_;
  bool out_armed_ = false;

  std::atomic<int> writes_inflight_{0};
  std::mutex ops_mu_;
  std::unordered_map<uint64_t, Pending> pending_;

  // Receive state (I/O thread only).
  std::vector<uint8_t> rbuf_;
  size_t rpos_ = 0, rlen_ = 0;
  bool in_payload_ = false;
  FrameHeader hdr_{};
  RecvTarget target_;
  std::string payload_;
  uint64_t done_ = 0;
};

}  // namespace mooncake::transfer
