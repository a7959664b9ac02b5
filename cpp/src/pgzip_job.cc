// The parallel gzip decoder's job runner: worker threads, each running one
// chunk job at a time (JobRun), and what a job asks of the decoder: block
// starts, run tokens, the window, a place for its output.
#include "pgzip_parallel.h"

#ifdef HUBFAST_HAVE_ISAL
namespace hubfast {
namespace pgzip {

Boundary ParallelGzip::get_boundary(uint64_t j, Job& job, SegmentSource* src) {
  std::unique_lock<std::mutex> lk(mu_);
  bool waited = false;
  for (;;) {
    if (job.cancelled || stop_) {
      job.slot_wait = false;
      throw Cancelled();
    }
    Slot& s = slots_[j];
    if (s.state == Slot::kBusy) {
      // Another job is finding it (and may itself wait for data).
      if (!waited) {
        waited = true;
        job.slot_wait = true;
        job.slot_index = j;
        release_token_locked(job);
        main_cv_.notify_all();
      }
      work_cv_.wait(lk);
      continue;
    }
    if (waited) {
      waited = false;
      job.slot_wait = false;
      acquire_token_locked(lk, job);
      continue;  // the lock was let go: look again
    }
    if (s.state == Slot::kDone) return s.b;
    s.state = Slot::kBusy;
    s.finder = &job;
    lk.unlock();
    Boundary b;
    try {
      b = find_boundary(src, j);
    } catch (...) {
      lk.lock();
      slots_[j].state = Slot::kFree;
      slots_[j].finder = nullptr;
      work_cv_.notify_all();
      throw;
    }
    lk.lock();
    Slot& s2 = slots_[j];
    s2.b = b;
    s2.state = Slot::kDone;
    s2.finder = nullptr;
    work_cv_.notify_all();
    return b;
  }
}

// Run tokens (out-of-order input only; tokens_on_ is fixed before the
// workers start): a job decodes only while it holds one; it lets go of it
// while it waits, and the lowest job waiting gets the next one. The oldest
// job (current) takes one even when none is left: it never waits behind
// a job ahead of it (one thread more than `threads` then decodes).
void ParallelGzip::acquire_token_locked(std::unique_lock<std::mutex>& lk, Job& job) {
  if (!tokens_on_ || job.has_token) return;
  const std::pair<uint64_t, const Job*> key(job.index, &job);
  token_wait_.insert(key);
  token_cv_.wait(lk, [&] {
    return stop_ || job.cancelled || job.current || (tokens_ > 0 && *token_wait_.begin() == key);
  });
  token_wait_.erase(key);
  if (stop_ || job.cancelled) {
    token_cv_.notify_all();  // a new lowest waiter
    throw Cancelled();
  }
  --tokens_;
  job.has_token = true;
  if (tokens_ > 0 && !token_wait_.empty()) token_cv_.notify_all();
}

void ParallelGzip::release_token_locked(Job& job) {
  if (!job.has_token) return;
  job.has_token = false;
  ++tokens_;
  if (!token_wait_.empty()) token_cv_.notify_all();
}

std::shared_ptr<const Window> ParallelGzip::window_of(Job& job) {
  std::lock_guard<std::mutex> lk(mu_);
  return job.window;
}

void ParallelGzip::publish(Job& job, Piece&& p) {
  std::unique_lock<std::mutex> lk(mu_);
  if (job.cancelled || stop_) throw Cancelled();
  job.buffered += p.marked ? p.len * 2 : p.bytes.size();
  job.pieces.push_back(std::move(p));
  main_cv_.notify_all();
  auto ready = [&] { return job.current || job.buffered <= budget_ || job.cancelled || stop_; };
  if (!ready()) {
    release_token_locked(job);
    work_cv_.wait(lk, ready);
    if (job.cancelled || stop_) throw Cancelled();
    acquire_token_locked(lk, job);
  }
  if (job.cancelled || stop_) throw Cancelled();
}

std::vector<uint8_t> ParallelGzip::take_buffer() {
  Bytes b = pieces_->take(false);
  b.resize(piece_bytes_);  // a piece handed over was cut to its length
  return b;
}

void ParallelGzip::recycle(std::vector<uint8_t>&& b) {
  if (b.capacity() >= piece_bytes_) pieces_->give(std::move(b));
}

// ---- one chunk job -------------------------------------------------------------

class JobRun {
 public:
  JobRun(ParallelGzip& d, Job& job)
      : d_(d), job_(job), src_(d, job), C_(d.C_), st_(std::make_unique<inflate_state>()),
        snap_(std::make_unique<inflate_state>()) {}
  // The buffer taken after the last piece goes back unused: one fresh 2 MiB
  // buffer per job otherwise (traced: ~half the pieces' page faults).
  ~JobRun() {
    if (!piece_.marked) d_.recycle(std::move(piece_.bytes));
  }

