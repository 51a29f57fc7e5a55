#include "connection.h"

#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common.h"

namespace mooncake::transfer {

namespace {
constexpr size_t kRecvBuf = 256 * 1024;
constexpr size_t kDirectRecvMin = 64 * 1024;      // payload remainder read straight into place
constexpr int64_t kReadBudget = 8 * 1024 * 1024;  // per wake-up, so one peer cannot starve others
constexpr int kMaxIov = 64;

inline const uint8_t* payload_ptr(const SendItem& it) {
  return it.owned.empty() ? it.data : reinterpret_cast<const uint8_t*>(it.owned.data());
}
}  // namespace

Connection::Connection(int fd, int epfd, bool dialed, std::string remote)
    : fd_(fd), epfd_(epfd), dialed_(dialed), remote_(std::move(remote)), rbuf_(kRecvBuf) {
  int64_t t = now_ns();
  last_rx.store(t);
  last_tx.store(t);
}

Connection::~Connection() {
  if (fd_ >= 0) ::close(fd_);
}

void Connection::close_fd() {
  std::lock_guard<std::mutex> g(send_mu_);
  closed_.store(true, std::memory_order_release);
  sendq_.clear();
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
}

void Connection::request_close() {
  std::lock_guard<std::mutex> g(send_mu_);
  closed_.store(true, std::memory_order_release);
  if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
}

void Connection::set_out_locked(bool on) {
  if (out_armed_ == on || fd_ < 0 || epfd_ < 0) return;
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLRDHUP | (on ? uint32_t(EPOLLOUT) : 0u);
  ev.data.ptr = this;
  epoll_ctl(epfd_, EPOLL_CTL_MOD, fd_, &ev);
  out_armed_ = on;
}

bool Connection::send(SendItem* items, size_t n, bool copy_rest) {
  std::lock_guard<std::mutex> g(send_mu_);
  if (closed_.load(std::memory_order_acquire) || fd_ < 0) return false;
  const bool was_empty = sendq_.empty();
  for (size_t i = 0; i < n; ++i) sendq_.push_back(std::move(items[i]));
  if (was_empty && !flush_locked()) {
    // Socket error: the I/O thread sees it too and closes the connection.
    return true;
  }
  if (!sendq_.empty()) {
    if (copy_rest) {
      // Popped items come off the front, so the new ones still queued are the last min(n, size).
      const size_t start = sendq_.size() - std::min(n, sendq_.size());
      for (size_t i = start; i < sendq_.size(); ++i) {
        SendItem& it = sendq_[i];
        if (it.owned.empty() && it.len > 0) {
          it.owned.assign(reinterpret_cast<const char*>(it.data), it.len);
          it.data = nullptr;
        }
      }
    }
    set_out_locked(true);
  }
  return true;
}

bool Connection::send_queue_empty() {
  std::lock_guard<std::mutex> g(send_mu_);
  return sendq_.empty();
}

bool Connection::flush() {
  std::lock_guard<std::mutex> g(send_mu_);
  if (fd_ < 0) return false;
  bool ok = flush_locked();
  if (sendq_.empty()) set_out_locked(false);
  return ok;
}

bool Connection::flush_locked() {
  while (!sendq_.empty()) {
    iovec iov[kMaxIov];
    int cnt = 0;
    for (size_t i = 0; i < sendq_.size() && cnt + 2 <= kMaxIov; ++i) {
      SendItem& it = sendq_[i];
      size_t off = it.sent;
      if (off < sizeof(FrameHeader)) {
        iov[cnt].iov_base = reinterpret_cast<uint8_t*>(&it.hdr) + off;
        iov[cnt].iov_len = sizeof(FrameHeader) - off;
        ++cnt;
        off = 0;
      } else {
        off -= sizeof(FrameHeader);
      }
      if (it.len > off) {
        iov[cnt].iov_base = const_cast<uint8_t*>(payload_ptr(it)) + off;
        iov[cnt].iov_len = it.len - off;
        ++cnt;
      }
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = cnt;
    ssize_t w = ::sendmsg(fd_, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
      return false;
    }
    last_tx.store(now_ns(), std::memory_order_relaxed);
    size_t left = static_cast<size_t>(w);
    while (left > 0 && !sendq_.empty()) {
      SendItem& it = sendq_.front();
      size_t rest = sizeof(FrameHeader) + it.len - it.sent;
      if (left >= rest) {
        left -= rest;
        sendq_.pop_front();
      } else {
        it.sent += left;
        left = 0;
      }
    }
  }
  return true;
}

bool Connection::add_pending(uint64_t req, Pending p) {
  std::lock_guard<std::mutex> g(ops_mu_);
  if (closed_.load(std::memory_order_acquire)) return false;
  if (p.kind == Pending::kWrite) writes_inflight_.fetch_add(1, std::memory_order_acq_rel);
  pending_.emplace(req, std::move(p));
  return true;
}

bool Connection::find_pending(uint64_t req, Pending* out) {
  std::lock_guard<std::mutex> g(ops_mu_);
  auto it = pending_.find(req);
  if (it == pending_.end()) return false;
  *out = it->second;
  return true;
}

bool Connection::take_pending(uint64_t req, Pending* out) {
  std::lock_guard<std::mutex> g(ops_mu_);
  auto it = pending_.find(req);
  if (it == pending_.end()) return false;
  *out = std::move(it->second);
  pending_.erase(it);
  if (out->kind == Pending::kWrite) writes_inflight_.fetch_sub(1, std::memory_order_acq_rel);
  return true;
}

std::vector<Pending> Connection::shut(bool shutdown_socket) {
  {
    std::lock_guard<std::mutex> g(send_mu_);
    closed_.store(true, std::memory_order_release);
    sendq_.clear();
    if (shutdown_socket && fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
  }
  std::vector<Pending> out;
  std::lock_guard<std::mutex> g(ops_mu_);
  out.reserve(pending_.size());
  for (auto& kv : pending_) out.push_back(std::move(kv.second));
  pending_.clear();
  writes_inflight_.store(0, std::memory_order_release);
  return out;
}

bool Connection::on_readable(FrameHandler& h, std::string& why, bool& eof) {
  int64_t budget = kReadBudget;
  eof = false;
  // Reads more bytes into rbuf_; 1 = got some, 0 = would block, -1 = closed/error.
  auto fill = [&]() -> int {
    if (rpos_ > 0) {
      std::memmove(rbuf_.data(), rbuf_.data() + rpos_, rlen_ - rpos_);
      rlen_ -= rpos_;
      rpos_ = 0;
    }
    for (;;) {
      ssize_t n = ::recv(fd_, rbuf_.data() + rlen_, rbuf_.size() - rlen_, MSG_DONTWAIT);
      if (n > 0) {
        rlen_ += static_cast<size_t>(n);
        budget -= n;
        last_rx.store(now_ns(), std::memory_order_relaxed);
        return 1;
      }
      if (n == 0) {
        eof = true;
        why = in_payload_ || rlen_ > 0 ? "connection closed in the middle of a frame" : "connection closed";
        return -1;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      why = "recv: " + errno_str(errno);
      return -1;
    }
  };

  for (;;) {
    if (budget <= 0) return true;
    if (!in_payload_) {
      if (rlen_ - rpos_ < sizeof(FrameHeader)) {
        int r = fill();
        if (r < 0) return false;
        if (r == 0) return true;
        continue;
      }
      std::memcpy(&hdr_, rbuf_.data() + rpos_, sizeof(FrameHeader));
      rpos_ += sizeof(FrameHeader);
      if (const char* bad = validate_header(hdr_, established)) {
        why = std::string("malformed frame: ") + bad + " (type " + std::to_string(hdr_.type) +
              ", length " + std::to_string(hdr_.length) + ")";
        return false;
      }
      target_ = RecvTarget{};
      payload_.clear();
      done_ = 0;
      if (!h.on_header(*this, hdr_, target_, why)) return false;
      if (!target_.ptr && !target_.discard) payload_.resize(hdr_.length);
      in_payload_ = true;
      continue;
    }
    const uint64_t remaining = hdr_.length - done_;
    if (remaining == 0) {
      in_payload_ = false;
      bool ok = h.on_frame(*this, hdr_, payload_, why);
      target_ = RecvTarget{};  // releases the segment in use
      if (!ok) return false;
      continue;
    }
    uint8_t* dst = target_.ptr ? target_.ptr + done_
                               : (target_.discard ? nullptr : reinterpret_cast<uint8_t*>(&payload_[0]) + done_);
    const size_t avail = rlen_ - rpos_;
    if (avail > 0) {
      size_t k = static_cast<size_t>(std::min<uint64_t>(avail, remaining));
      if (dst) std::memcpy(dst, rbuf_.data() + rpos_, k);
      rpos_ += k;
      done_ += k;
      continue;
    }
    if (dst && remaining >= kDirectRecvMin) {
      ssize_t n = ::recv(fd_, dst, static_cast<size_t>(remaining), MSG_DONTWAIT);
      if (n > 0) {
        done_ += static_cast<uint64_t>(n);
        budget -= n;
        last_rx.store(now_ns(), std::memory_order_relaxed);
        continue;
      }
      if (n == 0) {
        eof = true;
        why = "connection closed in the middle of a frame";
        return false;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
      why = "recv: " + errno_str(errno);
      return false;
    }
    int r = fill();
    if (r < 0) return false;
    if (r == 0) return true;
  }
}

}  // namespace mooncake::transfer
