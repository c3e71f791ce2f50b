"""The executor's lanes: each a way to produce one output tensor, picked per tensor by
`engine.executor` from the method's declaration and where the inputs lie.

- `copy`: the method is the identity (passthrough unscaled): the input file's bytes, no maths;
- `fused`: the method has a compiled fused variant: one kernel pass per chunk over the files' values;
- `raw_streamed`: an observe-then-apply method whose state runs on raw values (the task-vector
  pruners mostly): the same passes, each a compiled kernel, no torch;
- `torch_streamed`: an observe-then-apply method in torch, in row chunks;
- `torch_chunked`: element-wise methods in row chunks, the others whole;
- `non_float`: integer/bool tensors are taken from one input (the base) unchanged;
- `vocab`: inputs of different shapes (vocabulary sizes) are fitted to the output whole.

Each lane yields (byte offset, chunk, token) triples, so the executor's loop is the same for all.
"""