  struct Result {
    JobEnd end = JobEnd::kNone;
    uint64_t boundary = 0;
  };

  Result run() {
    Boundary start;
    if (job_.index == 0) {
      start = {Boundary::kMember, 0};
    } else {
      start = d_.get_boundary(job_.index, job_, &src_);
      if (start.kind == Boundary::kNone) return {JobEnd::kVoid, 0};
    }
    ++d_.stats_.chunks;
    next_t_ = job_.index + 1;
    PGZ_TRACE("job %llu: start kind %d at %llu (window %d)\n", (unsigned long long)job_.index, int(start.kind),
              (unsigned long long)start.pos, int(job_.window_ready.load()));
    piece_.bytes = d_.take_buffer();
    if (start.kind == Boundary::kMember) {
      BitReader br(&src_);
      br.seek(start.pos * 8);
      uint64_t ds = parse_gzip_header(br);
      isal_run(ds * 8, nullptr);
    } else if (start.kind == Boundary::kDynamic && job_.window_ready) {
      auto w = d_.window_of(job_);
      isal_run(start.pos, w->bytes.data());
    } else {
      marker_phase(start);
    }
    return result_;
  }

 private:
  struct Src : SegmentSource {
    Src(ParallelGzip& d, Job& j) : d(d), job(j) {}
    SegPtr get(uint64_t index) override { return d.get_segment(index, job); }
    uint64_t segment_bytes() const override { return d.C_; }
    ParallelGzip& d;
    Job& job;
  };

  // ---- stop points ----

  uint64_t floor_bits(uint64_t j) const { return j * C_ * 8 - 16; }

  static uint64_t last_bit(const Boundary& b) {
    switch (b.kind) {
      case Boundary::kDynamic: return b.pos;
      case Boundary::kStored: return b.pos * 8 - 3;
      default: return b.pos * 8;
    }
  }

  // Learns the next boundary once decoding has come near its segment.
  void resolve_upto(uint64_t bitpos) {
    while (!t_resolved_ && !t_none_ && bitpos >= floor_bits(next_t_)) {
      if (!d_.get_segment(next_t_, job_)) {
        t_none_ = true;
        break;
      }
      tb_ = d_.get_boundary(next_t_, job_, &src_);
      if (tb_.kind == Boundary::kNone) {
        ++next_t_;
        continue;
      }
      t_resolved_ = true;
    }
  }

  void miss() {
    PGZ_TRACE("job %llu: miss boundary %llu kind %d at %llu\n", (unsigned long long)job_.index,
              (unsigned long long)next_t_, int(tb_.kind), (unsigned long long)tb_.pos);
    t_resolved_ = false;
    ++next_t_;
    ++d_.stats_.false_starts;
  }

  // Segments below this are no longer read: nothing behind the position
  // (ISA-L may hand back up to 8 bytes), and the next boundary's segment
  // may still have to be searched (a long block can pass several).
  void set_min_seg(uint64_t byte) { job_.min_seg = std::min<uint64_t>((byte > 64 ? byte - 64 : 0) / C_, next_t_); }

  // ---- output ----

  void publish_clean() {
    if (piece_.len == 0 && piece_.ends.empty()) return;
    size_t a = 0;
    for (size_t i = 0; i <= piece_.ends.size(); ++i) {
      size_t b = i < piece_.ends.size() ? piece_.ends[i].offset : piece_.len;
      piece_.crcs.push_back(b > a ? crc32_gzip_refl(0, piece_.bytes.data() + a, b - a) : 0);
      a = b;
    }
    d_.stats_.isal_bytes += piece_.len;
    Piece p = std::move(piece_);
    piece_ = Piece();
    d_.publish(job_, std::move(p));
    piece_.bytes = d_.take_buffer();
  }

  void publish_marked(const uint16_t* s, size_t n) {
    Piece p;
    p.marked = true;
    p.syms.assign(s, s + n);
    p.len = n;
    d_.stats_.marker_symbols += n;
    d_.publish(job_, std::move(p));
  }

  void end_hit() {
    PGZ_TRACE("job %llu: hit boundary %llu kind %d at %llu\n", (unsigned long long)job_.index,
              (unsigned long long)next_t_, int(tb_.kind), (unsigned long long)tb_.pos);
    publish_clean();
    result_ = {JobEnd::kHit, next_t_};
  }

