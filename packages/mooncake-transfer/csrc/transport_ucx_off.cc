// UCX transport when built with MOONCAKE_TRANSFER_UCX=OFF: every entry point reports that.
#include "engine.h"

namespace mooncake::transfer {

namespace {
const char* kOff = "this build has no UCX transport (built with MOONCAKE_TRANSFER_UCX=OFF)";
}

struct UcxCore {};
struct UcxEp {};
UcxMemReg::~UcxMemReg() = default;
UcxRemote::~UcxRemote() = default;

std::string UcxTransport::probe(const std::string&, bool*, bool*, std::string*) { return kOff; }
std::unique_ptr<UcxTransport> UcxTransport::create(Engine&, const std::string&, std::string& why) {
  why = kOff;
  return nullptr;
}
UcxTransport::~UcxTransport() = default;
void UcxTransport::post(const Op& op, const std::shared_ptr<Batch>& b) {
  b->complete_err(ErrorInfo{ErrKind::kGeneric, op.seg->peer->name, kOff});
  engine_.local_op_done(*op.seg->peer);
}
std::shared_ptr<UcxMemReg> UcxTransport::map(void*, uint64_t, bool, std::string& why) {
  why = kOff;
  return nullptr;
}
bool UcxTransport::export_segment(LocalSegment&, std::string&, std::string& why) {
  why = kOff;
  return false;
}
void UcxTransport::attach(RemoteSeg& rs, const std::string&) {
  throw TransferErr(ErrKind::kGeneric, rs.peer->name, kOff);
}
void UcxTransport::peer_dead(const std::string&) {}
void UcxTransport::shutdown() {}

}  // namespace mooncake::transfer
