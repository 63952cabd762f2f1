// Fused exact kNN: squared Euclidean distances and top-k selection in one pass, nothing N x N stored.
//
// Grid (ceil(N / THREADS), splits). Each thread owns one query row: the row lives in registers
// (padded with zeros to D, the smallest built width that holds it: 2, 4, 8, 16, 32, 64 or 128, so a
// 2-D map costs 2 lanes per point, not 32), its sorted list of the K best (distance, index) pairs too.
// The block streams the database rows of its split [split_begin, split_end) through shared memory,
// kTileRows<D> rows at a time (4 KB per tile for narrow rows, so a narrow map is not dominated by
// barriers); every thread reads the same tile row at once (a broadcast, no bank conflicts) and
// accumulates (q - x)^2 directly, so near neighbours keep full fp32 precision.
// The query itself is skipped by index. With one split the lists are the answer; with several,
// knn_merge_k* merges each row's per-split lists (the extra splits keep the GPU busy when N is small).
//
// Distances are squared; the caller takes the square root (or halves them for cosine on unit rows).
#include "knn_select.cuh"

namespace {

constexpr int THREADS = 128;

// Rows per shared-memory tile: 32 rows for wide vectors, more for narrow ones (at most 4 KB of them).
// (A variable template, not a function: NVRTC and nvcc accept it in device code without flags.)
template <int D>
constexpr int kTileRows = D >= 32 ? 32 : 1024 / D;

// Squared distance from the query held in registers to one tile row in shared memory.
template <int D>
__device__ __forceinline__ float squared_distance_to(const float (&q)[D], const float* row) {
    float acc = 0.0f;
    if constexpr (D % 4 == 0) {
        const float4* t = reinterpret_cast<const float4*>(row);
#pragma unroll
        for (int j4 = 0; j4 < D / 4; ++j4) {
            const float4 v = t[j4];
            const float d0 = q[4 * j4] - v.x, d1 = q[4 * j4 + 1] - v.y;
            const float d2 = q[4 * j4 + 2] - v.z, d3 = q[4 * j4 + 3] - v.w;
            acc = fmaf(d0, d0, acc);
            acc = fmaf(d1, d1, acc);
            acc = fmaf(d2, d2, acc);
            acc = fmaf(d3, d3, acc);
        }
    } else {
#pragma unroll
        for (int j = 0; j < D; ++j) {
            const float d = q[j] - row[j];
            acc = fmaf(d, d, acc);
        }
    }
    return acc;
}

template <int K, int D>
__device__ void topk_rows(const float* __restrict__ x, int n, int dim, int cols_per_split,
                          float* __restrict__ out_dist, long long* __restrict__ out_idx) {
    static_assert(D % 4 == 0 || D < 4, "D must be a multiple of 4, or 1..3");
    constexpr int TILE = kTileRows<D>;
    __shared__ __align__(16) float tile[TILE][D];

    const int query = blockIdx.x * THREADS + threadIdx.x;
    const int split = blockIdx.y;
    const int begin = split * cols_per_split;
    const int end = min(n, begin + cols_per_split);

    float q[D];
    const bool active = query < n;
#pragma unroll
    for (int j = 0; j < D; ++j) q[j] = (active && j < dim) ? x[static_cast<long long>(query) * dim + j] : 0.0f;

    float best_dist[K];
    int best_idx[K];
    knn::clear(best_dist, best_idx);

    for (int tile_begin = begin; tile_begin < end; tile_begin += TILE) {
        for (int e = threadIdx.x; e < TILE * D; e += THREADS) {
            const int row = e / D, j = e % D;
            const int col = tile_begin + row;
            tile[row][j] = (col < end && j < dim) ? x[static_cast<long long>(col) * dim + j] : 0.0f;
        }
        __syncthreads();
        const int rows = min(TILE, end - tile_begin);
        if (active) {
            for (int row = 0; row < rows; ++row) {
                const float acc = squared_distance_to<D>(q, tile[row]);
                const int col = tile_begin + row;
                if (col != query) knn::insert(best_dist, best_idx, acc, col);
            }
        }
        __syncthreads();
    }

    if (active) {
        const long long base = (static_cast<long long>(split) * n + query) * K;
#pragma unroll
        for (int s = 0; s < K; ++s) {
            out_dist[base + s] = best_dist[s];
            out_idx[base + s] = best_idx[s] == knn::empty_index<int>() ? knn::empty_index<long long>()
                                                                        : static_cast<long long>(best_idx[s]);
        }
    }
}

template <int K>
__device__ void merge_rows(const float* __restrict__ part_dist, const long long* __restrict__ part_idx, int n,
                           int splits, float* __restrict__ out_dist, long long* __restrict__ out_idx) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n) return;
    float acc_dist[K], tmp_dist[K];
    long long acc_idx[K], tmp_idx[K];
    for (int s = 0; s < K; ++s) {
        acc_dist[s] = part_dist[static_cast<long long>(row) * K + s];
        acc_idx[s] = part_idx[static_cast<long long>(row) * K + s];
    }
    for (int split = 1; split < splits; ++split) {
        const long long base = (static_cast<long long>(split) * n + row) * K;
        knn::merge<K>(acc_dist, acc_idx, part_dist + base, part_idx + base, tmp_dist, tmp_idx);
        for (int s = 0; s < K; ++s) {
            acc_dist[s] = tmp_dist[s];
            acc_idx[s] = tmp_idx[s];
        }
    }
    for (int s = 0; s < K; ++s) {
        out_dist[static_cast<long long>(row) * K + s] = acc_dist[s];
        out_idx[static_cast<long long>(row) * K + s] = acc_idx[s];
    }
}

}  // namespace