  void end_stream() {
    PGZ_TRACE("job %llu: stream end\n", (unsigned long long)job_.index);
    publish_clean();
    result_ = {JobEnd::kStreamEnd, 0};
  }

  // ---- member ends ----

  enum class After { kHit, kStreamEnd, kNewMember };

  // After a member's last block: its trailer at byte t, then a new member,
  // zero padding to the end, or the end.
  After after_member(uint64_t t, uint64_t* deflate_start) {
    BitReader br(&src_);
    br.seek(t * 8);
    uint8_t tr[8];
    br.read_bytes(tr, 8);
    piece_.ends.push_back({piece_.len, le32(tr), le32(tr + 4)});
    uint64_t m = t + 8;
    PGZ_TRACE("job %llu: member end, trailer at %llu\n", (unsigned long long)job_.index, (unsigned long long)t);
    resolve_upto(m * 8);
    if (t_resolved_ && tb_.kind == Boundary::kMember && tb_.pos == m) return After::kHit;
    skip_behind(m * 8);
    if (br.at_end()) return After::kStreamEnd;
    unsigned c = unsigned(br.peek() & 0xff);
    if (c == 0) {
      // Hand out the member's end first: zeros may go on for long (a
      // server that never stops), and the consumer decides when to stop.
      publish_clean();
      while (!br.at_end())
        if (br.bits(8) != 0) fail_garbage();
      return After::kStreamEnd;
    }
    if (c != 0x1f) fail_garbage();
    *deflate_start = parse_gzip_header(br);
    skip_behind(*deflate_start * 8);
    return After::kNewMember;
  }

  [[noreturn]] static void fail_garbage() {
    throw DecodeError("gzip stream is corrupt: garbage after the end of the compressed data");
  }

  // Boundaries that lie behind `bitpos` can no longer be reached.
  void skip_behind(uint64_t bitpos) {
    for (;;) {
      resolve_upto(bitpos);
      if (!t_resolved_ || last_bit(tb_) >= bitpos) return;
      miss();
    }
  }

  // ---- our inflater until the window is clean ----

  bool check_targets(uint64_t q, MarkerInflater& inf) {
    for (;;) {
      resolve_upto(q);
      if (!t_resolved_) return false;
      switch (tb_.kind) {
        case Boundary::kDynamic:
          if (q == tb_.pos) return true;
          if (q > tb_.pos) {
            miss();
            continue;
          }
          return false;
        case Boundary::kStored:
          if (q > tb_.pos * 8 - 3) {
            miss();
            continue;
          }
          return q >= tb_.pos * 8 - 10 && inf.peek_header3() == 0;
        default:
          if (q > tb_.pos * 8) {
            miss();
            continue;
          }
          return false;
      }
    }
  }

  void marker_phase(const Boundary& start) {
    size_t flush_syms = std::min<size_t>(64 << 10, d_.piece_bytes_ / 2);
    MarkerInflater inf(&src_, flush_syms, [this](const uint16_t* s, size_t n) { publish_marked(s, n); });
    if (start.kind == Boundary::kStored)
      inf.start_in_stored(start.pos);
    else
      inf.start_at_block(start.pos);
    bool first = true, resolved = false;
    for (;;) {
      if (!first) {
        uint64_t q = inf.pos();
        set_min_seg(q / 8);
        if (check_targets(q, inf)) {
          inf.flush();
          end_hit();
          return;
        }
        if (!resolved && job_.window_ready) {
          inf.resolve_window(d_.window_of(job_)->bytes.data());
          resolved = true;
        }
        if (inf.window_clean()) {
          inf.flush();
          std::vector<uint8_t> dict(kWindow);
          inf.window_bytes(dict.data());
          isal_run(q, dict.data());
          return;
        }
      }
      first = false;
      if (job_.cancelled) throw Cancelled();
      if (inf.decode_block()) {
        inf.flush();
        uint64_t t = (inf.pos() + 7) / 8;
        uint64_t ds = 0;
        switch (after_member(t, &ds)) {
          case After::kHit: end_hit(); return;
          case After::kStreamEnd: end_stream(); return;
          case After::kNewMember: isal_run(ds * 8, nullptr); return;
        }
      }
    }
  }

  // ---- ISA-L for the rest ----

