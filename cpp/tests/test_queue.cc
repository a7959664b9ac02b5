// BoundedQueue and CancelToken with real threads (run under TSan by
// `dev/sanitize thread`): close drains, abort wakes blocked producers and
// consumers, the bound holds, nothing is lost or duplicated.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <thread>
#include <vector>

#include "hubfast/error.h"
#include "hubfast/queue.h"

using namespace hubfast;
using namespace std::chrono_literals;

namespace {

// Generous: a blocked call must be woken within this.
constexpr auto kWake = 10s;

template <class T>
bool finishes(std::future<T>& f, std::chrono::seconds limit = kWake) {
  return f.wait_for(limit) == std::future_status::ready;
}

}  // namespace

TEST_CASE("queue: close lets consumers drain, then ends", "[queue]") {
  BoundedQueue<int> q(4);
  REQUIRE(q.push(1));
  REQUIRE(q.push(2));
  REQUIRE(q.push(3));
  q.close();
  CHECK(q.pop() == std::optional<int>(1));
  CHECK(q.pop() == std::optional<int>(2));
  CHECK(q.pop() == std::optional<int>(3));
  CHECK_FALSE(q.pop().has_value());
  CHECK_FALSE(q.pop().has_value());  // and stays ended
}

TEST_CASE("queue: close wakes a consumer blocked on an empty queue", "[queue]") {
  BoundedQueue<int> q(2);
  auto consumer = std::async(std::launch::async, [&] { return q.pop(); });
  CHECK(consumer.wait_for(100ms) == std::future_status::timeout);  // blocked
  q.close();
  REQUIRE(finishes(consumer));
  CHECK_FALSE(consumer.get().has_value());
}

TEST_CASE("queue: abort wakes a blocked pop", "[queue]") {
  BoundedQueue<int> q(2);
  auto consumer = std::async(std::launch::async, [&] { return q.pop(); });
  CHECK(consumer.wait_for(100ms) == std::future_status::timeout);
  q.abort();
  REQUIRE(finishes(consumer));
  CHECK_FALSE(consumer.get().has_value());
}

TEST_CASE("queue: abort wakes a blocked push, which reports it", "[queue]") {
  BoundedQueue<int> q(1);
  REQUIRE(q.push(1));
  auto producer = std::async(std::launch::async, [&] { return q.push(2); });
  CHECK(producer.wait_for(100ms) == std::future_status::timeout);  // full: blocked
  q.abort();
  REQUIRE(finishes(producer));
  CHECK_FALSE(producer.get());
  // Queued items are dropped, later calls fail at once.
  CHECK_FALSE(q.pop().has_value());
  CHECK_FALSE(q.push(3));
}

TEST_CASE("queue: abort wakes many blocked threads at once", "[queue]") {
  BoundedQueue<int> full(1), empty(1);
  REQUIRE(full.push(0));
  std::vector<std::future<bool>> pushers;
  std::vector<std::future<std::optional<int>>> poppers;
  for (int i = 0; i < 4; ++i) {
    pushers.push_back(std::async(std::launch::async, [&] { return full.push(1); }));
    poppers.push_back(std::async(std::launch::async, [&] { return empty.pop(); }));
  }
  std::this_thread::sleep_for(50ms);
  full.abort();
  empty.abort();
  for (auto& f : pushers) {
    REQUIRE(finishes(f));
    CHECK_FALSE(f.get());
  }
  for (auto& f : poppers) {
    REQUIRE(finishes(f));
    CHECK_FALSE(f.get().has_value());
  }
}

TEST_CASE("queue: a push blocks while full and resumes after a pop", "[queue]") {
  BoundedQueue<int> q(2);
  REQUIRE(q.push(1));
  REQUIRE(q.push(2));
  auto producer = std::async(std::launch::async, [&] { return q.push(3); });
  CHECK(producer.wait_for(100ms) == std::future_status::timeout);
  CHECK(q.pop() == std::optional<int>(1));
  REQUIRE(finishes(producer));
  CHECK(producer.get());
  q.close();
  CHECK(q.pop() == std::optional<int>(2));
  CHECK(q.pop() == std::optional<int>(3));
  CHECK_FALSE(q.pop().has_value());
}

TEST_CASE("queue: many producers and consumers, nothing lost or duplicated", "[queue]") {
  constexpr int kProducers = 4, kConsumers = 3, kItems = 20000;
  BoundedQueue<std::unique_ptr<int>> q(8);  // move-only items
  std::atomic<long long> sum{0};
  std::atomic<int> count{0}, refused{0};
  std::vector<std::atomic<int>> seen(kProducers * kItems);
  std::vector<std::thread> producers, consumers;
  for (int c = 0; c < kConsumers; ++c)
    consumers.emplace_back([&] {
      while (auto v = q.pop()) {
        sum += **v;
        ++count;
        seen[size_t(**v)]++;
      }
    });
  for (int p = 0; p < kProducers; ++p)
    producers.emplace_back([&, p] {
      for (int i = 0; i < kItems; ++i)
        if (!q.push(std::make_unique<int>(p * kItems + i))) ++refused;  // Catch is not thread-safe
    });
  for (auto& t : producers) t.join();
  q.close();
  for (auto& t : consumers) t.join();
  long long n = kProducers * kItems;
  CHECK(refused.load() == 0);
  CHECK(count.load() == n);
  CHECK(sum.load() == n * (n - 1) / 2);
  int wrong = 0;
  for (auto& s : seen) wrong += s.load() != 1;
  CHECK(wrong == 0);
}

TEST_CASE("queue: abort while producers and consumers are busy", "[queue]") {
  for (int round = 0; round < 20; ++round) {
    BoundedQueue<int> q(4);
    std::vector<std::thread> threads;
    for (int i = 0; i < 3; ++i) {
      threads.emplace_back([&] {
        while (q.push(1)) {
        }
      });
      threads.emplace_back([&] {
        while (q.pop()) {
        }
      });
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(round % 5));
    q.abort();
    for (auto& t : threads) t.join();  // every thread returned
  }
  SUCCEED();
}

TEST_CASE("queue: CancelToken", "[queue]") {
  CancelToken t;
  CHECK_FALSE(t.cancelled());
  CHECK_NOTHROW(t.throw_if_cancelled());
  std::thread other([&] { t.cancel(); });
  other.join();
  CHECK(t.cancelled());
  try {
    t.throw_if_cancelled();
    FAIL("no throw");
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::kCancelled);
  }
}
