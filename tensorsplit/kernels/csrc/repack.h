// GGUF rows <-> tiles (see layout.h). Scalar; no torch, no SIMD.
#pragma once
#include "layout.h"

namespace ts {

// One GGUF block of one row (lane i of the tile) into / out of a tile-block.
void pack_block(int type, const uint8_t* blk, uint8_t* tb, int i);
void unpack_block(int type, const uint8_t* tb, int i, uint8_t* blk);

// rows: (n_rows, n_blocks * block_bytes) GGUF bytes -> tiles [tile_begin, tile_end) of
// (ceil(n_rows / 16), n_blocks * tile_block) native bytes; rows past n_rows become zero blocks.
void repack_tiles(int type, const uint8_t* rows, int64_t n_rows, int64_t n_blocks, uint8_t* tiles,
                  int64_t tile_begin, int64_t tile_end);

// The GGUF bytes of one row (n_blocks * block_bytes) from the tiles.
void unpack_row(int type, const uint8_t* tiles, int64_t n_blocks, int64_t row, uint8_t* out);

}  // namespace ts