  uint8_t byte_at(uint64_t pos) {
    SegPtr s = d_.get_segment(pos / C_, job_);
    if (!s || pos - s->base >= s->data.size()) throw DecodeError("gzip stream is truncated");
    return s->data[pos - s->base];
  }

  void isal_init(const uint8_t* dict, uint64_t bitpos) {
    isal_inflate_init(st_.get());
    st_->crc_flag = ISAL_DEFLATE;
    if (dict) isal_inflate_set_dict(st_.get(), const_cast<uint8_t*>(dict), kWindow);
    in_ = bitpos / 8;
    if (bitpos & 7) {
      unsigned sh = unsigned(bitpos & 7);
      st_->read_in = uint64_t(byte_at(in_)) >> sh;
      st_->read_in_length = int32_t(8 - sh);
      ++in_;
    }
  }

  void isal_run(uint64_t bitpos, const uint8_t* dict) {
    PGZ_TRACE("job %llu: isal from bit %llu (dict %d)\n", (unsigned long long)job_.index,
              (unsigned long long)bitpos, dict != nullptr);
    isal_init(dict, bitpos);
    for (;;) {
      resolve_upto(in_ * 8);
      uint64_t stop;
      if (t_resolved_) {
        stop = tb_.kind == Boundary::kDynamic ? tb_.pos / 8 : tb_.pos;
        if (stop < in_) {
          miss();
          continue;
        }
      } else {
        stop = t_none_ ? UINT64_MAX : (floor_bits(next_t_) + 7) / 8;
      }
      if (in_ < stop) {
        uint64_t t = 0;
        Fed f = feed_real(stop, &t);
        if (f == Fed::kEof) throw DecodeError("gzip stream is truncated: it ends inside a deflate stream");
        if (f == Fed::kMemberEnd) {
          uint64_t ds = 0;
          switch (after_member(t, &ds)) {
            case After::kHit: end_hit(); return;
            case After::kStreamEnd: end_stream(); return;
            case After::kNewMember: isal_init(nullptr, ds * 8); continue;
          }
        }
        continue;
      }
      // Standing right before the boundary.
      if (tb_.kind != Boundary::kMember && try_tail()) {
        end_hit();
        return;
      }
      miss();
    }
  }

  enum class Fed { kDone, kMemberEnd, kEof };

  Fed feed_real(uint64_t stop, uint64_t* trailer) {
    const size_t cap = piece_.bytes.size();
    while (in_ < stop) {
      SegPtr s = d_.get_segment(in_ / C_, job_);
      if (!s || in_ - s->base >= s->data.size()) return Fed::kEof;
      uint64_t off = in_ - s->base;
      size_t n = size_t(std::min<uint64_t>(s->data.size() - off, stop - in_));
      n = std::min<size_t>(n, 1u << 30);
      st_->next_in = const_cast<uint8_t*>(s->data.data() + off);
      st_->avail_in = uint32_t(n);
      for (;;) {
        if (piece_.len == cap) publish_clean();
        uint32_t room = uint32_t(cap - piece_.len);
        uint32_t avail_before = st_->avail_in;
        st_->next_out = piece_.bytes.data() + piece_.len;
        st_->avail_out = room;
        int r = isal_inflate(st_.get());
        size_t produced = room - st_->avail_out;
        piece_.len += produced;
        if (r < 0) throw DecodeError(isal_message(r));
        if (st_->block_state == ISAL_BLOCK_FINISH) {
          // The deflate data ends read_in_length bits before what ISA-L
          // took (ISA-L 2.30 keeps those bits; later versions give whole
          // bytes back through avail_in): the trailer starts at the next byte.
          int64_t used = int64_t(n) - int64_t(st_->avail_in);
          int64_t end_bit = (int64_t(in_) + used) * 8 - int64_t(st_->read_in_length);
          *trailer = uint64_t((end_bit + 7) / 8);
          in_ = *trailer;
          return Fed::kMemberEnd;
        }
        if (st_->avail_in == 0 && st_->avail_out > 0) break;
        if (produced == 0 && st_->avail_in == avail_before && st_->avail_out > 0)
          throw DecodeError("inflate made no progress");
      }
      in_ += n;
      set_min_seg(in_);
      if (job_.cancelled) throw Cancelled();
    }
    return Fed::kDone;
  }

