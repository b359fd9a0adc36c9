// Deterministic scatter-add on the CPU: contributions are grouped by destination row with a
// stable counting sort (CSR), then each row is summed by one task in the contributions' original
// order. No atomics, no per-thread copies of the destination, the same bits for any thread
// count, and no collapse when a few rows take almost all the traffic (rows are also split into
// column blocks, so 3 hot rows still keep every core busy).
#pragma once
#include <ATen/Parallel.h>
#include <cstdint>
#include <vector>

namespace midus {

struct RowGroups {
  std::vector<int64_t> rows;     // destination rows that receive at least one contribution
  std::vector<int64_t> offsets;  // size rows.size()+1, into order
  std::vector<int64_t> order;    // contribution ids grouped by row, ascending within a row
};

// row_of(c) -> destination row of contribution c in [0, R), for c in [0, M).
template <typename RowOf>
RowGroups group_by_row(int64_t M, int64_t R, RowOf row_of) {
  std::vector<int64_t> count(R + 1, 0);
  for (int64_t c = 0; c < M; ++c) count[row_of(c) + 1]++;
  for (int64_t r = 0; r < R; ++r) count[r + 1] += count[r];
  RowGroups g;
  g.order.resize(M);
  std::vector<int64_t> cursor(count.begin(), count.end() - 1);
  for (int64_t c = 0; c < M; ++c) g.order[cursor[row_of(c)]++] = c;
  for (int64_t r = 0; r < R; ++r) {
    if (count[r + 1] > count[r]) {
      g.rows.push_back(r);
      g.offsets.push_back(count[r]);
    }
  }
  g.offsets.push_back(M);
  return g;
}

// body(row, contribution_begin, contribution_end, col_begin, col_end) over every touched row and
// column block of width `block` in [0, width).
template <typename Body>
void for_each_row_block(const RowGroups& g, int64_t width, int64_t block, Body body) {
  const int64_t nblk = (width + block - 1) / block;
  const int64_t tasks = static_cast<int64_t>(g.rows.size()) * nblk;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / nblk, b = t % nblk;
      const int64_t c0 = b * block, c1 = std::min(width, c0 + block);
      body(g.rows[i], g.offsets[i], g.offsets[i + 1], c0, c1);
    }
  });
}

}  // namespace midus
