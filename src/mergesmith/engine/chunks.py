"""How big the pieces are that the lanes stream tensors in (read at call time: tests shrink them)."""

#: Float values per chunk of a streamed merge (2 MiB of float32 per input: the working set of two
#: workers stays in cache; 512K measured at least as fast as 1M and 256K on medium ties and dare_ties).
CHUNK_ELEMENTS = 1 << 19
#: Values per chunk of a pure copy (written straight from the input file's mapped pages).
COPY_ELEMENTS = 1 << 23