  // Proves a boundary real by feeding, in place of what follows it, stored
  // blocks whose contents are sentinels, the last one final: ISA-L must
  // finish exactly at the end of that input with the sentinels as its last
  // output. At a dynamic block start: a final stored block holding S2. At a
  // stored block's LEN field (its header read): LEN 8 with S1 closes that
  // block, then the final block with S2. A decoder standing inside a
  // Huffman block there may read the bytes as codes that happen to end in
  // an end-of-block right before the final block (regular bytes such as
  // 00 00 ff ff do), but it does not produce S1 from them; one standing
  // inside stored data (the only way to copy them verbatim) is refused by
  // its state.
  bool try_tail() {
    static constexpr uint8_t kS1[8] = {0x96, 0x0f, 0x5a, 0xe1, 0x3c, 0x78, 0xc3, 0xa5};
    static constexpr uint8_t kS2[8] = {0x5a, 0xc3, 0x96, 0x0f, 0xe1, 0x3c, 0xa5, 0x78};
    if (st_->block_state == ISAL_BLOCK_TYPE0) return false;
    if (piece_.bytes.size() - piece_.len < (64u << 10)) publish_clean();
    std::memcpy(snap_.get(), st_.get(), sizeof(inflate_state));
    const size_t len0 = piece_.len;
    uint8_t tail[48];
    size_t n = 0;
    auto stored8 = [&](const uint8_t* sentinel) {
      tail[n++] = 8;  // LEN 8, NLEN ~8
      tail[n++] = 0;
      tail[n++] = 0xf7;
      tail[n++] = 0xff;
      std::memcpy(tail + n, sentinel, 8);
      n += 8;
    };
    size_t expect = 8;
    if (tb_.kind == Boundary::kDynamic) {
      unsigned sh = unsigned(tb_.pos & 7);
      uint8_t b0 = sh ? uint8_t(byte_at(tb_.pos / 8) & ((1u << sh) - 1)) : 0;
      tail[n++] = uint8_t(b0 | (1u << sh));  // BFINAL 1, BTYPE 00
      if (sh >= 6) tail[n++] = 0;
    } else {
      stored8(kS1);
      tail[n++] = 1;  // BFINAL 1, BTYPE 00
      expect = 16;
    }
    stored8(kS2);
    st_->next_in = tail;
    st_->avail_in = uint32_t(n);
    uint32_t room = uint32_t(piece_.bytes.size() - piece_.len);
    st_->next_out = piece_.bytes.data() + piece_.len;
    st_->avail_out = room;
    int r = isal_inflate(st_.get());
    piece_.len += room - st_->avail_out;
    const uint8_t* end = piece_.bytes.data() + piece_.len;
    bool hit = r >= 0 && st_->block_state == ISAL_BLOCK_FINISH && st_->avail_in == 0 &&
               st_->read_in_length == 0 && piece_.len >= len0 + expect &&
               std::memcmp(end - 8, kS2, 8) == 0 && (expect == 8 || std::memcmp(end - 16, kS1, 8) == 0);
    if (hit) {
      piece_.len -= expect;
    } else {
      std::memcpy(st_.get(), snap_.get(), sizeof(inflate_state));
      piece_.len = len0;
    }
    return hit;
  }

  ParallelGzip& d_;
  Job& job_;
  Src src_;
  const uint64_t C_;
  std::unique_ptr<inflate_state> st_, snap_;
  uint64_t in_ = 0;  // next compressed byte for ISA-L
  Piece piece_;
  Result result_;
  // The next stop point: boundary next_t_, once known.
  uint64_t next_t_ = 0;
  bool t_resolved_ = false;
  bool t_none_ = false;  // no segment left: decode to the end
  Boundary tb_;
};

void ParallelGzip::worker() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      work_cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    JobRun::Result res;
    std::string error;
    if (job->cancelled) {
      res.end = JobEnd::kCancelled;
    } else {
      try {
        {
          std::unique_lock<std::mutex> lk(mu_);
          acquire_token_locked(lk, *job);
        }
        JobRun run(*this, *job);
        res = run.run();
      } catch (const Cancelled&) {
        res.end = JobEnd::kCancelled;
      } catch (const DecodeError& e) {
        res.end = JobEnd::kError;
        error = e.what();
        PGZ_TRACE("job %llu: error %s\n", (unsigned long long)job->index, e.what());
      } catch (const std::exception& e) {
        res.end = JobEnd::kError;
        error = std::string("gzip decoding failed: ") + e.what();
      }
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      release_token_locked(*job);
      job->blocked = false;
      job->slot_wait = false;
      job->end = res.end;
      job->end_boundary = res.boundary;
      job->error = std::move(error);
      job->done = true;
    }
    main_cv_.notify_all();
  }
}

}  // namespace pgzip
}  // namespace hubfast
#endif  // HUBFAST_HAVE_ISAL
