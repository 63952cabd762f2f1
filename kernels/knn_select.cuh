// Bounded sorted neighbour lists for the exact kNN kernels.
//
// A list holds the K best (distance, index) pairs seen so far, ascending. Pairs are ordered by
// distance, then by index, so ties resolve the same way on every path (the smaller index first) and
// a merge never depends on the order in which tiles were visited. Empty slots hold
// (+inf, empty_index<I>()), which every real pair precedes.
//
// Everything here is __host__ __device__ and free of CUDA headers, so the host unit test
// (kernels/tests/test_knn_select.cpp) compiles it with a plain C++17 compiler.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define KNN_HD __host__ __device__ __forceinline__
#define KNN_UNROLL _Pragma("unroll")
#else
#define KNN_HD inline
#define KNN_UNROLL
#endif

namespace knn {

KNN_HD float infinity() {
#if defined(__CUDA_ARCH__)
    return __int_as_float(0x7f800000);
#else
    return __builtin_huge_valf();
#endif
}

// The largest value of a signed index type: the index of an empty slot.
template <typename I>
KNN_HD I empty_index() {
    return static_cast<I>((1ULL << (8 * sizeof(I) - 1)) - 1);
}

// (da, ia) comes strictly before (db, ib).
template <typename I>
KNN_HD bool precedes(float da, I ia, float db, I ib) {
    return da < db || (da == db && ia < ib);
}

template <int K, typename I>
KNN_HD void clear(float (&dist)[K], I (&idx)[K]) {
    KNN_UNROLL
    for (int s = 0; s < K; ++s) {
        dist[s] = infinity();
        idx[s] = empty_index<I>();
    }
}

// Inserts (d, i) into the ascending list if it beats the last entry, dropping the last entry. Every
// slot index is a compile-time constant after unrolling, so on the device the list stays in registers.
template <int K, typename I, typename J>
KNN_HD void insert(float (&dist)[K], I (&idx)[K], float d, J index) {
    const I i = static_cast<I>(index);
    if (!precedes(d, i, dist[K - 1], idx[K - 1])) return;
    KNN_UNROLL
    for (int s = K - 1; s > 0; --s) {
        if (precedes(d, i, dist[s - 1], idx[s - 1])) {
            dist[s] = dist[s - 1];
            idx[s] = idx[s - 1];
        } else if (precedes(d, i, dist[s], idx[s])) {
            dist[s] = d;
            idx[s] = i;
        }
    }
    if (precedes(d, i, dist[0], idx[0])) {
        dist[0] = d;
        idx[0] = i;
    }
}

// The K first pairs of the union of two ascending lists a and b, written to out (which may alias
// neither input). Duplicated pairs (the same index in both) are kept once.
template <int K, typename I>
KNN_HD void merge(const float* a_dist, const I* a_idx, const float* b_dist, const I* b_idx, float* out_dist,
                  I* out_idx) {
    int ia = 0, ib = 0;
    for (int s = 0; s < K; ++s) {
        bool take_a = ib >= K || (ia < K && !precedes(b_dist[ib], b_idx[ib], a_dist[ia], a_idx[ia]));
        if (take_a) {
            out_dist[s] = a_dist[ia];
            out_idx[s] = a_idx[ia];
            if (ib < K && b_idx[ib] == a_idx[ia] && b_dist[ib] == a_dist[ia] && a_idx[ia] != empty_index<I>()) ++ib;
            ++ia;
        } else {
            out_dist[s] = b_dist[ib];
            out_idx[s] = b_idx[ib];
            ++ib;
        }
    }
}

// Squared Euclidean distance, accumulated directly from the differences (no cancellation).
KNN_HD float squared_distance(const float* a, const float* b, int dim) {
    float acc = 0.0f;
    for (int j = 0; j < dim; ++j) {
        float diff = a[j] - b[j];
        acc += diff * diff;
    }
    return acc;
}

}  // namespace knn
