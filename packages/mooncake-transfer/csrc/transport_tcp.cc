// TCP transport: WRITE frames carry the data (chunked, zero-copy from the caller's buffer); READ
// sends a request and the owner streams READ_RESP chunks straight into the destination.
#include "engine.h"

namespace mooncake::transfer {

void TcpTransport::post(const Op& op, const std::shared_ptr<Batch>& b) {
  auto& peer = op.seg->peer;
  auto c = peer->get_conn();
  if (!c || peer->dead()) {
    b->complete_err(peer->dead_error());
    return;
  }
  const uint64_t req = engine_.next_req();
  Pending p;
  p.kind = op.write ? Pending::kWrite : Pending::kRead;
  p.batch = b;
  p.dst = op.local;
  p.len = op.len;
  if (!c->add_pending(req, std::move(p))) {
    b->complete_err(peer->dead_error());
    return;
  }
  bool ok;
  if (op.write) {
    const size_t n = static_cast<size_t>((op.len + kChunkBytes - 1) / kChunkBytes);
    std::vector<SendItem> items(n);
    for (size_t i = 0; i < n; ++i) {
      uint64_t off = i * uint64_t(kChunkBytes);
      uint32_t chunk = static_cast<uint32_t>(std::min<uint64_t>(kChunkBytes, op.len - off));
      items[i].hdr = make_header(kWrite, i + 1 == n ? kFlagLast : 0, chunk, req, op.seg->desc.seg_id, op.offset + off);
      items[i].data = op.local + off;
      items[i].len = chunk;
    }
    ok = c->send(items.data(), n, false);
  } else {
    SendItem it;
    it.owned.assign(reinterpret_cast<const char*>(&op.len), 8);
    it.len = 8;
    it.hdr = make_header(kReadReq, 0, 8, req, op.seg->desc.seg_id, op.offset);
    ok = c->send(&it, 1, false);
  }
  if (!ok) {
    Pending drop;
    if (c->take_pending(req, &drop)) drop.batch->complete_err(peer->dead_error());
  }
}

}  // namespace mooncake::transfer
