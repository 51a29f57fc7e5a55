// pybind11 bindings: mooncake.transfer._engine. Every call that can wait releases the GIL.
// Argument errors raise ValueError naming the argument; transfer failures raise the Python
// exception types registered by mooncake.transfer (TransferError, PeerDeadError, TransferTimeout).
#include <pybind11/native_enum.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <optional>

#include "engine.h"
#include "faults.h"
#include "proxy.h"  // host proxy ring (issue 15); bindings in the block at the end
#include "reduce.h"
#include "rounds.h"

namespace py = pybind11;
using namespace mooncake::transfer;

namespace {

PyObject* g_err_types[3] = {nullptr, nullptr, nullptr};  // generic, peer dead, timeout

// Releases the GIL for a blocking call. Unlike py::gil_scoped_release its destructor may throw:
// a daemon thread re-taking the GIL while the interpreter finalizes is ended by pthread_exit(),
// whose forced unwind must pass through here (through a noexcept destructor it would abort).
class GilRelease {
 public:
  GilRelease() : state_(PyEval_SaveThread()) {}
  ~GilRelease() noexcept(false) { PyEval_RestoreThread(state_); }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_;
};

double timeout_arg(const std::optional<double>& t, const char* name = "timeout") {
  if (!t) return -1.0;
  if (!std::isfinite(*t) || *t < 0)
    throw std::invalid_argument(std::string(name) + " must be a finite number >= 0 or None, got " +
                                std::to_string(*t));
  return *t;
}

uint64_t nonneg(int64_t v, const char* name) {
  if (v < 0) throw std::invalid_argument(std::string(name) + " must be >= 0, got " + std::to_string(v));
  return static_cast<uint64_t>(v);
}

struct SegmentObj {
  std::shared_ptr<LocalSegment> seg;
  std::string desc;
};

// Buffer exporter for Segment.view(): keeps the mapping alive while a memoryview exists.
struct SegmentBuffer {
  std::shared_ptr<LocalSegment> seg;
};

struct NotificationObj {
  MessagePtr m;
  py::object data_cache;
};

Op make_op(const std::string& kind, const std::shared_ptr<RemoteSeg>& seg, int64_t offset, int64_t addr,
           int64_t length, const std::string& where, const char* addr_name) {
  if (!seg) throw std::invalid_argument(where + "seg must be a RemoteSegment, got None");
  Op op;
  if (kind == "write") op.write = true;
  else if (kind == "read") op.write = false;
  else throw std::invalid_argument(where + "kind must be 'write' or 'read', got '" + kind + "'");
  op.seg = seg;
  op.offset = nonneg(offset, (where + "offset").c_str());
  op.len = nonneg(length, (where + "length").c_str());
  uint64_t a = nonneg(addr, (where + addr_name).c_str());
  if (op.offset > seg->desc.length || op.len > seg->desc.length - op.offset)
    throw std::invalid_argument(where + "offset + length = " + std::to_string(op.offset + op.len) +
                                " exceeds the remote segment length " + std::to_string(seg->desc.length));
  if (op.len > 0 && a == 0) throw std::invalid_argument(where + addr_name + " is a null address");
  op.local = reinterpret_cast<uint8_t*>(a);
  return op;
}

void run_sync(Engine& e, Op op, double timeout, const char* what) {
  std::vector<Op> ops{std::move(op)};
  auto b = e.submit(ops);
  Status s = b->wait(deadline_after(timeout));
  if (s == Status::kTimeout)
    throw TransferErr(ErrKind::kTimeout, ops[0].seg->peer->name,
                      std::string(what) + " of " + std::to_string(ops[0].len) + " bytes did not finish in time");
  if (s == Status::kFailed) throw TransferErr(b->error());
}

py::object to_notification(MessagePtr m) {
  if (!m) return py::none();
  return py::cast(NotificationObj{std::move(m), py::none()});
}

// The RoundStatus members (mooncake.transfer.RoundStatus), looked up once: results reuse them.
PyObject* g_round_status[kRoundStatusCount] = {};

py::tuple round_result(RoundResult& r) {
  py::handle status(g_round_status[static_cast<int>(r.status)]);
  switch (r.status) {
    case RoundStatus::kMessage:
      return py::make_tuple(status, to_notification(std::move(r.msg)));
    case RoundStatus::kDead:
    case RoundStatus::kSendFailed:
      return py::make_tuple(status, py::str(r.reason));
    default:
      return py::make_tuple(status, py::none());
  }
}

py::list round_results(std::vector<RoundResult>& v) {
  py::list res(v.size());
  for (size_t i = 0; i < v.size(); ++i) res[i] = round_result(v[i]);
  return res;
}

// Pointer-list argument of reduce(): addresses, none null.
std::vector<const void*> addr_list(const std::vector<int64_t>& v, const char* name) {
  std::vector<const void*> out;
  out.reserve(v.size());
  for (int64_t a : v) {
    if (a <= 0) throw std::invalid_argument(std::string(name) + " holds a null or negative address");
    out.push_back(reinterpret_cast<const void*>(a));
  }
  return out;
}

int threads_arg(int64_t t) {
  if (t < 1 || t > 1024) throw std::invalid_argument("threads must be in [1, 1024], got " + std::to_string(t));
  return static_cast<int>(t);
}


// A proxy signal epoch from Python (16 bits on the wire, ProxySignalMsg::epoch).
uint16_t proxy_epoch(int64_t e) {
  if (e < 0 || e > 0xFFFF) throw std::invalid_argument("epoch must be in [0, 65535], got " + std::to_string(e));
  return static_cast<uint16_t>(e);
}
}  // namespace