// C names, so that a prebuilt cubin and an NVRTC build expose the same symbols:
// knn_topk_k{K}_d{D}(x [n, dim] fp32, n, dim, cols_per_split, out_dist [splits, n, K], out_idx [splits, n, K])
// knn_merge_k{K}(part_dist, part_idx, n, splits, out_dist [n, K], out_idx [n, K])
// __launch_bounds__(THREADS, 1): the query and its list must stay in registers; with no minimum of
// resident blocks ptxas may trade registers for occupancy and spill (it did: k=32, d=4 spilled at 96
// registers), and tests/kernels/test_cuda_codegen.py fails on any spill.
#define KNN_TOPK(K, D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) knn_topk_k##K##_d##D(                           \
        const float* __restrict__ x, int n, int dim, int cols_per_split, float* __restrict__ out_dist,         \
        long long* __restrict__ out_idx) {                                                                    \
        topk_rows<K, D>(x, n, dim, cols_per_split, out_dist, out_idx);                                        \
    }
#define KNN_MERGE(K)                                                                                          \
    extern "C" __global__ void knn_merge_k##K(const float* __restrict__ part_dist,                            \
                                              const long long* __restrict__ part_idx, int n, int splits,      \
                                              float* __restrict__ out_dist, long long* __restrict__ out_idx) { \
        merge_rows<K>(part_dist, part_idx, n, splits, out_dist, out_idx);                                     \
    }

// Every (K, D) pair that sage_fast/regions/_gpu.py can ask for (LIST_SIZES x PADDED_DIMS);
// tests/kernels/test_cuda_codegen.py checks that the two lists agree.
#define KNN_TOPK_ALL_D(K) \
    KNN_TOPK(K, 2)        \
    KNN_TOPK(K, 4)        \
    KNN_TOPK(K, 8)        \
    KNN_TOPK(K, 16)       \
    KNN_TOPK(K, 32)       \
    KNN_TOPK(K, 64)       \
    KNN_TOPK(K, 128)
KNN_TOPK_ALL_D(8)
KNN_TOPK_ALL_D(16)
KNN_TOPK_ALL_D(32)
KNN_MERGE(8)
KNN_MERGE(16)
KNN_MERGE(32)
