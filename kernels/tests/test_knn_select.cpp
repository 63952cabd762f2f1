// Host unit tests of the neighbour-list logic in knn_select.cuh, against a sort-based reference.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

#include "knn_select.cuh"

static int failures = 0;
static int checks = 0;

#define CHECK(cond)                                                            \
    do {                                                                       \
        ++checks;                                                              \
        if (!(cond)) {                                                         \
            ++failures;                                                        \
            std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                      \
    } while (0)

using Pair = std::pair<float, long long>;

static std::vector<Pair> k_smallest(std::vector<Pair> pairs, int k) {
    std::sort(pairs.begin(), pairs.end());  // by distance, then index: the order the lists keep
    pairs.resize(std::min<size_t>(pairs.size(), k));
    return pairs;
}

template <int K>
static void expect_list(const float (&dist)[K], const long long (&idx)[K], const std::vector<Pair>& want) {
    for (int s = 0; s < K; ++s) {
        if (s < static_cast<int>(want.size())) {
            CHECK(dist[s] == want[s].first);
            CHECK(idx[s] == want[s].second);
        } else {
            CHECK(std::isinf(dist[s]) && dist[s] > 0);
            CHECK(idx[s] == knn::empty_index<long long>());
        }
    }
}

template <int K>
static void test_insert_random(std::mt19937& rng, int count, int distinct_values) {
    std::uniform_int_distribution<int> value(0, distinct_values - 1);  // few values: many ties
    float dist[K];
    long long idx[K];
    knn::clear(dist, idx);
    std::vector<Pair> seen;
    std::vector<long long> order(count);
    for (int i = 0; i < count; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);  // ties arrive in any index order
    for (long long i : order) {
        float d = static_cast<float>(value(rng)) * 0.25f;
        knn::insert(dist, idx, d, i);
        seen.emplace_back(d, i);
    }
    expect_list(dist, idx, k_smallest(seen, K));
}

template <int K>
static void test_merge_random(std::mt19937& rng, int count_a, int count_b) {
    std::uniform_real_distribution<float> value(0.0f, 4.0f);
    float a_d[K], b_d[K], out_d[K];
    long long a_i[K], b_i[K], out_i[K];
    knn::clear(a_d, a_i);
    knn::clear(b_d, b_i);
    std::vector<Pair> all;
    for (int i = 0; i < count_a + count_b; ++i) {
        float d = (i % 3 == 0) ? 1.0f : value(rng);  // a third tie at 1.0 across both lists
        if (i < count_a) knn::insert(a_d, a_i, d, i);
        else knn::insert(b_d, b_i, d, i);
        all.emplace_back(d, i);
    }
    knn::merge<K>(a_d, a_i, b_d, b_i, out_d, out_i);
    expect_list(out_d, out_i, k_smallest(all, K));
    knn::merge<K>(b_d, b_i, a_d, a_i, out_d, out_i);  // symmetric
    expect_list(out_d, out_i, k_smallest(all, K));
}

static void test_fixed_cases() {
    float dist[4];
    long long idx[4];
    knn::clear(dist, idx);
    knn::insert(dist, idx, 2.0f, 7);
    knn::insert(dist, idx, 1.0f, 9);
    knn::insert(dist, idx, 1.0f, 3);  // tie: the smaller index first
    expect_list(dist, idx, {{1.0f, 3}, {1.0f, 9}, {2.0f, 7}});
    knn::insert(dist, idx, 5.0f, 1);
    knn::insert(dist, idx, 6.0f, 0);  // list full and 6 > 5: dropped
    expect_list(dist, idx, {{1.0f, 3}, {1.0f, 9}, {2.0f, 7}, {5.0f, 1}});
    knn::insert(dist, idx, 5.0f, 0);  // ties the last entry with a smaller index: replaces it
    expect_list(dist, idx, {{1.0f, 3}, {1.0f, 9}, {2.0f, 7}, {5.0f, 0}});
    knn::insert(dist, idx, 0.0f, 100);
    expect_list(dist, idx, {{0.0f, 100}, {1.0f, 3}, {1.0f, 9}, {2.0f, 7}});

    // merge of an empty list with a partial one, and with a duplicated pair
    float e_d[4], p_d[4], o_d[4];
    long long e_i[4], p_i[4], o_i[4];
    knn::clear(e_d, e_i);
    knn::clear(p_d, p_i);
    knn::insert(p_d, p_i, 3.0f, 4);
    knn::merge<4>(e_d, e_i, p_d, p_i, o_d, o_i);
    expect_list(o_d, o_i, {{3.0f, 4}});
    knn::merge<4>(p_d, p_i, p_d, p_i, o_d, o_i);
    expect_list(o_d, o_i, {{3.0f, 4}});

    float a[3] = {0.0f, 3.0f, -1.0f}, b[3] = {1.0f, 1.0f, 1.0f};
    CHECK(knn::squared_distance(a, b, 3) == 1.0f + 4.0f + 4.0f);
    CHECK(knn::precedes(1.0f, 5, 2.0f, 0) && knn::precedes(1.0f, 0, 1.0f, 5) && !knn::precedes(1.0f, 5, 1.0f, 5));
    CHECK(knn::empty_index<int>() == 2147483647 && knn::empty_index<long long>() == 9223372036854775807LL);

    // 32-bit indices, as the fused kernel keeps them in registers
    float d32[3];
    int i32[3];
    knn::clear(d32, i32);
    for (int i = 9; i >= 0; --i) knn::insert(d32, i32, static_cast<float>(i % 4), i);
    CHECK(d32[0] == 0.0f && i32[0] == 0 && d32[1] == 0.0f && i32[1] == 4 && d32[2] == 0.0f && i32[2] == 8);
}

int main() {
    std::mt19937 rng(12345);
    test_fixed_cases();
    for (int trial = 0; trial < 200; ++trial) {
        test_insert_random<1>(rng, 1 + trial % 7, 3);
        test_insert_random<8>(rng, 1 + trial % 40, 5);
        test_insert_random<16>(rng, 1 + trial % 100, 1000);
        test_insert_random<32>(rng, 1 + trial % 300, 4);
        test_merge_random<8>(rng, trial % 13, trial % 11);
        test_merge_random<16>(rng, trial % 40, trial % 7);
        test_merge_random<32>(rng, trial % 90, trial % 50);
    }
    std::printf("test_knn_select: %d checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