PYBIND11_MODULE(_engine, m) {
  m.doc() = "mooncake transfer engine native core (torch-free)";

  py::native_enum<RoundStatus>(m, "RoundStatus", "enum.IntEnum",
                               "Per-peer outcome of a message round (recv_round, exchange_round).")
      .value("MESSAGE", RoundStatus::kMessage, "a message that did not land, returned as a Notification")
      .value("DEAD", RoundStatus::kDead, "the peer is DEAD with nothing queued (the reason is returned)")
      .value("TIMEOUT", RoundStatus::kTimeout, "nothing from the peer before the deadline")
      .value("LANDED", RoundStatus::kLanded, "the message equalled the expectation; its payload was copied")
      .value("SEND_FAILED", RoundStatus::kSendFailed, "this side's message could not be sent (the reason is returned)")
      .finalize();
  {
    py::object cls = m.attr("RoundStatus");
    for (int i = 0; i < kRoundStatusCount; ++i) g_round_status[i] = cls(i).release().ptr();  // kept for good
  }

  m.attr("DEFAULT_HEARTBEAT_INTERVAL") = kDefaultHeartbeatIntervalS;
  m.attr("DEFAULT_HEARTBEAT_TIMEOUT") = kDefaultHeartbeatTimeoutS;

  auto point_arg = [](const std::string& point) {
    FaultPoint p;
    if (!fault_point_of(point, p))
      throw std::invalid_argument("point must be 'send', 'land', 'then' or 'cma', got '" + point + "'");
    return p;
  };
  m.def("arm_fault", [point_arg](const std::string& point, int64_t nth) {
    const FaultPoint p = point_arg(point);
    if (nth < 1) throw std::invalid_argument("nth must be >= 1, got " + std::to_string(nth));
    arm_fault(p, static_cast<uint64_t>(nth));
  }, py::arg("point"), py::arg("nth") = 1,
  "Test hook: this process kills itself with SIGKILL at the nth hit of a native fault point, "
  "counted from now, in every engine of the process. 'send': after each notification sent "
  "(notify, notify_ptr, notify_many, exchange_round's messages including `then`); 'land': after "
  "each message a round landed or returned (exchange_round, recv_round); 'then': after each "
  "`then` message of exchange_round; 'cma': inside each CMA copy, while its in-flight count on "
  "the owner's segment is raised. Disarmed, a point costs one relaxed atomic load.");
  m.def("disarm_fault", [point_arg](std::optional<std::string> point) {
    if (point) arm_fault(point_arg(*point), 0);
    else disarm_faults();
  }, py::arg("point") = py::none(), "Disarms one native fault point (None: all of them).");
  m.def("fault_hits", [point_arg](const std::string& point) { return fault_hits(point_arg(point)); },
        py::arg("point"), "Hits of a native fault point since it was last armed (or disarmed).");

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const TransferErr& e) {
      PyObject* type = g_err_types[static_cast<int>(e.info.kind)];
      if (!type) type = g_err_types[0];
      if (!type) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
        return;
      }
      py::object peer = e.info.peer.empty() ? py::none() : py::object(py::str(e.info.peer));
      py::object inst = py::reinterpret_borrow<py::object>(type)(e.what(), peer, e.info.reason);
      PyErr_SetObject(type, inst.ptr());
    }
  });

  m.def("_set_error_types", [](py::object generic, py::object dead, py::object timeout) {
    py::object objs[3] = {generic, dead, timeout};
    for (int i = 0; i < 3; ++i) {
      Py_XDECREF(g_err_types[i]);
      g_err_types[i] = objs[i].inc_ref().ptr();
    }
  });

  m.def("rdma_status", []() {
    std::string devs;
    std::string why = VerbsTransport::probe(&devs);
    return why.empty() ? std::string("available: ") + devs : why;
  }, "Why RDMA verbs can (not) be used here, as a sentence.");

  m.def("ucx_status", [](const std::string& lib_dir) {
    std::string desc;
    std::string why;
    {
      GilRelease r;
      why = UcxTransport::probe(lib_dir, nullptr, nullptr, &desc);
    }
    return why.empty() ? "available: " + desc : why;
  }, py::arg("lib_dir") = "", "Whether UCX can be used here and what it offers, as a sentence.");

  m.def("reduce", [](int64_t dtype, int64_t op, int64_t count, const std::vector<int64_t>& parts, int64_t out,
                     int64_t threads) {
    const std::string why = reduce_unsupported(static_cast<int>(dtype), static_cast<int>(op));
    if (!why.empty())
      throw std::invalid_argument("dtype " + std::to_string(dtype) + " / op " + std::to_string(op) + " " + why);
    const uint64_t n = nonneg(count, "count");
    if (parts.empty()) throw std::invalid_argument("parts must hold at least one address");
    std::vector<const void*> p = addr_list(parts, "parts");
    if (out <= 0) throw std::invalid_argument("out must be a non-null address, got " + std::to_string(out));
    const int t = threads_arg(threads);
    GilRelease r;
    reduce_rows(static_cast<int>(dtype), static_cast<int>(op), static_cast<size_t>(n), p,
                reinterpret_cast<void*>(out), t);
  }, py::arg("dtype"), py::arg("op"), py::arg("count"), py::arg("parts"), py::arg("out"), py::arg("threads") = 1,
  "out[i] = parts[0][i] op parts[1][i] op ... (left fold in part order, bit-identical to torch's "
  "binary ops) over `count` elements, without the GIL, on this thread plus at most threads - 1 "
  "helpers for large buffers. dtype: 1 f32, 2 f64, 3 i32, 4 i64, 5 bf16, 6 f16, 7 i8, 8 u8, 9 i16; "
  "op: 1 SUM, 2 PRODUCT, 3 MIN, 4 MAX, 5 BAND, 6 BOR, 7 BXOR (floats: 1-2). `out` may equal a part.");

  m.def("copy", [](int64_t dst, int64_t src, int64_t n, int64_t threads) {
    const uint64_t len = nonneg(n, "n");
    if (len && (dst <= 0 || src <= 0)) throw std::invalid_argument("dst and src must be non-null addresses");
    const int t = threads_arg(threads);
    GilRelease r;
    copy_bytes(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), static_cast<size_t>(len), t);
  }, py::arg("dst"), py::arg("src"), py::arg("n"), py::arg("threads") = 1,
  "memmove of n bytes without the GIL; large non-overlapping copies on up to `threads` threads.");

  m.def("_memcpy", [](int64_t dst, int64_t src, int64_t n) {
    std::memcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), static_cast<size_t>(n));
  }, py::call_guard<GilRelease>(), "memcpy between raw addresses (bench floor).");

  py::class_<SegmentBuffer>(m, "_SegmentBuffer", py::buffer_protocol())
      .def_buffer([](SegmentBuffer& b) {
        return py::buffer_info(b.seg->addr, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.seg->length)}, {1});
      });

  py::class_<SegmentObj>(m, "Segment", "Memory this engine owns or registered. addr/length in bytes.")
      .def_property_readonly("addr", [](const SegmentObj& s) { return reinterpret_cast<uint64_t>(s.seg->addr); })
      .def_property_readonly("length", [](const SegmentObj& s) { return s.seg->length; })
      .def_property_readonly("location", [](const SegmentObj& s) { return s.seg->location; })
      .def_property_readonly("id", [](const SegmentObj& s) { return s.seg->id; })
      .def_property_readonly("shared", [](const SegmentObj& s) { return s.seg->kind == SegKind::kMemfd; })
      .def("descriptor", [](const SegmentObj& s) { return py::bytes(s.desc); },
           "Portable bytes a peer passes to open_segment().")
      .def("view", [](const SegmentObj& s) { return py::memoryview(py::cast(SegmentBuffer{s.seg})); },
           "Writable memoryview of the whole segment (keeps allocate()d memory alive).")
      .def("__len__", [](const SegmentObj& s) { return s.seg->length; })
      .def("__repr__", [](const SegmentObj& s) {
        return "<Segment id=" + std::to_string(s.seg->id) + " length=" + std::to_string(s.seg->length) +
               " location=" + s.seg->location + (s.seg->kind == SegKind::kMemfd ? " shared" : "") + ">";
      });

  // Buffer exporter for RemoteSegment.view(): each view holds a reference to the shared mapping.
  py::class_<ShmMapping, std::shared_ptr<ShmMapping>>(m, "_ShmMapping", py::buffer_protocol())
      .def_buffer([](ShmMapping& s) {
        return py::buffer_info(s.base, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(s.len)}, {1});
      });

  py::class_<RemoteSeg, std::shared_ptr<RemoteSeg>>(m, "RemoteSegment", "A peer's segment opened by this engine.")
      .def("view", [](const RemoteSeg& r) -> py::object {
        if (r.kind != TransportKind::kShm || !r.map)
          throw TransferErr(ErrKind::kGeneric, r.peer->name,
                            "RemoteSegment.view(): segment " + std::to_string(r.desc.seg_id) + " of '" +
                                r.peer->name + "' is reached over transport '" + transport_name(r.kind) +
                                "'; only 'shm' segments (same host, allocate()d by the peer) can be mapped");
        py::object whole = py::memoryview(py::cast(r.map));
        return whole[py::slice(0, static_cast<py::ssize_t>(r.desc.length), 1)];
      }, "Writable memoryview of a peer's shared-memory segment (transport 'shm' only); the "
         "mapping stays valid while the view lives, even after the owner exits.")
      .def_property_readonly("peer", [](const RemoteSeg& r) { return r.peer->name; })
      .def_property_readonly("length", [](const RemoteSeg& r) { return r.desc.length; })
      .def_property_readonly("transport", [](const RemoteSeg& r) { return std::string(transport_name(r.kind)); })
      .def_property_readonly("location", [](const RemoteSeg& r) { return r.desc.location; })
      .def_property_readonly("segment_id", [](const RemoteSeg& r) { return r.desc.seg_id; })
      .def("__repr__", [](const RemoteSeg& r) {
        return "<RemoteSegment peer='" + r.peer->name + "' id=" + std::to_string(r.desc.seg_id) +
               " length=" + std::to_string(r.desc.length) + " transport=" + transport_name(r.kind) + ">";
      });

  py::class_<Batch, std::shared_ptr<Batch>>(m, "_Batch")
      .def("poll", [](const Batch& b) { return static_cast<int>(b.poll()); })
      .def("wait", [](Batch& b, std::optional<double> timeout) {
        double t = timeout_arg(timeout);
        GilRelease r;
        return static_cast<int>(b.wait(deadline_after(t)));
      }, py::arg("timeout") = py::none())
      .def("error", [](const Batch& b) -> py::object {
        if (!b.failed()) return py::none();
        ErrorInfo e = b.error();
        return py::make_tuple(static_cast<int>(e.kind), e.peer.empty() ? py::object(py::none()) : py::str(e.peer),
                              e.reason, format_error(e));
      });

  py::class_<NotificationObj>(m, "Notification", "A received notification: peer name, tag and payload bytes.")
      .def_property_readonly("peer", [](const NotificationObj& n) { return *n.m->peer; })
      .def_property_readonly("tag", [](const NotificationObj& n) { return n.m->tag; })
      .def_property_readonly("data", [](NotificationObj& n) {
        if (n.data_cache.is_none()) n.data_cache = py::bytes(n.m->data);
        return n.data_cache;
      })
      .def_property_readonly("nbytes", [](const NotificationObj& n) { return n.m->data.size(); })
      .def("copy_to", [](const NotificationObj& n, int64_t addr, int64_t length, int64_t offset) {
        uint64_t a = nonneg(addr, "addr"), len = nonneg(length, "length"), off = nonneg(offset, "offset");
        const size_t size = n.m->data.size();
        if (off > size)
          throw std::invalid_argument("offset: " + std::to_string(off) + " is past the notification's " +
                                      std::to_string(size) + " bytes");
        const size_t count = size - off;
        if (len < count)
          throw std::invalid_argument("length: buffer of " + std::to_string(len) +
                                      " bytes is smaller than the notification's " + std::to_string(count) +
                                      " bytes from offset " + std::to_string(off));
        if (count && a == 0) throw std::invalid_argument("addr is a null address");
        if (count) {
          py::gil_scoped_release r;
          std::memcpy(reinterpret_cast<void*>(a), n.m->data.data() + off, count);
        }
        return count;
      }, py::arg("addr"), py::arg("length"), py::arg("offset") = 0,
      "Copies the payload from `offset` on to raw memory; returns bytes copied.")
      .def("head", [](const NotificationObj& n, int64_t count) {
        const size_t c = std::min<size_t>(nonneg(count, "count"), n.m->data.size());
        return py::bytes(n.m->data.data(), c);
      }, py::arg("count"), "The first `count` bytes of the payload (fewer if it is shorter).")
      .def("__len__", [](const NotificationObj& n) { return n.m->data.size(); })
      .def("__repr__", [](const NotificationObj& n) {
        return "<Notification peer='" + *n.m->peer + "' tag=" + std::to_string(n.m->tag) +
               " nbytes=" + std::to_string(n.m->data.size()) + ">";
      });

  py::class_<Engine, std::shared_ptr<Engine>>(m, "Engine")
      .def(py::init([](std::string name, std::string host, int port, py::bytes secret, double hb_interval,
                       double hb_timeout, std::string transport, std::string host_id, double hs_timeout,
                       bool notify_ring, std::string ucx_lib_dir) {
             EngineConfig c;
             c.name = std::move(name);
             c.host = std::move(host);
             c.port = port;
             c.secret = secret;
             c.heartbeat_interval_s = hb_interval;
             c.heartbeat_timeout_s = hb_timeout;
             c.transport = std::move(transport);
             c.host_id = std::move(host_id);
             c.handshake_timeout_s = hs_timeout;
             c.notify_ring = notify_ring;
             c.ucx_lib_dir = std::move(ucx_lib_dir);
             GilRelease r;
             return std::make_shared<Engine>(std::move(c));
           }),
           py::arg("name"), py::arg("host"), py::arg("port"), py::arg("secret"), py::arg("heartbeat_interval"),
           py::arg("heartbeat_timeout"), py::arg("transport"), py::arg("host_id"),
           py::arg("handshake_timeout") = 5.0, py::arg("notify_ring") = true, py::arg("ucx_lib_dir") = "")
      .def_property_readonly("name", &Engine::name)
      .def_property_readonly("endpoint", &Engine::endpoint)
      .def_property_readonly("host_id", &Engine::host_id)
      .def_property_readonly("transport", &Engine::transport_mode)
      .def_property_readonly("heartbeat_interval", &Engine::heartbeat_interval)
      .def_property_readonly("heartbeat_timeout", &Engine::heartbeat_timeout)
      .def_property_readonly("closed", &Engine::is_closed)
      .def("connection_count", &Engine::connection_count)
      .def("ucx_cuda_status", [](Engine& e) {
        GilRelease r;
        return e.ucx_cuda_status();
      }, "'' when register(..., 'cuda:N') can work (UCX with CUDA memory support), else why not.")
      .def("_stats", [](Engine& e) {
        py::dict d;
        d["notify_ring_sent"] = e.notify_ring_sent.load();
        d["notify_tcp_sent"] = e.notify_tcp_sent.load();
        d["cma_dead_lanes"] = e.guard_dead_lanes();
        return d;
      })
      .def("connect", [](Engine& e, const std::string& ep, double timeout) {
        GilRelease r;
        return e.connect(ep, timeout);
      })
      .def("allocate", [](Engine& e, int64_t length) {
        if (length <= 0) throw std::invalid_argument("length must be > 0, got " + std::to_string(length));
        std::shared_ptr<LocalSegment> s;
        {
          GilRelease r;
          s = e.allocate(static_cast<uint64_t>(length));
        }
        return SegmentObj{s, e.descriptor(*s)};
      })
      .def("register_memory", [](Engine& e, int64_t addr, int64_t length, const std::string& location) {
        if (addr <= 0) throw std::invalid_argument("addr must be a non-null address, got " + std::to_string(addr));
        if (length <= 0) throw std::invalid_argument("length must be > 0, got " + std::to_string(length));
        auto s = e.register_memory(static_cast<uint64_t>(addr), static_cast<uint64_t>(length), location);
        return SegmentObj{s, e.descriptor(*s)};
      })
      .def("unregister", [](Engine& e, const SegmentObj& s, double timeout) {
        GilRelease r;
        e.unregister(s.seg->id, timeout);
      })
      .def("open_segment", [](Engine& e, py::bytes desc, double timeout, const std::string& transport) {
        std::string d = desc;
        GilRelease r;
        return e.open_segment(d, timeout, transport);
      })
      .def("transfer", [](Engine& e, const std::string& kind, const std::shared_ptr<RemoteSeg>& seg, int64_t offset,
                          int64_t addr, int64_t length, std::optional<double> timeout) {
        const bool w = kind == "write";
        Op op = make_op(kind, seg, offset, addr, length, "", w ? "src_addr" : "dst_addr");
        double t = timeout_arg(timeout);
        GilRelease r;
        run_sync(e, std::move(op), t, w ? "write" : "read");
      })
      .def("submit", [](Engine& e, py::sequence ops) {
        std::vector<Op> v;
        v.reserve(ops.size());
        for (size_t i = 0; i < ops.size(); ++i) {
          const std::string where = "ops[" + std::to_string(i) + "]: ";
          py::object o = ops[i];
          if (!py::isinstance<py::tuple>(o) || py::len(o) != 5)
            throw std::invalid_argument(where + "each op must be a tuple (kind, seg, remote_offset, local_addr, length)");
          py::tuple t = o;
          auto seg = t[1].cast<std::shared_ptr<RemoteSeg>>();
          v.push_back(make_op(t[0].cast<std::string>(), seg, t[2].cast<int64_t>(), t[3].cast<int64_t>(),
                              t[4].cast<int64_t>(), where, "local_addr"));
        }
        GilRelease r;
        return e.submit(v);
      })
      .def("notify", [](Engine& e, const std::string& peer, py::buffer data, int64_t tag) {
        uint64_t tg = nonneg(tag, "tag");
        py::buffer_info info = data.request();
        if (info.ndim > 1 && info.strides.back() != info.itemsize)
          throw std::invalid_argument("data must be a C-contiguous bytes-like object");
        const size_t len = static_cast<size_t>(info.size * info.itemsize);
        {
          GilRelease r;
          e.notify(peer, info.ptr, len, tg);
        }
      })
      .def("notify_ptr", [](Engine& e, const std::string& peer, int64_t addr, int64_t length, int64_t tag) {
        uint64_t tg = nonneg(tag, "tag"), len = nonneg(length, "length"), a = nonneg(addr, "addr");
        if (len > 0 && a == 0) throw std::invalid_argument("addr is a null address");
        GilRelease r;
        e.notify(peer, reinterpret_cast<const void*>(a), static_cast<size_t>(len), tg);
      })
      .def("notify_many", [](Engine& e, const std::vector<std::string>& peers, py::buffer data, int64_t tag,
                             int64_t addr, int64_t length) {
        uint64_t tg = nonneg(tag, "tag"), a = nonneg(addr, "addr"), len = nonneg(length, "length");
        if (len > 0 && a == 0) throw std::invalid_argument("addr is a null address");
        py::buffer_info info = data.request();
        if (info.ndim > 1 && info.strides.back() != info.itemsize)
          throw std::invalid_argument("data must be a C-contiguous bytes-like object");
        const size_t hlen = static_cast<size_t>(info.size * info.itemsize);
        std::vector<std::pair<std::string, std::string>> failed;
        {
          GilRelease r;
          std::string joined;
          const auto [msg, mlen] =
              join_message(info.ptr, hlen, reinterpret_cast<const void*>(a), static_cast<size_t>(len), joined);
          for (const auto& p : peers) {
            try {
              e.notify(p, msg, mlen, tg);
            } catch (const TransferErr& err) {
              failed.emplace_back(p, err.what());
            }
          }
        }
        return failed;
      }, py::arg("peers"), py::arg("data"), py::arg("tag"), py::arg("addr") = 0, py::arg("length") = 0)
      .def_property("spin_us", [](Engine& e) { return static_cast<double>(e.inbox().spin_ns()) / 1000.0; },
                    [](Engine& e, double us) {
                      if (!(us >= 0) || us > 1e6)
                        throw std::invalid_argument("spin_us must be in [0, 1e6], got " + std::to_string(us));
                      e.inbox().set_spin_ns(static_cast<int64_t>(us * 1000.0));
                    },
                    "Microseconds a waiting receiver polls before it sleeps.")
      .def("recv_round", [](Engine& e, const std::vector<std::string>& peers, int64_t tag,
                            std::optional<double> timeout, int64_t key_offset, py::bytes key) {
        double t = timeout_arg(timeout);
        uint64_t tg = nonneg(tag, "tag"), off = nonneg(key_offset, "key_offset");
        std::string k = key;
        std::vector<RoundResult> out;
        {
          GilRelease r;
          recv_round(e, peers, tg, t, off, k, out);
        }
        return round_results(out);
      }, py::arg("peers"), py::arg("tag"), py::arg("timeout"), py::arg("key_offset"), py::arg("key"))
      .def("exchange_round", [](Engine& e, std::vector<std::string> peers, int64_t tag, py::buffer data,
                                int64_t addr, int64_t length, std::optional<double> timeout, int64_t key_offset,
                                py::bytes key, const py::bytes& expect, std::vector<int64_t> dests,
                                int64_t dest_len, const py::bytes& then, const py::bytes& second,
                                double second_min_timeout, const std::vector<int64_t>& reduce,
                                double second_max_delay) {
        // The round logic lives in rounds.cc (exchange_round); this converts the arguments.
        RoundSpec s;
        s.timeout_s = timeout_arg(timeout);
        s.tag = nonneg(tag, "tag");
        s.key_offset = nonneg(key_offset, "key_offset");
        s.payload = reinterpret_cast<const void*>(nonneg(addr, "addr"));
        s.payload_len = nonneg(length, "length");
        s.dest_len = nonneg(dest_len, "dest_len");
        if (!reduce.empty()) {
          if (reduce.size() != 6)
            throw std::invalid_argument("reduce must be (dtype, op, count, self_addr, out_addr, self_pos), got " +
                                        std::to_string(reduce.size()) + " values");
          RoundReduce& rd = s.reduce;
          rd.dtype = static_cast<int>(reduce[0]);
          rd.op = static_cast<int>(reduce[1]);
          if (rd.dtype == 0) throw std::invalid_argument("reduce dtype 0 is not 1-4");
          rd.count = static_cast<size_t>(nonneg(reduce[2], "reduce count"));
          rd.self = reinterpret_cast<const void*>(nonneg(reduce[3], "reduce self_addr"));
          rd.out = reinterpret_cast<void*>(nonneg(reduce[4], "reduce out_addr"));
          rd.self_pos = static_cast<size_t>(nonneg(reduce[5], "reduce self_pos"));
        }
        // bytes are immutable and the arguments live until the call returns: views, no copies.
        auto view = [](const py::bytes& b) {
          char* p = nullptr;
          Py_ssize_t n = 0;
          PyBytes_AsStringAndSize(b.ptr(), &p, &n);
          return std::string_view(p, static_cast<size_t>(n));
        };
        s.key = key;
        s.expect = view(expect);
        s.then = view(then);
        s.second = view(second);
        s.second_min_timeout_s = second_min_timeout;
        s.second_max_delay_s = second_max_delay;
        s.peers = std::move(peers);
        s.dests = std::move(dests);
        check_round_spec(s);
        py::buffer_info info = data.request();
        if (info.ndim > 1 && info.strides.back() != info.itemsize)
          throw std::invalid_argument("data must be a C-contiguous bytes-like object");
        s.head = info.ptr;
        s.head_len = static_cast<size_t>(info.size * info.itemsize);
        std::vector<RoundResult> out;
        int rounds;
        {
          GilRelease r;
          rounds = exchange_round(e, s, out);
        }
        return py::make_tuple(rounds, round_results(out));
      }, py::arg("peers"), py::arg("tag"), py::arg("data"), py::arg("addr"), py::arg("length"),
         py::arg("timeout"), py::arg("key_offset"), py::arg("key"), py::arg("expect"), py::arg("dests"),
         py::arg("dest_len"), py::arg("then"), py::arg("second"), py::arg("second_min_timeout"),
         py::arg("reduce"), py::arg("second_max_delay") = -1.0)
      .def("recv_notify", [](Engine& e, std::optional<std::string> peer, std::optional<int64_t> tag,
                             std::optional<double> timeout) {
        double t = timeout_arg(timeout);
        uint64_t tg = tag ? nonneg(*tag, "tag") : 0;
        MessagePtr msg;
        {
          GilRelease r;
          msg = e.recv_notify(peer ? &*peer : nullptr, tag ? &tg : nullptr, t);
        }
        return to_notification(std::move(msg));
      })
      .def("recv_notify_any", [](Engine& e, const std::vector<std::string>& peers, int64_t tag,
                                 std::optional<double> timeout) {
        double t = timeout_arg(timeout);
        uint64_t tg = nonneg(tag, "tag");
        MessagePtr msg;
        {
          GilRelease r;
          msg = e.recv_notify_any(peers, tg, t);
        }
        return to_notification(std::move(msg));
      })
      .def("peer_state", [](Engine& e, const std::string& p) { return static_cast<int>(e.peer_state(p)); })
      .def("peer_exited", &Engine::peer_exited, py::arg("peer"))
      .def("refuse_name", &Engine::refuse_name, py::arg("peer"), py::arg("reason"), py::arg("disconnect"))
      .def("peers", [](Engine& e) {
        py::dict d;
        for (auto& kv : e.peers()) d[py::str(kv.first)] = kv.second;
        return d;
      })
      .def("wait_peer_event", [](Engine& e, std::optional<double> timeout) -> py::object {
        double t = timeout_arg(timeout);
        Event ev;
        bool got;
        {
          GilRelease r;
          got = e.wait_peer_event(t, ev);
        }
        if (!got) return py::none();
        return py::make_tuple(ev.text, ev.value);
      })
      .def("next_bg_event", [](Engine& e, double timeout) -> py::object {
        Event ev;
        bool got;
        {
          GilRelease r;
          got = e.next_bg_event(timeout, ev);
        }
        if (!got) return py::none();
        return py::make_tuple(ev.is_log, ev.text, ev.value);
      })
      .def("enable_callbacks", &Engine::enable_callbacks)
      .def("probe", [](Engine& e, const std::string& peer, double timeout) {
        GilRelease r;
        return e.probe(peer, timeout);
      })
      .def("disconnect", [](Engine& e, const std::string& peer) {
        GilRelease r;
        e.disconnect(peer);
      })
      .def("close", [](Engine& e) {
        GilRelease r;
        e.close();
      });
  // ==== Host proxy ring (issue 15): ProxyRing, HostProxy, ProxySignalApplier ====================
  // Torch-free test hooks and host setup of the proxy device transport (csrc/proxy.h,
  // include/mooncake/device/proxy_ring.h). Everything below this line belongs to that feature.
  {
    namespace dv = mooncake::device;
    m.attr("PROXY_PUT") = static_cast<int>(dv::kProxyPut);
    m.attr("PROXY_PUT_VALUE") = static_cast<int>(dv::kProxyPutValue);
    m.attr("PROXY_SIGNAL") = static_cast<int>(dv::kProxySignal);
    m.attr("PROXY_SIGNAL_ADD") = static_cast<int>(dv::kProxySignalAdd);
    m.attr("PROXY_SIGNAL_TAG") = kProxySignalTag;

    m.def("_proxy_layout", []() {
      py::dict d;
      d["desc_size"] = sizeof(dv::ProxyDesc);
      d["desc_align"] = alignof(dv::ProxyDesc);
      d["desc_offsets"] = py::dict(py::arg("dst_offset") = offsetof(dv::ProxyDesc, dst_offset),
                                   py::arg("src") = offsetof(dv::ProxyDesc, src),
                                   py::arg("len") = offsetof(dv::ProxyDesc, len),
                                   py::arg("peer") = offsetof(dv::ProxyDesc, peer),
                                   py::arg("op") = offsetof(dv::ProxyDesc, op),
                                   py::arg("flags") = offsetof(dv::ProxyDesc, flags),
                                   py::arg("seq") = offsetof(dv::ProxyDesc, seq));
      d["header_size"] = sizeof(dv::ProxyRingHeader);
      d["header_offsets"] = py::dict(py::arg("head") = offsetof(dv::ProxyRingHeader, head),
                                     py::arg("tail") = offsetof(dv::ProxyRingHeader, tail),
                                     py::arg("retired") = offsetof(dv::ProxyRingHeader, retired),
                                     py::arg("closed") = offsetof(dv::ProxyRingHeader, closed));
      d["signal_msg_size"] = sizeof(ProxySignalMsg);
      d["signal_msg_offsets"] = py::dict(py::arg("magic") = offsetof(ProxySignalMsg, magic),
                                         py::arg("op") = offsetof(ProxySignalMsg, op),
                                         py::arg("epoch") = offsetof(ProxySignalMsg, epoch),
                                         py::arg("seg_id") = offsetof(ProxySignalMsg, seg_id),
                                         py::arg("offset") = offsetof(ProxySignalMsg, offset),
                                         py::arg("value") = offsetof(ProxySignalMsg, value));
      d["signal_magic"] = kProxySignalMagic;
      d["magic"] = dv::kProxyRingMagic;
      d["version"] = dv::kProxyRingVersion;
      return d;
    }, "Sizes and offsets of the proxy ring's structures (layout tests; a kernel build checks "
       "the same numbers).");

    m.def("_proxy_ring_bytes", [](int64_t capacity, int64_t num_peers) {
      return dv::proxy_ring_bytes(static_cast<uint32_t>(nonneg(capacity, "capacity")),
                                  static_cast<uint32_t>(nonneg(num_peers, "num_peers")));
    }, py::arg("capacity"), py::arg("num_peers"));

    m.def("_proxy_load_u64", [](int64_t addr) {
      if (addr <= 0 || addr % 8) throw std::invalid_argument("addr must be a non-null 8-byte aligned address");
      return __atomic_load_n(reinterpret_cast<const uint64_t*>(addr), __ATOMIC_ACQUIRE);
    }, py::arg("addr"), "Acquire load of the 64-bit word at addr.");

    m.def("_proxy_wait_u64", [](int64_t addr, uint64_t minimum, double timeout) -> py::object {
      if (addr <= 0 || addr % 8) throw std::invalid_argument("addr must be a non-null 8-byte aligned address");
      const double t = timeout_arg(timeout);
      const auto* w = reinterpret_cast<const uint64_t*>(addr);
      uint64_t v = 0;
      bool ok = false;
      {
        GilRelease r;
        const int64_t deadline = deadline_after(t);
        for (uint32_t spins = 0;; ++spins) {
          v = __atomic_load_n(w, __ATOMIC_ACQUIRE);
          if (v >= minimum) {
            ok = true;
            break;
          }
          if ((spins & 31u) == 0 && now_ns() > deadline) break;
          if (spins > 64) {
            timespec ts{0, spins > 2048 ? 100000 : 5000};
            nanosleep(&ts, nullptr);
          }
        }
      }
      if (!ok) return py::none();
      return py::int_(v);
    }, py::arg("addr"), py::arg("minimum"), py::arg("timeout"),
    "Polls the 64-bit word at addr (acquire loads, GIL released) until it is >= minimum: returns "
    "the value seen, or None at the deadline.");

    auto desc_from = [](int64_t op, int64_t peer, int64_t dst_offset, int64_t src, int64_t length,
                        const std::string& where) {
      if (op < dv::kProxyPut || op > dv::kProxySignalAdd)
        throw std::invalid_argument(where + "op must be PROXY_PUT (1), PROXY_PUT_VALUE (2), PROXY_SIGNAL (3) "
                                    "or PROXY_SIGNAL_ADD (4), got " + std::to_string(op));
      if (peer < 0 || peer > static_cast<int64_t>(dv::kProxyRingMaxPeers))
        throw std::invalid_argument(where + "peer must be in [0, " + std::to_string(dv::kProxyRingMaxPeers) +
                                    "], got " + std::to_string(peer));
      if (length < 0 || length > static_cast<int64_t>(UINT32_MAX))
        throw std::invalid_argument(where + "length must be in [0, 2**32 - 1], got " + std::to_string(length));
      dv::ProxyDesc d{};
      d.op = static_cast<uint8_t>(op);
      d.peer = static_cast<uint16_t>(peer);
      d.dst_offset = nonneg(dst_offset, (where + "dst_offset").c_str());
      d.src = static_cast<uint64_t>(src);  // an immediate value may be any 64-bit pattern
      d.len = static_cast<uint32_t>(length);
      return d;
    };
    auto raise_post = [](dv::ProxyPostResult r, double timeout) {
      if (r == dv::kProxyFull)
        throw TransferErr(ErrKind::kTimeout, "", "proxy ring stayed full for " + std::to_string(timeout) + " s");
      if (r == dv::kProxyClosed) throw TransferErr(ErrKind::kGeneric, "", "proxy ring is closed (proxy stopped)");
    };

    py::class_<ProxyRing, std::shared_ptr<ProxyRing>>(m, "ProxyRing",
        "A proxy command ring in host memory (include/mooncake/device/proxy_ring.h).")
        .def(py::init([](int64_t capacity, int64_t num_peers) {
               if (capacity < 0 || capacity > UINT32_MAX)
                 throw std::invalid_argument("capacity must be a power of two in [2, 2**24], got " +
                                             std::to_string(capacity));
               if (num_peers < 0 || num_peers > UINT32_MAX)
                 throw std::invalid_argument("num_peers must be in [1, 65535], got " + std::to_string(num_peers));
               return std::make_shared<ProxyRing>(static_cast<uint32_t>(capacity), static_cast<uint32_t>(num_peers));
             }),
             py::arg("capacity"), py::arg("num_peers"))
        .def_property_readonly("addr", [](const ProxyRing& r) { return reinterpret_cast<uint64_t>(r.hdr()); })
        .def_property_readonly("nbytes", &ProxyRing::bytes)
        .def_property_readonly("capacity", [](const ProxyRing& r) { return r.hdr()->capacity; })
        .def_property_readonly("num_peers", [](const ProxyRing& r) { return r.hdr()->num_peers; })
        .def_property_readonly("head", [](const ProxyRing& r) { return dv::proxy_load_acquire(&r.hdr()->head); })
        .def_property_readonly("tail", [](const ProxyRing& r) { return dv::proxy_load_acquire(&r.hdr()->tail); })
        .def_property_readonly("retired", [](const ProxyRing& r) { return dv::proxy_load_acquire(&r.hdr()->retired); })
        .def_property_readonly("closed", [](const ProxyRing& r) { return dv::proxy_load_acquire(&r.hdr()->closed) != 0; })
        .def("completed", [](const ProxyRing& r) {
          std::vector<uint64_t> v(r.hdr()->num_peers);
          for (uint32_t i = 0; i < v.size(); ++i) v[i] = dv::proxy_load_acquire(dv::proxy_completed(r.hdr()) + i);
          return v;
        }, "Per-peer count of descriptors complete at their destination.")
        .def("dropped", [](const ProxyRing& r) {
          std::vector<uint64_t> v(r.hdr()->num_peers);
          for (uint32_t i = 0; i < v.size(); ++i) v[i] = dv::proxy_load_acquire(dv::proxy_dropped(r.hdr()) + i);
          return v;
        }, "Per-peer count of dropped descriptors (dead peer, failed or unfinished earlier put, bad).")
        .def("post", [desc_from, raise_post](ProxyRing& r, int64_t op, int64_t peer, int64_t dst_offset, int64_t src,
                                             int64_t length, std::optional<double> timeout) {
          dv::ProxyDesc d = desc_from(op, peer, dst_offset, src, length, "");
          const double t = timeout_arg(timeout);
          uint64_t ticket = 0;
          dv::ProxyPostResult res;
          {
            GilRelease g;
            res = proxy_post(r, d, t, &ticket);
          }
          raise_post(res, t);
          return ticket;
        }, py::arg("op"), py::arg("peer"), py::arg("dst_offset"), py::arg("src") = 0, py::arg("length") = 0,
        py::arg("timeout") = 1.0,
        "Host producer: posts one descriptor (src: PUT source offset, else the immediate value); "
        "returns its ticket. TransferTimeout when the ring stays full past `timeout`, TransferError "
        "when the ring is closed.")
        .def("post_many", [desc_from](ProxyRing& r, const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t,
                                                                            int64_t>>& descs,
                                      std::optional<double> timeout) {
          std::vector<dv::ProxyDesc> v;
          v.reserve(descs.size());
          for (size_t i = 0; i < descs.size(); ++i) {
            const auto& t = descs[i];
            v.push_back(desc_from(std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t), std::get<4>(t),
                                  "descs[" + std::to_string(i) + "]: "));
          }
          const double t = timeout_arg(timeout);
          dv::ProxyPostResult res;
          size_t n;
          int64_t t0, t1;
          {
            GilRelease g;
            t0 = now_ns();
            n = proxy_post_many(r, v.data(), v.size(), t, &res);
            t1 = now_ns();
          }
          const char* why = res == dv::kProxyPosted ? "posted" : res == dv::kProxyFull ? "full" : "closed";
          return py::make_tuple(n, why, static_cast<double>(t1 - t0) / 1e9);
        }, py::arg("descs"), py::arg("timeout") = 1.0,
        "Native host producer: posts (op, peer, dst_offset, src, length) descriptors in order from "
        "this thread with the GIL released. Returns (posted, 'posted'|'full'|'closed', seconds).")
        .def("quiet", [](ProxyRing& r, uint64_t ticket, std::optional<double> timeout) {
          const double t = timeout_arg(timeout);
          GilRelease g;
          const int64_t deadline = t < 0 ? INT64_MAX : dv::proxy_host_now_ns() + static_cast<int64_t>(t * 1e9);
          return dv::proxy_ring_quiet_host(r.hdr(), ticket, deadline);
        }, py::arg("ticket"), py::arg("timeout"),
        "Waits until every descriptor up to `ticket` is complete or dropped; False at the deadline.");

    py::class_<HostProxy, std::shared_ptr<HostProxy>>(m, "HostProxy",
        "The native thread that carries a ProxyRing's descriptors over an engine.")
        .def(py::init([](std::shared_ptr<Engine> engine, std::shared_ptr<ProxyRing> ring, const SegmentObj& local,
                         std::vector<std::shared_ptr<RemoteSeg>> peers, double op_timeout, double idle_sleep_us,
                         int64_t max_inflight, int64_t epoch) {
               ProxyConfig c;
               c.op_timeout_s = op_timeout;
               if (!(idle_sleep_us >= 1 && idle_sleep_us <= 100000))
                 throw std::invalid_argument("idle_sleep_us must be in [1, 100000], got " +
                                             std::to_string(idle_sleep_us));
               c.idle_sleep_max_ns = static_cast<int64_t>(idle_sleep_us * 1000.0);
               if (max_inflight < 1 || max_inflight > (1 << 20))
                 throw std::invalid_argument("max_inflight must be in [1, 1048576], got " +
                                             std::to_string(max_inflight));
               c.max_inflight = static_cast<uint32_t>(max_inflight);
               c.epoch = proxy_epoch(epoch);
               return std::make_shared<HostProxy>(std::move(engine), std::move(ring), local.seg, std::move(peers), c);
             }),
             py::arg("engine"), py::arg("ring"), py::arg("local"), py::arg("peers"), py::arg("op_timeout") = 10.0,
             py::arg("idle_sleep_us") = 200.0, py::arg("max_inflight") = 4096, py::arg("epoch") = 0)
        .def("start", &HostProxy::start)
        .def("stop", [](HostProxy& p, double drain_timeout) {
          if (!(drain_timeout >= 0) || drain_timeout > 3600)
            throw std::invalid_argument("drain_timeout must be in [0, 3600] seconds, got " +
                                        std::to_string(drain_timeout));
          GilRelease g;
          p.stop(drain_timeout);
        }, py::arg("drain_timeout") = 1.0)
        .def("wait_settled", [](HostProxy& p, double timeout) {
          if (!(timeout >= 0) || timeout > 3600)
            throw std::invalid_argument("timeout must be in [0, 3600] seconds, got " + std::to_string(timeout));
          GilRelease g;
          return p.wait_settled(timeout);
        }, py::arg("timeout"),
        "After stop(): waits until every put stop() left in flight completed or failed; returns "
        "how many are still unsettled at the deadline (they may still land at the peer).")
        .def_property_readonly("running", &HostProxy::running)
        .def("set_peer", [](HostProxy& p, int64_t i, std::shared_ptr<RemoteSeg> seg) {
          if (i < 0 || i > UINT32_MAX) throw std::invalid_argument("peer must be >= 0, got " + std::to_string(i));
          p.set_peer(static_cast<uint32_t>(i), std::move(seg));
        }, py::arg("peer"), py::arg("seg"))
        .def("stats", [](HostProxy& p) {
          py::dict d;
          d["consumed"] = p.consumed.load();
          d["invalid"] = p.invalid.load();
          d["signals_shm"] = p.signals_shm.load();
          d["signals_notify"] = p.signals_notify.load();
          d["unsettled"] = p.unsettled.load();
          d["last_drop"] = p.last_drop();
          return d;
        });

    py::class_<ProxySignalApplier, std::shared_ptr<ProxySignalApplier>>(m, "ProxySignalApplier",
        "Applies proxy signals that arrive as notifications to local segments (receiving side).")
        .def(py::init([](std::shared_ptr<Engine> engine, const std::vector<SegmentObj*>& segs, int64_t epoch) {
               const uint16_t e = proxy_epoch(epoch);
               std::vector<std::shared_ptr<LocalSegment>> v;
               for (auto* s : segs) v.push_back(s ? s->seg : nullptr);
               return std::make_shared<ProxySignalApplier>(std::move(engine), std::move(v), e);
             }),
             py::arg("engine"), py::arg("segments"), py::arg("epoch") = 0)
        .def_property("epoch", &ProxySignalApplier::epoch,
                      [](ProxySignalApplier& a, int64_t e) { a.set_epoch(proxy_epoch(e)); },
                      "The membership epoch whose signals are applied (others are rejected).")
        .def_property_readonly("stale_epoch", [](const ProxySignalApplier& a) { return a.stale_epoch.load(); })
        .def("start", &ProxySignalApplier::start)
        .def("stop", &ProxySignalApplier::stop, py::call_guard<GilRelease>())
        .def_property_readonly("applied", [](const ProxySignalApplier& a) { return a.applied.load(); })
        .def_property_readonly("rejected", [](const ProxySignalApplier& a) { return a.rejected.load(); });
  }
  // ==== end of the host proxy ring block ==========================================================
}
